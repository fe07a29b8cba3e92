/* Low-latency (decode) mode, host side. INTERNAL until verified on GPUs: these declarations move to
 * include/epcomm.h once tests/gpu/test_ll_gpu.c passes on 2 and 4 GPUs (issue 4). */
#ifndef EP_LL_H
#define EP_LL_H

#include "group.h"
#include "kernels/ll_kernels.h"

typedef struct {
    size_t size;
    ep_tensor_t x;        /* [N, H] bfloat16, N <= max_tokens, H % 128 == 0 */
    ep_tensor_t topk_idx; /* [N, K] int64, K <= 16 */
    int max_tokens;       /* T, the same on every rank */
    int num_experts;
    int use_fp8, round_scale, use_ue8m0;
    int return_recv_hook; /* 1: only send now; ep_ll_dispatch_hook completes the receive */
    /* outputs (caller's memory) */
    ep_tensor_t recv_x;        /* [L, R*T, H] float8_e4m3 (use_fp8) or bfloat16, contiguous */
    ep_tensor_t recv_x_scales; /* use_fp8: [L, H/128, R*T] float32, or [L, H/512, R*T] int32 (use_ue8m0) */
    ep_tensor_t recv_count;    /* [L] int32 */
    ep_tensor_t src_info;      /* [L, R*T] int32 */
    ep_tensor_t layout_range;  /* [L, R] int64 */
    ep_tensor_t cumulative_local_expert_recv_stats; /* [L] int32, or data NULL */
    ep_tensor_t dispatch_wait_recv_cost_stats;      /* [R] int64, or data NULL */
} ep_ll_dispatch_args_t;

typedef struct {
    int parity;
    int num_tokens, max_tokens, hidden, topk, num_experts;
    int recv_pending;
    ep_ll_dispatch_kargs_t kargs;
} ep_ll_handle_t;

typedef struct {
    size_t size;
    ep_tensor_t x;            /* [L, R*T, H] bfloat16 (rows per the dispatch) */
    ep_tensor_t topk_idx;     /* [N, K] int64: the dispatch's */
    ep_tensor_t topk_weights; /* [N, K] float32 */
    ep_tensor_t out;          /* [N, H] bfloat16 */
    int return_recv_hook;
    ep_tensor_t combine_wait_recv_cost_stats; /* [R] int64, or data NULL */
} ep_ll_combine_args_t;

typedef struct {
    int recv_pending;
    ep_ll_combine_kargs_t kargs;
} ep_ll_combine_handle_t;

size_t ep_low_latency_buffer_bytes(int num_ranks, int max_tokens, int hidden, int topk, int num_experts);
ep_status_t ep_ll_dispatch(ep_group_t g, const ep_ll_dispatch_args_t *a, ep_ll_handle_t *h, const ep_launch_t *launch);
ep_status_t ep_ll_dispatch_hook(ep_group_t g, ep_ll_handle_t *h, const ep_launch_t *launch);
ep_status_t ep_ll_combine(ep_group_t g, const ep_ll_combine_args_t *a, const ep_ll_handle_t *h,
                          ep_ll_combine_handle_t *ch, const ep_launch_t *launch);
ep_status_t ep_ll_combine_hook(ep_group_t g, ep_ll_combine_handle_t *ch, const ep_launch_t *launch);
/* Zeroes the low-latency region (after high-throughput use of the same buffer) and barriers. */
ep_status_t ep_clean_low_latency_buffer(ep_group_t g, int max_tokens, int hidden, int topk, int num_experts,
                                        void *cuda_stream);

#endif
