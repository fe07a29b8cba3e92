/* ep_get_dispatch_layout: argument checks, then one kernel on the group's stream. */
#include "check.h"
#include "error.h"
#include "kernels/layout_kernels.h"
#include "launch.h"

static ep_status_t check_layout_args(ep_group_t g, const ep_tensor_t *topk_idx, int num_experts, ep_tensor_t *per_rank,
                                     ep_tensor_t *per_rdma_rank, ep_tensor_t *per_expert, ep_tensor_t *in_rank) {
    ep_tensor_spec_t idx_spec = {"topk_idx", EP_DTYPE_INT64, 2, {EP_ANY, EP_ANY}, 1, 0};
    EP_CHECK(ep_check_tensor(topk_idx, &idx_spec));
    EP_CHECK(ep_check_range(topk_idx->shape[1], 1, EP_MAX_TOPK, "topk_idx.shape[1] (num_topk)"));
    EP_CHECK(ep_check_range(topk_idx->shape[0], 0, INT32_MAX, "topk_idx.shape[0] (num_tokens)"));
    EP_CHECK(ep_check_range(num_experts, g->num_ranks, EP_MAX_EXPERTS, "num_experts"));
    EP_CHECK(ep_check_multiple(num_experts, g->num_ranks, "num_experts (must divide evenly over the ranks)"));
    ep_tensor_spec_t rank_spec = {"num_tokens_per_rank", EP_DTYPE_INT32, 1, {g->num_ranks}, 1, 0};
    EP_CHECK(ep_check_tensor(per_rank, &rank_spec));
    ep_tensor_spec_t expert_spec = {"num_tokens_per_expert", EP_DTYPE_INT32, 1, {num_experts}, 1, 0};
    EP_CHECK(ep_check_tensor(per_expert, &expert_spec));
    ep_tensor_spec_t in_rank_spec = {"is_token_in_rank", EP_DTYPE_BOOL, 2, {topk_idx->shape[0], g->num_ranks}, 1, 0};
    EP_CHECK(ep_check_tensor(in_rank, &in_rank_spec));
    if (per_rdma_rank != NULL && ep_tensor_given(per_rdma_rank))
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "num_tokens_per_rdma_rank: expected none (NULL) inside one "
                                                  "NVLink domain");
    return EP_SUCCESS;
}

ep_status_t ep_get_dispatch_layout(ep_group_t group, const ep_tensor_t *topk_idx, int num_experts,
                                   ep_tensor_t *num_tokens_per_rank, ep_tensor_t *num_tokens_per_rdma_rank,
                                   ep_tensor_t *num_tokens_per_expert, ep_tensor_t *is_token_in_rank,
                                   const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_group_check_usable(group));
    EP_CHECK(check_layout_args(group, topk_idx, num_experts, num_tokens_per_rank, num_tokens_per_rdma_rank,
                               num_tokens_per_expert, is_token_in_rank));
    ep_launch_frame_t frame;
    EP_CHECK(ep_launch_check(group, launch, &frame));
    ep_layout_args_t a = {
        .topk_idx = (const int64_t *)topk_idx->data,
        .topk_row_stride = topk_idx->strides[0],
        .num_tokens = (int)topk_idx->shape[0],
        .topk = (int)topk_idx->shape[1],
        .num_experts = num_experts,
        .num_ranks = group->num_ranks,
        .tokens_per_rank = (int32_t *)num_tokens_per_rank->data,
        .tokens_per_expert = (int32_t *)num_tokens_per_expert->data,
        .is_token_in_rank = (uint8_t *)is_token_in_rank->data,
        .in_rank_row_stride = is_token_in_rank->strides[0],
    };
    EP_CHECK(ep_launch_begin(group, &frame));
    cudaError_t err = ep_launch_dispatch_layout(&a, group->dev.input_error, group->stream);
    ep_status_t st = err == cudaSuccess ? EP_SUCCESS : ep_cuda_fail(err, "dispatch layout kernel", __FILE__, __LINE__);
    return ep_launch_end(group, &frame, st);
}
