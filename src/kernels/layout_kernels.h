/* Launcher for the dispatch-layout kernel (plain C interface to layout.cu). */
#ifndef EP_LAYOUT_KERNELS_H
#define EP_LAYOUT_KERNELS_H

#include "dev_group.h"

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const int64_t *topk_idx;
    int64_t topk_row_stride; /* elements */
    int num_tokens;
    int topk;
    int num_experts;
    int num_ranks;
    int32_t *tokens_per_rank;   /* [R], zeroed by the launcher */
    int32_t *tokens_per_expert; /* [E], zeroed by the launcher */
    uint8_t *is_token_in_rank;  /* [N, R] */
    int64_t in_rank_row_stride; /* elements */
} ep_layout_args_t;

cudaError_t ep_launch_dispatch_layout(const ep_layout_args_t *args, ep_dev_input_error_t *input_error,
                                      cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
