/* Dispatch send with bulk copies (EPCOMM_HT_DISPATCH_TMA=1; experimental): the same placement as
 * ht_dispatch.cu, but a token's row is not moved by the lanes' 16-byte loads and stores. One lane per warp
 * asks the SM's copy unit to bring the row into shared memory, chunk by chunk, and then to store each chunk to
 * every destination rank; the other lanes only write the token's small arrays. A warp keeps TMA_STAGES chunk
 * buffers, across token boundaries: TMA_AHEAD chunks loading while the stores of up to TMA_STORES chunks still
 * read theirs.
 *
 * Why: plain SM stores to peers flatten at about 432 GB/s with 16 SMs on the 4xH200 machine (PERF.md), below
 * the 450 GB/s target; the copy unit is asynchronous and needs no registers per byte. */
#include "bulk.cuh"
#include "ht_dispatch_token.cuh"

#ifndef TMA_WARPS
#define TMA_WARPS 8
#endif
#ifndef TMA_STAGES
#define TMA_STAGES 4 /* chunk buffers per warp */
#endif
#ifndef TMA_STORES
#define TMA_STORES 2 /* chunks whose stores may still read their buffer; the other stages are loads ahead */
#endif
#ifndef TMA_CHUNK
#define TMA_CHUNK 4096 /* bytes per bulk copy, a multiple of 16 */
#endif
#define TMA_AHEAD (TMA_STAGES - TMA_STORES)
#define TMA_SMEM  (TMA_WARPS * TMA_STAGES * (TMA_CHUNK + 8))
#define TMA_MAX_DEVICES 64

/* The chunks a warp moves, numbered in order: chunk i is piece i % per_token of the warp's token i / per_token
 * (tokens warp_id, warp_id + num_warps, ...). */
typedef struct {
    const uint8_t *x;
    int64_t x_stride_bytes, row_bytes, per_token, first_token, token_step;
} tma_chunks_t;

__device__ __forceinline__ uint32_t chunk_bytes(const tma_chunks_t &c, int64_t i) {
    const int64_t off = (i % c.per_token) * TMA_CHUNK;
    return (uint32_t)min((int64_t)TMA_CHUNK, c.row_bytes - off);
}

/* Lane 0: starts loading chunk i into its stage. */
__device__ __forceinline__ void load_chunk(const tma_chunks_t &c, int64_t i, uint8_t *stages, uint64_t *bars) {
    const int s = (int)(i % TMA_STAGES);
    const int64_t t = c.first_token + (i / c.per_token) * c.token_step, off = (i % c.per_token) * TMA_CHUNK;
    const uint32_t bytes = chunk_bytes(c, i);
    ep_mbar_expect_bytes(&bars[s], bytes);
    ep_bulk_load(stages + (size_t)s * TMA_CHUNK, c.x + t * c.x_stride_bytes + off, bytes, &bars[s]);
}

__global__ void __launch_bounds__(TMA_WARPS * 32)
    ht_dispatch_send_tma_kernel(const __grid_constant__ ep_dev_group_t g,
                                const __grid_constant__ ep_ht_dispatch_args_t a) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int R = g.num_ranks, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (*a.routing.num_recv < 0)
        return; /* abandoned by the notify kernel */
    const ep_ht_dispatch_region_t reg =
        ep_ht_dispatch_region(a.data_bytes, a.x_row_bytes, (uint64_t)a.num_scales * 4, a.topk);
    uint8_t *stages = smem + (size_t)warp * TMA_STAGES * TMA_CHUNK;
    uint64_t *bars = (uint64_t *)(smem + (size_t)TMA_WARPS * TMA_STAGES * TMA_CHUNK) + warp * TMA_STAGES;
    const int64_t warp_id = (int64_t)blockIdx.x * TMA_WARPS + warp, num_warps = (int64_t)gridDim.x * TMA_WARPS;
    const tma_chunks_t c = {a.x,     a.x_stride_bytes, a.x_row_bytes, (a.x_row_bytes + TMA_CHUNK - 1) / TMA_CHUNK,
                            warp_id, num_warps};
    const int64_t my_tokens = warp_id < a.num_tokens ? (a.num_tokens - 1 - warp_id) / num_warps + 1 : 0;
    const int64_t n = my_tokens * c.per_token;
    if (lane == 0) {
        for (int s = 0; s < TMA_STAGES; s++)
            ep_mbar_init(&bars[s]);
        ep_mbar_init_fence();
        for (int64_t i = 0; i < n && i < TMA_AHEAD; i++)
            load_chunk(c, i, stages, bars);
    }
    __syncwarp();

    int64_t i = 0; /* the next chunk to store */
    for (int64_t k = 0; k < my_tokens; k++) {
        const int64_t t = warp_id + k * num_warps;
        int pos[EP_MAX_NVL_RANKS], my_pos;
        const bool any = ep_ht_token_positions(a, R, t, lane, pos, &my_pos);
        if (lane == 0) {
            for (int64_t p = 0; p < c.per_token; p++, i++) {
                const int s = (int)(i % TMA_STAGES);
                const int64_t off = p * TMA_CHUNK;
                const uint32_t bytes = chunk_bytes(c, i);
                ep_mbar_wait(&bars[s], (uint32_t)((i / TMA_STAGES) & 1));
#pragma unroll
                for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
                    if (d < R && pos[d] >= 0)
                        ep_bulk_store(ep_ht_dispatch_region_ptr(g, d, a) + reg.x_off +
                                          (uint64_t)pos[d] * reg.x_row_bytes + off,
                                      stages + (size_t)s * TMA_CHUNK, bytes);
                ep_bulk_commit();
                if (i + TMA_AHEAD < n) { /* its stage last held chunk i + TMA_AHEAD - TMA_STAGES */
                    ep_bulk_wait_read<TMA_STORES>(); /* the group of that chunk no longer reads it */
                    load_chunk(c, i + TMA_AHEAD, stages, bars);
                }
            }
        }
        if (any)
            ep_ht_token_metadata(g, a, reg, t, pos, my_pos, lane);
        else
            ep_ht_unsent_token(g, a, t, lane);
        __syncwarp();
    }
    if (lane == 0)
        ep_bulk_wait_all(); /* the rows are at their destinations before the kernel ends (the barrier follows) */
}

extern "C" int ep_ht_dispatch_tma_applies(const ep_ht_dispatch_args_t *a) {
    return a->x_row_bytes > 0 && a->x_row_bytes % 16 == 0 && a->x_stride_bytes % 16 == 0 && (uintptr_t)a->x % 16 == 0;
}

extern "C" cudaError_t ep_launch_ht_dispatch_send_tma(const ep_dev_group_t *g, const ep_ht_dispatch_args_t *a,
                                                      cudaStream_t s) {
    /* The attribute holds per context: set it once per device and thread (a thread of an in-process group may
     * run in its own green context, a context of its own on a shared device). */
    static thread_local bool smem_set[TMA_MAX_DEVICES];
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess && (dev < 0 || dev >= TMA_MAX_DEVICES || !smem_set[dev])) {
        err = cudaFuncSetAttribute(ht_dispatch_send_tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TMA_SMEM);
        if (err == cudaSuccess && dev >= 0 && dev < TMA_MAX_DEVICES)
            smem_set[dev] = true;
    }
    if (err != cudaSuccess)
        return err;
    ht_dispatch_send_tma_kernel<<<a->num_blocks, TMA_WARPS * 32, TMA_SMEM, s>>>(*g, *a);
    return cudaGetLastError();
}
