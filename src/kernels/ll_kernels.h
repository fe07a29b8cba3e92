/* Low-latency (decode) mode kernels: plain C interface to ll_dispatch.cu and ll_combine.cu. */
#ifndef EP_LL_KERNELS_H
#define EP_LL_KERNELS_H

#include "dev_group.h"

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    /* shapes */
    int num_tokens, max_tokens, hidden, topk, num_experts;
    int use_fp8, round_scale, use_ue8m0;
    int parity;
    uint64_t half_bytes;  /* ll_layout's half size (the halves start at the data buffer) */
    uint64_t layout_word; /* ep_ll_pack_layout of this call: sent to every peer, compared with every peer's */
    /* send side */
    const uint16_t *x; /* [N, H] bf16 */
    int64_t x_stride;  /* elements */
    const int64_t *topk_idx;
    int64_t idx_stride;
    /* receive side (caller's outputs) */
    uint8_t *recv_x;           /* [L, R*T, H] e4m3 or bf16, contiguous */
    void *recv_scales;         /* [L, S, R*T] float or [L, S/4, R*T] int32 (column-major in the last two dims) */
    int32_t *recv_count;       /* [L] */
    int32_t *src_info;         /* [L, R*T] */
    int64_t *layout_range;     /* [L, R] */
    int32_t *cumulative_stats; /* [L] or NULL */
    int64_t *wait_cost_stats;  /* [R] or NULL */
    int recv_split;            /* receive blocks per local expert (set by the launchers) */
} ep_ll_dispatch_kargs_t;

cudaError_t ep_launch_ll_dispatch_send(const ep_dev_group_t *g, const ep_ll_dispatch_kargs_t *a, cudaStream_t s);
cudaError_t ep_launch_ll_dispatch_recv(const ep_dev_group_t *g, const ep_ll_dispatch_kargs_t *a, cudaStream_t s);
/* Send and receive (the call without a hook): one kernel when the grid fits on the GPU at once, launched
 * cooperatively if `cooperative` (all blocks resident together, or the launch is refused and two kernels run),
 * else two kernels. The same for the combine. */
cudaError_t ep_launch_ll_dispatch_both(const ep_dev_group_t *g, const ep_ll_dispatch_kargs_t *a, int cooperative,
                                       cudaStream_t s);

typedef struct {
    int num_tokens, max_tokens, hidden, topk, num_experts;
    int parity;         /* the dispatch's half: its receive bookkeeping (counts, ranges, (token, k) of each row) */
    int combine_parity; /* this combine's: the half whose staging rows, flags and epoch it uses. Combines take
                         * turns on their own, so two of one handle can be alive at once */
    uint64_t half_bytes;
    const uint16_t *x;            /* [L, R*T, H] bf16 expert outputs */
    int64_t x_stride0, x_stride1; /* elements */
    const int64_t *topk_idx;
    int64_t idx_stride;
    const float *weights;
    int64_t w_stride;
    uint16_t *out; /* [N, H] */
    int64_t out_stride;
    int64_t *wait_cost_stats; /* [R] or NULL */
    int use_logfmt;           /* rows travel in LogFMT (logfmt.cuh) */
    int per_rank;             /* bf16 only (EPCOMM_LL_COMBINE_PER_RANK): each rank sends one weighted sum per token
                               * (ll_combine.cu); then the receive adds the ranks' sums */
    int send_warps;           /* warps per local expert in the send (a multiple of 16) */
    int recv_slices;          /* receive blocks per token, each summing a slice of the hidden dimension */
} ep_ll_combine_kargs_t;

cudaError_t ep_launch_ll_combine_send(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a, cudaStream_t s);
cudaError_t ep_launch_ll_combine_recv(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a, cudaStream_t s);
cudaError_t ep_launch_ll_combine_both(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a, int cooperative,
                                      cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
