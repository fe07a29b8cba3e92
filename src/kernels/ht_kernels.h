/* High-throughput (normal) mode kernels: plain C interface to ht_notify.cu, ht_dispatch.cu, ht_combine.cu.
 * See ht_layout.h for where data lives in the symmetric buffer. */
#ifndef EP_HT_KERNELS_H
#define EP_HT_KERNELS_H

#include "dev_group.h"

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What the notify kernel writes to host-mapped memory; `seq` is written last. */
typedef struct {
    uint32_t seq;
    int32_t num_recv;                                    /* tokens this rank receives */
    int32_t ok;                                          /* 0: the op was abandoned (input error) */
    int32_t counts[EP_MAX_NVL_RANKS * EP_MAX_NVL_RANKS]; /* [src][dst] */
    int32_t recv_per_expert[EP_MAX_EXPERTS];             /* [L], aligned */
} ep_ht_notify_host_t;

/* A dispatch's routing, kept on the device by the handle: enough for combine and cached dispatch. */
typedef struct {
    int32_t *counts;   /* [R][R]: tokens from src to dst */
    int32_t *num_recv; /* [1]: tokens this rank receives; -1 if the dispatch was abandoned */
    int32_t *send_pos; /* [N][R]: the row each token takes in each destination's receive arrays, or -1 */
} ep_ht_routing_t;

typedef struct {
    const uint8_t *is_token_in_rank;
    int64_t in_rank_stride;
    const int32_t *tokens_per_rank;   /* [R] */
    const int32_t *tokens_per_expert; /* [E] */
    int num_tokens, num_experts, expert_alignment;
    int parity;
    int64_t capacity_rows; /* rows a dispatch region (or num_worst_tokens) holds */
    uint64_t call_word;    /* ep_ht_pack_call of this dispatch: every rank's must be the same */
    int64_t worst_tokens;  /* num_worst_tokens (0: the default mode): every rank's must be the same */
    ep_ht_routing_t routing;
    ep_ht_notify_host_t *host; /* device pointer to mapped memory */
    uint32_t seq;
} ep_ht_notify_args_t;

cudaError_t ep_launch_ht_notify(const ep_dev_group_t *g, const ep_ht_notify_args_t *a, cudaStream_t s);

typedef struct {
    const uint8_t *x;
    int64_t x_stride_bytes;
    int64_t x_row_bytes;
    const uint32_t *scales;               /* 4-byte words (float scales or packed UE8M0), or NULL */
    int64_t scale_stride0, scale_stride1; /* in words */
    int num_scales;
    const int64_t *topk_idx; /* NULL in cached mode without topk */
    int64_t idx_stride;
    const float *weights; /* or NULL */
    int64_t w_stride;
    int topk;
    int num_tokens, num_experts;
    int parity;
    uint64_t data_bytes; /* the data buffer's size (for ht_layout.h) */
    ep_ht_routing_t routing;
    int num_blocks;
    int use_tma; /* rows by bulk copies through shared memory (when the sizes and addresses allow it) */
    int report_bad_ids; /* a cached dispatch with topk_idx: no layout kernel has seen (and reported) these ids */
} ep_ht_dispatch_args_t;

cudaError_t ep_launch_ht_dispatch_send(const ep_dev_group_t *g, const ep_ht_dispatch_args_t *a, cudaStream_t s);
/* The bulk-copy transport of the send (ht_dispatch_tma.cu): whether it can move these rows (16-byte aligned
 * rows, strides and buffer), and its launch. */
int ep_ht_dispatch_tma_applies(const ep_ht_dispatch_args_t *a);
cudaError_t ep_launch_ht_dispatch_send_tma(const ep_dev_group_t *g, const ep_ht_dispatch_args_t *a, cudaStream_t s);
/* Worst-token mode: marks rows [num_recv, num_rows) of this rank's receive arrays as empty (idx -1). */
cudaError_t ep_launch_ht_dispatch_pad(const ep_dev_group_t *g, const ep_ht_dispatch_args_t *a, int num_rows,
                                      cudaStream_t s);

typedef struct {
    const uint8_t *x; /* [rows, H] bf16 */
    int64_t x_stride_bytes;
    int64_t row_bytes;
    const float *weights; /* [rows, K] or NULL */
    int64_t w_stride;
    int topk;
    int parity;
    uint64_t data_bytes;
    ep_ht_routing_t routing;
    int num_tokens; /* this rank's N (reduce) */
    const uint16_t *bias0, *bias1;
    int64_t bias0_stride, bias1_stride;
    uint16_t *out;
    int64_t out_stride;
    float *out_weights;
    int64_t out_w_stride;
    int num_blocks;        /* the transfer's blocks (the SM budget) */
    int num_reduce_blocks; /* the local reduction after the transfer */
    int overlap_reduce_warps; /* overlapped combine: warps of each block that reduce (the others send) */
} ep_ht_combine_args_t;

cudaError_t ep_launch_ht_combine_send(const ep_dev_group_t *g, const ep_ht_combine_args_t *a, cudaStream_t s);
cudaError_t ep_launch_ht_combine_reduce(const ep_dev_group_t *g, const ep_ht_combine_args_t *a, cudaStream_t s);
/* The overlapped combine (ht_combine_overlap.cu, experimental): send and reduce in one kernel of num_blocks
 * blocks, launched cooperatively (all resident at once); cudaErrorCooperativeLaunchTooLarge (nothing launched)
 * when they cannot be, and the caller then runs the two-step combine. A barrier must follow either way. */
cudaError_t ep_launch_ht_combine_overlap(const ep_dev_group_t *g, const ep_ht_combine_args_t *a, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
