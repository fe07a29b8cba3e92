/* Dispatch, step 2: every token row goes once to each destination rank, straight into its final row of
 * that rank's receive region (the position the notify kernel computed), so the receiver spends no SM time
 * and no copy on it. One warp per token: each lane loads 16-byte chunks of the row (several in flight) and
 * stores each to every destination of the token. Metadata (local expert ids, weights, source index) rides
 * along. With `use_tma` (EPCOMM_HT_DISPATCH_TMA=1) the rows go by bulk copies instead (ht_dispatch_tma.cu). */
#include "ht_dispatch_token.cuh"
#include "sync.cuh"

#define SEND_WARPS  16
#define SEND_UNROLL 4

__global__ void __launch_bounds__(SEND_WARPS * 32)
    ht_dispatch_send_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ht_dispatch_args_t a) {
    const int R = g.num_ranks, lane = threadIdx.x % 32;
    if (*a.routing.num_recv < 0)
        return; /* abandoned by the notify kernel */
    const ep_ht_dispatch_region_t reg =
        ep_ht_dispatch_region(a.data_bytes, a.x_row_bytes, (uint64_t)a.num_scales * 4, a.topk);
    const int64_t chunks = a.x_row_bytes / 16;
    const int64_t warp_id = (int64_t)blockIdx.x * SEND_WARPS + threadIdx.x / 32;
    const int64_t num_warps = (int64_t)gridDim.x * SEND_WARPS;

    for (int64_t t = warp_id; t < a.num_tokens; t += num_warps) {
        int pos[EP_MAX_NVL_RANKS], my_pos;
        if (!ep_ht_token_positions(a, R, t, lane, pos, &my_pos)) {
            ep_ht_unsent_token(g, a, t, lane);
            continue;
        }

        const uint4 *src = (const uint4 *)(a.x + t * a.x_stride_bytes);
        for (int64_t c0 = lane; c0 < chunks; c0 += 32 * SEND_UNROLL) {
            uint4 v[SEND_UNROLL];
#pragma unroll
            for (int u = 0; u < SEND_UNROLL; u++)
                if (c0 + u * 32 < chunks)
                    v[u] = __ldg(src + c0 + u * 32);
#pragma unroll
            for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
                if (d >= R || pos[d] < 0)
                    continue;
                uint4 *dst =
                    (uint4 *)(ep_ht_dispatch_region_ptr(g, d, a) + reg.x_off + (uint64_t)pos[d] * reg.x_row_bytes);
#pragma unroll
                for (int u = 0; u < SEND_UNROLL; u++)
                    if (c0 + u * 32 < chunks)
                        dst[c0 + u * 32] = v[u];
            }
        }
        ep_ht_token_metadata(g, a, reg, t, pos, my_pos, lane);
    }
}

extern "C" cudaError_t ep_launch_ht_dispatch_send(const ep_dev_group_t *g, const ep_ht_dispatch_args_t *a,
                                                  cudaStream_t s) {
    if (a->num_tokens == 0)
        return cudaSuccess;
    if (a->use_tma && ep_ht_dispatch_tma_applies(a))
        return ep_launch_ht_dispatch_send_tma(g, a, s);
    ht_dispatch_send_kernel<<<a->num_blocks, SEND_WARPS * 32, 0, s>>>(*g, *a);
    return cudaGetLastError();
}

__global__ void ht_dispatch_pad_kernel(const __grid_constant__ ep_dev_group_t g,
                                       const __grid_constant__ ep_ht_dispatch_args_t a, int num_rows) {
    const ep_ht_dispatch_region_t reg =
        ep_ht_dispatch_region(a.data_bytes, a.x_row_bytes, (uint64_t)a.num_scales * 4, a.topk);
    char *region = ep_ht_dispatch_region_ptr(g, g.rank, a);
    int nr = *a.routing.num_recv;
    if (nr < 0)
        nr = 0; /* abandoned: every row is empty */
    for (int64_t i = (int64_t)nr * a.topk + blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)num_rows * a.topk;
         i += (int64_t)gridDim.x * blockDim.x) {
        ((int64_t *)(region + reg.idx_off))[i] = -1;
        ((float *)(region + reg.weights_off))[i] = 0.0f;
    }
    for (int64_t i = nr + blockIdx.x * blockDim.x + threadIdx.x; i < num_rows; i += (int64_t)gridDim.x * blockDim.x)
        ((int32_t *)(region + reg.src_off))[i] = -1;
}

extern "C" cudaError_t ep_launch_ht_dispatch_pad(const ep_dev_group_t *g, const ep_ht_dispatch_args_t *a, int num_rows,
                                                 cudaStream_t s) {
    ht_dispatch_pad_kernel<<<32, 256, 0, s>>>(*g, *a, num_rows);
    return cudaGetLastError();
}
