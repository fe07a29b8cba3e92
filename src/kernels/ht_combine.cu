/* Combine: the expert ranks send each received row back to the rank it came from, then every rank sums,
 * for each of its tokens, the rows that came back, in ascending rank order (bitwise reproducible).
 *
 * Send: the rows a rank received from source s form one contiguous run (rows are ordered by source), and
 * they go to one contiguous run of s's combine region (after the runs of lower ranks), so a warp per row
 * copies 16-byte chunks with no gather. Reduce: one warp per token, float32 accumulation, bias0 then bias1,
 * one rounding to bf16. */
#include "bf16.cuh"
#include "ht_kernels.h"
#include "ht_layout.h"
#include "sync.cuh"

#define COMBINE_WARPS  16
#define COMBINE_UNROLL 4

__device__ __forceinline__ char *combine_region(const ep_dev_group_t &g, int rank, const ep_ht_combine_args_t &a) {
    return g.window[rank] + EP_CTRL_BYTES + ep_ht_combine_base(a.data_bytes, a.parity);
}

__device__ __forceinline__ void add_bf16x8(float acc[8], uint4 v) {
    acc[0] += ep_bf16_lo(v.x), acc[1] += ep_bf16_hi(v.x), acc[2] += ep_bf16_lo(v.y), acc[3] += ep_bf16_hi(v.y);
    acc[4] += ep_bf16_lo(v.z), acc[5] += ep_bf16_hi(v.z), acc[6] += ep_bf16_lo(v.w), acc[7] += ep_bf16_hi(v.w);
}

__global__ void __launch_bounds__(COMBINE_WARPS * 32)
    ht_combine_send_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ht_combine_args_t a) {
    __shared__ int32_t recv_start[EP_MAX_NVL_RANKS + 1]; /* rows from source s start here on this rank */
    __shared__ int32_t dst_start[EP_MAX_NVL_RANKS];      /* this rank's run starts here in s's region */
    __shared__ int skip;
    const int R = g.num_ranks, me = g.rank, lane = threadIdx.x % 32;
    const ep_ht_combine_region_t reg = ep_ht_combine_region(a.data_bytes, a.row_bytes, a.topk);
    if (threadIdx.x == 0) {
        skip = *a.routing.num_recv < 0;
        int32_t off = 0;
        for (int s = 0; s < R; s++) {
            recv_start[s] = off;
            off += a.routing.counts[s * R + me];
            int32_t before = 0, total = 0;
            for (int d = 0; d < R; d++) {
                before += d < me ? a.routing.counts[s * R + d] : 0;
                total += a.routing.counts[s * R + d];
            }
            dst_start[s] = before;
            if (total > (int64_t)reg.rows) { /* every rank sees the same and skips */
                if (blockIdx.x == 0)
                    ep_record_input_error(g.input_error, EP_STAGE_COMBINE_SEND, EP_INPUT_CAPACITY, reg.rows, s, total);
                skip = 1;
            }
        }
        recv_start[R] = off;
    }
    __syncthreads();
    if (skip)
        return;
    const int64_t chunks = a.row_bytes / 16;
    /* Rows are stored by source, so walking them in order would send to one peer at a time and leave the
     * other NVLinks idle. Interleave instead: virtual row v is row v / R of source v % R. */
    int64_t most = 0;
    for (int s = 0; s < R; s++)
        most = max(most, (int64_t)(recv_start[s + 1] - recv_start[s]));
    for (int64_t v = (int64_t)blockIdx.x * COMBINE_WARPS + threadIdx.x / 32; v < most * R;
         v += (int64_t)gridDim.x * COMBINE_WARPS) {
        int s = (int)(v % R);
        int64_t j = v / R;
        if (j >= recv_start[s + 1] - recv_start[s])
            continue;
        int64_t i = recv_start[s] + j;
        int64_t row = dst_start[s] + j;
        char *region = combine_region(g, s, a);
        const uint4 *src = (const uint4 *)(a.x + i * a.x_stride_bytes);
        uint4 *dst = (uint4 *)(region + reg.x_off + row * a.row_bytes);
        for (int64_t c0 = lane; c0 < chunks; c0 += 32 * COMBINE_UNROLL) {
            uint4 v[COMBINE_UNROLL];
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; u++)
                if (c0 + u * 32 < chunks)
                    v[u] = __ldg(src + c0 + u * 32);
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; u++)
                if (c0 + u * 32 < chunks)
                    dst[c0 + u * 32] = v[u];
        }
        if (a.weights && lane < a.topk)
            ((float *)(region + reg.weights_off))[row * a.topk + lane] = a.weights[i * a.w_stride + lane];
    }
}

__global__ void __launch_bounds__(COMBINE_WARPS * 32)
    ht_combine_reduce_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ht_combine_args_t a) {
    __shared__ int32_t region_start[EP_MAX_NVL_RANKS]; /* rows from destination d start here */
    __shared__ int32_t base[EP_MAX_NVL_RANKS];         /* this rank's first row at destination d */
    const int R = g.num_ranks, me = g.rank, lane = threadIdx.x % 32;
    const ep_ht_combine_region_t reg = ep_ht_combine_region(a.data_bytes, a.row_bytes, a.topk);
    const char *region = combine_region(g, me, a);
    if (threadIdx.x < R) {
        int d = threadIdx.x;
        int32_t start = 0, b = 0;
        for (int e = 0; e < d; e++)
            start += a.routing.counts[me * R + e];
        for (int s = 0; s < me; s++)
            b += a.routing.counts[s * R + d];
        region_start[d] = start;
        base[d] = b;
    }
    __syncthreads();
    const int valid = *a.routing.num_recv >= 0;
    const int64_t chunks = a.row_bytes / 16;
    for (int64_t t = (int64_t)blockIdx.x * COMBINE_WARPS + threadIdx.x / 32; t < a.num_tokens;
         t += (int64_t)gridDim.x * COMBINE_WARPS) {
        int my_row = (lane < R && valid) ? a.routing.send_pos[t * R + lane] : -1;
        if (my_row >= 0)
            my_row = region_start[lane] + (my_row - base[lane]);
        int rows[EP_MAX_NVL_RANKS];
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
            rows[d] = __shfl_sync(0xffffffffu, my_row, d);
        /* Several 16-byte chunks per lane per step: R * COMBINE_UNROLL independent loads in flight. */
        for (int64_t c0 = lane; c0 < chunks; c0 += 32 * COMBINE_UNROLL) {
            float acc[COMBINE_UNROLL][8];
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; u++)
#pragma unroll
                for (int j = 0; j < 8; j++)
                    acc[u][j] = 0.0f;
#pragma unroll
            for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
                if (d >= R || rows[d] < 0)
                    continue;
                const uint4 *src = (const uint4 *)(region + reg.x_off + (int64_t)rows[d] * a.row_bytes);
                uint4 v[COMBINE_UNROLL];
#pragma unroll
                for (int u = 0; u < COMBINE_UNROLL; u++)
                    if (c0 + u * 32 < chunks)
                        v[u] = src[c0 + u * 32];
#pragma unroll
                for (int u = 0; u < COMBINE_UNROLL; u++)
                    if (c0 + u * 32 < chunks)
                        add_bf16x8(acc[u], v[u]);
            }
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; u++) {
                int64_t c = c0 + u * 32;
                if (c >= chunks)
                    continue;
                if (a.bias0)
                    add_bf16x8(acc[u], ((const uint4 *)(a.bias0 + t * a.bias0_stride))[c]);
                if (a.bias1)
                    add_bf16x8(acc[u], ((const uint4 *)(a.bias1 + t * a.bias1_stride))[c]);
                ((uint4 *)(a.out + t * a.out_stride))[c] = ep_pack_bf16x8(acc[u]);
            }
        }
        if (a.out_weights && lane < a.topk) {
            float w = 0.0f;
#pragma unroll
            for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
                if (d < R && rows[d] >= 0)
                    w += ((const float *)(region + reg.weights_off))[(int64_t)rows[d] * a.topk + lane];
            a.out_weights[t * a.out_w_stride + lane] = w;
        }
    }
}

extern "C" cudaError_t ep_launch_ht_combine_send(const ep_dev_group_t *g, const ep_ht_combine_args_t *a,
                                                 cudaStream_t s) {
    ht_combine_send_kernel<<<a->num_blocks, COMBINE_WARPS * 32, 0, s>>>(*g, *a);
    return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ht_combine_reduce(const ep_dev_group_t *g, const ep_ht_combine_args_t *a,
                                                   cudaStream_t s) {
    if (a->num_tokens == 0)
        return cudaSuccess;
    ht_combine_reduce_kernel<<<a->num_reduce_blocks, COMBINE_WARPS * 32, 0, s>>>(*g, *a);
    return cudaGetLastError();
}
