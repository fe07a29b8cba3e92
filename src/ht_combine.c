/* ep_combine (high-throughput mode): checks, send rows back, barrier, reduce in rank order (or, with
 * EPCOMM_HT_COMBINE_OVERLAP, send and reduce overlapped in one kernel, then a barrier). Never waits on the
 * host. */
#include "check.h"
#include "env.h"
#include "error.h"
#include "handle.h"
#include "ht_combine_ce.h"
#include "kernels/group_kernels.h"
#include "kernels/ht_layout.h"
#include "launch.h"

static ep_status_t check_combine_args(ep_group_t g, const ep_combine_args_t *a) {
    EP_CHECK(ep_check_not_null(a, "args"));
    EP_CHECK(ep_check_struct_size(a->size, sizeof(*a), sizeof(*a), "ep_combine_args_t"));
    EP_CHECK(ep_check_not_null(a->handle, "handle"));
    ep_handle_t h = a->handle;
    if (h->group != g)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "handle: it belongs to another group");
    ep_tensor_spec_t xs = {"x", EP_DTYPE_BFLOAT16, 2, {h->num_rows >= 0 ? h->num_rows : EP_ANY, EP_ANY}, 1, 16};
    EP_CHECK(ep_check_tensor(&a->x, &xs));
    int64_t H = a->x.shape[1];
    if ((H * 2) % 16 != 0)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "x: rows must be a multiple of 16 bytes, hidden %lld is %lld bytes",
                       (long long)H, (long long)(H * 2));
    ep_tensor_spec_t ws = {"topk_weights", EP_DTYPE_FLOAT32, 2, {a->x.shape[0], h->topk}, 1, 0};
    EP_CHECK(ep_check_optional_tensor(&a->topk_weights, &ws));
    ep_tensor_spec_t b0 = {"bias0", EP_DTYPE_BFLOAT16, 2, {h->num_tokens, H}, 1, 16};
    EP_CHECK(ep_check_optional_tensor(&a->bias0, &b0));
    ep_tensor_spec_t b1 = {"bias1", EP_DTYPE_BFLOAT16, 2, {h->num_tokens, H}, 1, 16};
    EP_CHECK(ep_check_optional_tensor(&a->bias1, &b1));
    ep_tensor_spec_t os = {"out", EP_DTYPE_BFLOAT16, 2, {h->num_tokens, H}, 1, 16};
    EP_CHECK(ep_check_tensor(&a->out, &os));
    if (ep_tensor_given(&a->topk_weights)) {
        ep_tensor_spec_t ow = {"out_topk_weights", EP_DTYPE_FLOAT32, 2, {h->num_tokens, h->topk}, 1, 0};
        EP_CHECK(ep_check_tensor(&a->out_topk_weights, &ow));
    }
    EP_CHECK(ep_check_range(a->num_sms, 0, 1024, "num_sms"));
    /* With the counts on the host, a buffer overflow is caught here; otherwise the kernel catches it. */
    if (h->num_recv >= 0) {
        ep_ht_combine_region_t reg = ep_ht_combine_region(g->config.num_nvl_bytes, (uint64_t)H * 2, (uint64_t)h->topk);
        for (int s = 0; s < g->num_ranks; s++) {
            int64_t total = 0;
            for (int d = 0; d < g->num_ranks; d++)
                total += h->counts[s * g->num_ranks + d];
            if (total > (int64_t)reg.rows)
                return ep_fail(EP_ERROR_BUFFER_TOO_SMALL,
                               "combine: rank %d gets back %lld rows but the combine "
                               "buffer holds %llu; num_nvl_bytes must be at least %zu (ep_normal_buffer_bytes)",
                               s, (long long)total, (unsigned long long)reg.rows,
                               ep_normal_buffer_bytes(g->num_ranks, (int)((total + g->num_ranks - 1) / g->num_ranks),
                                                      (int)H, 2, 0, h->topk));
        }
    }
    return EP_SUCCESS;
}

/* The kernels: the overlapped combine where asked for and its grid fits at once (then a barrier), else send
 * (SM kernel or copy engines), barrier, reduce. */
static cudaError_t launch_combine(ep_group_t g, const ep_combine_args_t *args, const ep_ht_combine_args_t *c) {
    const int ce = ep_ht_combine_ce_wanted(g, args);
    /* What every rank's combine must agree on, compared at the barrier after the send. */
    const uint64_t word = ep_ht_combine_word(args->x.shape[1], ep_tensor_given(&args->topk_weights));
    if (c->overlap_reduce_warps > 0 && !ce) {
        cudaError_t err = ep_launch_ht_combine_overlap(&g->dev, c, g->stream);
        if (err != cudaErrorCooperativeLaunchTooLarge)
            return err == cudaSuccess ? ep_launch_barrier(&g->dev, EP_STAGE_COMBINE_SEND, word, g->stream) : err;
    }
    cudaError_t err = ce ? ep_ht_combine_send_ce(g, args) : ep_launch_ht_combine_send(&g->dev, c, g->stream);
    if (err == cudaSuccess)
        err = ep_launch_barrier(&g->dev, EP_STAGE_COMBINE_SEND, word, g->stream);
    return err == cudaSuccess ? ep_launch_ht_combine_reduce(&g->dev, c, g->stream) : err;
}

ep_status_t ep_combine(ep_group_t group, const ep_combine_args_t *args, const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_group_check_usable(group));
    EP_CHECK(check_combine_args(group, args));
    ep_launch_frame_t frame;
    EP_CHECK(ep_launch_check(group, launch, &frame));
    ep_handle_t h = args->handle;
    ep_ht_combine_args_t c = {
        .x = (const uint8_t *)args->x.data,
        .x_stride_bytes = args->x.strides[0] * 2,
        .row_bytes = args->x.shape[1] * 2,
        .weights = (const float *)args->topk_weights.data,
        .w_stride = args->topk_weights.strides[0],
        .topk = h->topk,
        .parity = (int)(group->combine_seq & 1),
        .data_bytes = group->config.num_nvl_bytes,
        .routing = h->routing,
        .num_tokens = h->num_tokens,
        .bias0 = (const uint16_t *)args->bias0.data,
        .bias1 = (const uint16_t *)args->bias1.data,
        .bias0_stride = args->bias0.strides[0],
        .bias1_stride = args->bias1.strides[0],
        .out = (uint16_t *)args->out.data,
        .out_stride = args->out.strides[0],
        .out_weights = ep_tensor_given(&args->topk_weights) ? (float *)args->out_topk_weights.data : NULL,
        .out_w_stride = args->out_topk_weights.strides[0],
        .num_blocks = ep_group_ht_blocks(group, args->num_sms),
        /* The reduction is local and runs after the transfer has finished: it is memory-latency bound, so
         * it takes every SM for its few tens of microseconds rather than the transfer's small budget. */
        .num_reduce_blocks = group->dev.num_sms,
        .overlap_reduce_warps = ep_env_ht_combine_overlap(),
    };
    EP_CHECK(ep_launch_begin(group, &frame));
    ep_status_t st = ep_launch_enter_mode(group, &frame, EP_DATA_HT);
    if (st == EP_SUCCESS) {
        cudaError_t err = launch_combine(group, args, &c);
        st = err == cudaSuccess ? EP_SUCCESS : ep_cuda_fail(err, "combine kernels", __FILE__, __LINE__);
    }
    if (st == EP_SUCCESS)
        group->combine_seq++;
    return ep_launch_end(group, &frame, st);
}
