#include "pattern.h"

__device__ __forceinline__ uint32_t pattern_word(uint64_t seed, int src, int dst, uint64_t i) {
    uint64_t z = seed ^ ((uint64_t)src << 56) ^ ((uint64_t)dst << 48) ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)(z ^ (z >> 31));
}

/* 16-byte stores straight into peers' memory over NVLink. */
__global__ void pattern_write_kernel(ep_dev_group_t g, size_t slot_words4, uint64_t seed) {
    for (int p = 0; p < g.num_ranks; p++) {
        uint4 *dst = (uint4 *)(g.window[p] + EP_CTRL_BYTES) + (size_t)g.rank * slot_words4;
        for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < slot_words4; i += gridDim.x * blockDim.x) {
            uint64_t w = i * 4;
            dst[i] = make_uint4(pattern_word(seed, g.rank, p, w), pattern_word(seed, g.rank, p, w + 1),
                                pattern_word(seed, g.rank, p, w + 2), pattern_word(seed, g.rank, p, w + 3));
        }
    }
}

__global__ void pattern_check_kernel(ep_dev_group_t g, size_t slot_words, uint64_t seed, pattern_report_t *rep) {
    const uint32_t *local = (const uint32_t *)(g.window[g.rank] + EP_CTRL_BYTES);
    for (int src = 0; src < g.num_ranks; src++) {
        for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < slot_words; i += gridDim.x * blockDim.x) {
            uint32_t got = local[(size_t)src * slot_words + i];
            uint32_t want = pattern_word(seed, src, g.rank, i);
            if (got != want && atomicAdd(&rep->mismatches, 1ull) == 0) {
                rep->first_index = i;
                rep->first_src = src;
                rep->first_got = got;
                rep->first_want = want;
            }
        }
    }
}

__global__ void pattern_poison_kernel(ep_dev_group_t g, size_t words) {
    uint32_t *local = (uint32_t *)(g.window[g.rank] + EP_CTRL_BYTES);
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x)
        local[i] = 0xDEADBEEFu;
}

extern "C" cudaError_t pattern_write(const ep_dev_group_t *g, size_t slot_bytes, uint64_t seed, cudaStream_t s) {
    pattern_write_kernel<<<64, 256, 0, s>>>(*g, slot_bytes / 16, seed);
    return cudaGetLastError();
}

extern "C" cudaError_t pattern_check(const ep_dev_group_t *g, size_t slot_bytes, uint64_t seed,
                                     pattern_report_t *report, cudaStream_t s) {
    pattern_check_kernel<<<64, 256, 0, s>>>(*g, slot_bytes / 4, seed, report);
    return cudaGetLastError();
}

extern "C" cudaError_t pattern_poison(const ep_dev_group_t *g, size_t bytes, cudaStream_t s) {
    pattern_poison_kernel<<<64, 256, 0, s>>>(*g, bytes / 4);
    return cudaGetLastError();
}

__global__ void delay_copy_kernel(uint4 *dst, const uint4 *src, size_t n, uint64_t delay_ns) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        uint64_t t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        do {
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        } while (t - t0 < delay_ns);
    }
    __syncthreads();
    if (blockIdx.x != 0)
        return; /* one block: the copy starts only after the delay */
    for (size_t i = threadIdx.x; i < n; i += blockDim.x)
        dst[i] = src[i];
}

extern "C" cudaError_t test_delay_copy(void *dst, const void *src, size_t bytes, int delay_ms, cudaStream_t s) {
    delay_copy_kernel<<<1, 1024, 0, s>>>((uint4 *)dst, (const uint4 *)src, bytes / 16, (uint64_t)delay_ms * 1000000u);
    return cudaGetLastError();
}

__global__ void busy_kernel(float *sink, int iters) {
    float a = threadIdx.x * 1e-3f, b = 1.0001f;
    for (int i = 0; i < iters; i++)
        a = fmaf(a, b, 1e-7f);
    if (a == 12345.0f) /* never true: keeps the loop */
        sink[threadIdx.x] = a;
}

extern "C" cudaError_t test_busy_kernel(float *sink, int blocks, int iters, cudaStream_t s) {
    busy_kernel<<<blocks, 1024, 0, s>>>(sink, iters);
    return cudaGetLastError();
}
