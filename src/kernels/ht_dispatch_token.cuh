/* Dispatch send, shared by the two row transports (ht_dispatch.cu: SM stores; ht_dispatch_tma.cu: bulk copies):
 * where a token goes, and the small per-token arrays that ride along with its row. */
#ifndef EP_HT_DISPATCH_TOKEN_CUH
#define EP_HT_DISPATCH_TOKEN_CUH

#include "ht_kernels.h"
#include "ht_layout.h"
#include "sync.cuh"

__device__ __forceinline__ char *ep_ht_dispatch_region_ptr(const ep_dev_group_t &g, int rank,
                                                           const ep_ht_dispatch_args_t &a) {
    return g.window[rank] + EP_CTRL_BYTES + ep_ht_dispatch_base(a.data_bytes, a.parity);
}

/* Token t's row at each destination (pos[d], -1: not sent there), on every lane; lane d < R also gets its own
 * in `my_pos`. Returns whether the token goes anywhere. */
__device__ __forceinline__ bool ep_ht_token_positions(const ep_ht_dispatch_args_t &a, int R, int64_t t, int lane,
                                                      int pos[EP_MAX_NVL_RANKS], int *my_pos) {
    *my_pos = lane < R ? a.routing.send_pos[t * R + lane] : -1;
#pragma unroll
    for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
        pos[d] = __shfl_sync(0xffffffffu, *my_pos, d);
    return __ballot_sync(0xffffffffu, *my_pos >= 0) != 0;
}

/* Token t's expert id in slot k (< topk), -1 when out of range: a cached dispatch reports such ids (no layout
 * kernel has seen them), else the layout kernel already did. */
__device__ __forceinline__ int64_t ep_ht_token_expert(const ep_dev_group_t &g, const ep_ht_dispatch_args_t &a,
                                                      int64_t t, int k) {
    const int64_t e = a.topk_idx[t * a.idx_stride + k];
    if (e >= -1 && e < a.num_experts)
        return e;
    if (a.report_bad_ids)
        ep_record_input_error(g.input_error, EP_STAGE_DISPATCH_SEND, EP_INPUT_BAD_EXPERT, t, k, e);
    return -1;
}

/* A token that goes to no rank: nothing is sent, but a cached dispatch still reports its bad expert ids. */
__device__ __forceinline__ void ep_ht_unsent_token(const ep_dev_group_t &g, const ep_ht_dispatch_args_t &a, int64_t t,
                                                   int lane) {
    if (a.report_bad_ids && a.topk_idx && lane < a.topk)
        ep_ht_token_expert(g, a, t, lane);
}

/* The warp writes token t's scales, local expert ids, weights and source index at each destination. */
__device__ __forceinline__ void ep_ht_token_metadata(const ep_dev_group_t &g, const ep_ht_dispatch_args_t &a,
                                                     const ep_ht_dispatch_region_t &reg, int64_t t,
                                                     const int pos[EP_MAX_NVL_RANKS], int my_pos, int lane) {
    const int R = g.num_ranks;
    const int L = a.num_experts > 0 ? a.num_experts / R : 1;
    for (int j = lane; j < a.num_scales; j += 32) {
        uint32_t w = a.scales[t * a.scale_stride0 + (int64_t)j * a.scale_stride1];
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
            if (d < R && pos[d] >= 0)
                ((uint32_t *)(ep_ht_dispatch_region_ptr(g, d, a) +
                              reg.scales_off))[(uint64_t)pos[d] * a.num_scales + j] = w;
    }
    if (a.topk_idx && lane < a.topk) { /* cached dispatch without topk sends no metadata */
        const int64_t e = ep_ht_token_expert(g, a, t, lane);
        const float w = a.weights ? a.weights[t * a.w_stride + lane] : 0.0f;
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
            if (d >= R || pos[d] < 0)
                continue;
            int64_t local = (e >= 0 && e / L == d) ? e - (int64_t)d * L : -1;
            char *region = ep_ht_dispatch_region_ptr(g, d, a);
            ((int64_t *)(region + reg.idx_off))[(uint64_t)pos[d] * a.topk + lane] = local;
            if (a.weights)
                ((float *)(region + reg.weights_off))[(uint64_t)pos[d] * a.topk + lane] = local >= 0 ? w : 0.0f;
        }
    }
    if (lane < R && my_pos >= 0)
        ((int32_t *)(ep_ht_dispatch_region_ptr(g, lane, a) + reg.src_off))[my_pos] = (int32_t)t;
}

#endif
