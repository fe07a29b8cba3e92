/* ep_dispatch (high-throughput mode): checks, the count exchange (skipped in cached mode), the send and a
 * closing barrier, then the host's wait for the receive count (skipped in worst-token and cached mode), which
 * overlaps the send. */
#define _POSIX_C_SOURCE 200809L
#include "check.h"
#include "env.h"
#include "error.h"
#include "handle.h"
#include "kernels/group_kernels.h"
#include "kernels/ht_layout.h"
#include "launch.h"
#include "log.h"

#include <stdio.h>
#include <string.h>

size_t ep_normal_buffer_bytes(int num_ranks, int max_tokens_per_rank, int hidden, int elem_bytes, int num_scales,
                              int topk) {
    /* Bounded so that the result fits in 64 bits (below 2^64 / 4 with every bound at its largest). */
    if (num_ranks < 1 || num_ranks > EP_MAX_NVL_RANKS || max_tokens_per_rank < 0 || hidden < 0 ||
        hidden >= EP_HT_MAX_HIDDEN || elem_bytes < 1 || elem_bytes > 8 || num_scales < 0 || num_scales > 4096 ||
        topk < 0 || topk > EP_MAX_TOPK)
        return 0;
    uint64_t rows = (uint64_t)num_ranks * (uint64_t)max_tokens_per_rank;
    uint64_t dispatch_row =
        (uint64_t)hidden * (uint64_t)elem_bytes + (uint64_t)num_scales * 4 + (uint64_t)topk * 12 + 4;
    uint64_t combine_row = (uint64_t)hidden * 2 + (uint64_t)topk * 4;
    uint64_t quarter = (dispatch_row > combine_row ? dispatch_row : combine_row) * rows + 80;
    quarter = (quarter + 4095) / 4096 * 4096;
    return (size_t)(4 * quarter);
}

static ep_status_t check_x(const ep_dispatch_args_t *a, int *num_scales) {
    if (a->x.dtype != EP_DTYPE_BFLOAT16 && a->x.dtype != EP_DTYPE_FLOAT8_E4M3)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "x: expected dtype bfloat16 or float8_e4m3fn, got %s",
                       ep_dtype_name(a->x.dtype));
    ep_tensor_spec_t xs = {"x", a->x.dtype, 2, {EP_ANY, EP_ANY}, 1, 16};
    EP_CHECK(ep_check_tensor(&a->x, &xs));
    EP_CHECK(ep_check_range(a->x.shape[1], 1, EP_HT_MAX_HIDDEN - 1, "x.shape[1] (hidden)"));
    if ((a->x.shape[1] * (int64_t)ep_dtype_size(a->x.dtype)) % 16 != 0)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "x: rows must be a multiple of 16 bytes; hidden %lld of %s is %lld "
                       "bytes",
                       (long long)a->x.shape[1], ep_dtype_name(a->x.dtype),
                       (long long)(a->x.shape[1] * (int64_t)ep_dtype_size(a->x.dtype)));
    *num_scales = 0;
    if (a->x.dtype == EP_DTYPE_BFLOAT16) {
        if (ep_tensor_given(&a->x_scales))
            return ep_fail(EP_ERROR_INVALID_ARGUMENT, "x_scales: expected none for bfloat16 x");
        return EP_SUCCESS;
    }
    if (!ep_tensor_given(&a->x_scales))
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "x_scales: float8_e4m3fn x needs its scales [N, H/128]");
    ep_dtype_t sd = a->x_scales.dtype == EP_DTYPE_INT32 ? EP_DTYPE_INT32 : EP_DTYPE_FLOAT32;
    ep_tensor_spec_t ss = {"x_scales", sd, 2, {a->x.shape[0], EP_ANY}, 0, 4};
    EP_CHECK(ep_check_tensor(&a->x_scales, &ss));
    EP_CHECK(ep_check_range(a->x_scales.shape[1], 1, 4096, "x_scales.shape[1]"));
    *num_scales = (int)a->x_scales.shape[1];
    return EP_SUCCESS;
}

static ep_status_t check_routing(ep_group_t g, const ep_dispatch_args_t *a) {
    int64_t N = a->x.shape[0];
    if (ep_tensor_given(&a->topk_idx)) {
        ep_tensor_spec_t is = {"topk_idx", EP_DTYPE_INT64, 2, {N, EP_ANY}, 1, 0};
        EP_CHECK(ep_check_tensor(&a->topk_idx, &is));
        EP_CHECK(ep_check_range(a->topk_idx.shape[1], 1, EP_MAX_TOPK, "topk_idx.shape[1] (num_topk)"));
        ep_tensor_spec_t ws = {"topk_weights", EP_DTYPE_FLOAT32, 2, {N, a->topk_idx.shape[1]}, 1, 0};
        EP_CHECK(ep_check_optional_tensor(&a->topk_weights, &ws));
    } else if (ep_tensor_given(&a->topk_weights)) {
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "topk_weights: given without topk_idx");
    }
    EP_CHECK(ep_check_range(a->num_experts, g->num_ranks, EP_MAX_EXPERTS, "num_experts"));
    EP_CHECK(ep_check_multiple(a->num_experts, g->num_ranks, "num_experts (must divide evenly over the ranks)"));
    ep_tensor_spec_t rs = {"num_tokens_per_rank", EP_DTYPE_INT32, 1, {g->num_ranks}, 1, 0};
    EP_CHECK(ep_check_tensor(&a->num_tokens_per_rank, &rs));
    ep_tensor_spec_t ins = {"is_token_in_rank", EP_DTYPE_BOOL, 2, {N, g->num_ranks}, 1, 0};
    EP_CHECK(ep_check_tensor(&a->is_token_in_rank, &ins));
    ep_tensor_spec_t es = {"num_tokens_per_expert", EP_DTYPE_INT32, 1, {a->num_experts}, 1, 0};
    return ep_check_tensor(&a->num_tokens_per_expert, &es);
}

static ep_status_t check_dispatch_args(ep_group_t g, const ep_dispatch_args_t *a, ep_dispatch_result_t *r,
                                       int *num_scales) {
    EP_CHECK(ep_check_not_null(a, "args"));
    EP_CHECK(ep_check_not_null(r, "result"));
    EP_CHECK(ep_check_struct_size(a->size, sizeof(*a), sizeof(*a), "ep_dispatch_args_t"));
    EP_CHECK(ep_check_struct_size(r->size, sizeof(*r), sizeof(*r), "ep_dispatch_result_t"));
    EP_CHECK(check_x(a, num_scales));
    EP_CHECK(ep_check_range(a->x.shape[0], 0, INT32_MAX / EP_MAX_NVL_RANKS, "x.shape[0] (num_tokens)"));
    EP_CHECK(ep_check_range(a->expert_alignment, 1, 1 << 20, "expert_alignment"));
    EP_CHECK(ep_check_range(a->num_worst_tokens, 0, INT32_MAX, "num_worst_tokens"));
    EP_CHECK(ep_check_range(a->num_sms, 0, 1024, "num_sms"));
    if (a->cached_handle == NULL)
        return check_routing(g, a);
    if (ep_tensor_given(&a->topk_weights) && !ep_tensor_given(&a->topk_idx))
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "topk_weights: a cached dispatch that sends weights needs topk_idx "
                                                  "too (to make the expert ids local)");
    ep_handle_t h = a->cached_handle;
    if (h->group != g)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "cached_handle: it belongs to another group");
    if (h->num_tokens != a->x.shape[0])
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "x: the cached handle routes %d tokens, got %lld", h->num_tokens,
                       (long long)a->x.shape[0]);
    ep_tensor_spec_t ws = {"topk_weights", EP_DTYPE_FLOAT32, 2, {a->x.shape[0], h->topk}, 1, 0};
    EP_CHECK(ep_check_optional_tensor(&a->topk_weights, &ws));
    if (ep_tensor_given(&a->topk_idx)) {
        ep_tensor_spec_t is = {"topk_idx", EP_DTYPE_INT64, 2, {a->x.shape[0], h->topk}, 1, 0};
        EP_CHECK(ep_check_tensor(&a->topk_idx, &is));
    }
    return EP_SUCCESS;
}

/* Waits for the notify kernel's answer in mapped memory (no stream synchronisation). */
static ep_status_t wait_notify(ep_group_t g, uint32_t seq) {
    volatile ep_ht_notify_host_t *n = &g->mapped_host->notify;
    int64_t limit = ep_host_wait_limit_ms(g), deadline = ep_now_ms() + limit;
    unsigned spins = 0;
    while (*(volatile uint32_t *)&n->seq != seq) {
        if ((++spins & 255u) == 0) {
            if (g->mapped_host->error.status != 0)
                return ep_group_take_device_error(g);
            if (cudaStreamQuery(g->stream) == cudaSuccess && *(volatile uint32_t *)&n->seq != seq)
                return ep_fail(EP_ERROR_INTERNAL, "rank %d: dispatch: the count exchange ended without an answer",
                               g->rank);
            if (ep_now_ms() > deadline) {
                ep_fail(EP_ERROR_TIMEOUT, "rank %d: host wait for the dispatch receive count timed out after %lld ms",
                        g->rank, (long long)limit);
                return ep_group_mark_failed(g, EP_ERROR_TIMEOUT);
            }
        }
    }
    __sync_synchronize();
    return EP_SUCCESS;
}

/* The dispatch's sizes in the word every rank's must equal (ep_ht_pack_call); topk 0 without topk_idx. The handle
 * gives topk and the expert count (a new one was made from this call). */
static uint64_t call_word(const ep_dispatch_args_t *a, ep_handle_t h, int num_scales) {
    const int fp8 = a->x.dtype == EP_DTYPE_FLOAT8_E4M3;
    const ep_ht_call_t c = {
        .hidden = a->x.shape[1],
        .fp8 = fp8,
        .num_scales = num_scales,
        .int_scales = fp8 && a->x_scales.dtype == EP_DTYPE_INT32,
        .topk = ep_tensor_given(&a->topk_idx) ? h->topk : 0,
        .weights = ep_tensor_given(&a->topk_weights),
        .num_experts = h->num_experts,
    };
    return ep_ht_pack_call(&c);
}

static ep_status_t launch_notify(ep_group_t g, const ep_dispatch_args_t *a, ep_handle_t h, int64_t capacity_rows,
                                 int num_scales, uint32_t *seq) {
    ep_ht_notify_args_t n = {
        .is_token_in_rank = (const uint8_t *)a->is_token_in_rank.data,
        .in_rank_stride = a->is_token_in_rank.strides[0],
        .tokens_per_rank = (const int32_t *)a->num_tokens_per_rank.data,
        .tokens_per_expert = (const int32_t *)a->num_tokens_per_expert.data,
        .num_tokens = h->num_tokens,
        .num_experts = a->num_experts,
        .expert_alignment = a->expert_alignment,
        .parity = (int)(g->dispatch_seq & 1),
        .capacity_rows = capacity_rows,
        .call_word = g->notify_call_word = call_word(a, h, num_scales),
        .worst_tokens = a->num_worst_tokens,
        .routing = h->routing,
        .host = &g->mapped_dev->notify,
        .seq = ++g->notify_seq,
    };
    *seq = n.seq;
    cudaError_t err = ep_launch_ht_notify(&g->dev, &n, g->stream);
    return err == cudaSuccess ? EP_SUCCESS : ep_cuda_fail(err, "dispatch notify kernel", __FILE__, __LINE__);
}

/* The host's part of the default mode: the receive count, read once the notify kernel has answered. */
static ep_status_t take_notify_answer(ep_group_t g, ep_handle_t h, uint32_t seq) {
    EP_CHECK(wait_notify(g, seq));
    const ep_ht_notify_host_t *res = &g->mapped_host->notify;
    if (!res->ok) {
        /* Abandoned: a peer never arrived (the timeout was recorded before the answer, which may reach the
         * host before its poll of the error record), or some rank's input was bad. */
        ep_status_t st = ep_group_take_device_error(g);
        if (st == EP_SUCCESS)
            st = ep_group_take_input_error(g);
        return st != EP_SUCCESS ? st
                                : ep_fail(EP_ERROR_DEVICE_INPUT,
                                          "rank %d: dispatch abandoned: another rank's input was bad (that rank's "
                                          "error names it)",
                                          g->rank);
    }
    h->num_recv = res->num_recv;
    h->num_rows = h->num_recv;
    memcpy(h->counts, res->counts, sizeof(h->counts));
    return EP_SUCCESS;
}

static void fill_views(ep_group_t g, const ep_dispatch_args_t *a, ep_handle_t h, int num_scales,
                       const ep_ht_dispatch_region_t *reg, ep_dispatch_result_t *r) {
    char *region = (char *)g->window_mem + EP_CTRL_BYTES +
                   ep_ht_dispatch_base(g->config.num_nvl_bytes, (int)(g->dispatch_seq & 1));
    int rows = h->num_rows, K = h->topk;
    r->num_recv_tokens = h->num_recv;
    r->num_rows = rows;
    r->recv_src_idx = ep_tensor_1d(region + reg->src_off, EP_DTYPE_INT32, rows);
    r->recv_x = ep_tensor_2d(region + reg->x_off, a->x.dtype, rows, a->x.shape[1]);
    memset(&r->recv_x_scales, 0, sizeof(ep_tensor_t));
    if (num_scales > 0)
        r->recv_x_scales = ep_tensor_2d(region + reg->scales_off, a->x_scales.dtype, rows, num_scales);
    memset(&r->recv_topk_idx, 0, sizeof(ep_tensor_t));
    memset(&r->recv_topk_weights, 0, sizeof(ep_tensor_t));
    if (!ep_tensor_given(&a->topk_idx)) /* cached dispatch without topk: no topk outputs, as in DeepEP */
        return;
    r->recv_topk_idx = ep_tensor_2d(region + reg->idx_off, EP_DTYPE_INT64, rows, K);
    if (ep_tensor_given(&a->topk_weights))
        r->recv_topk_weights = ep_tensor_2d(region + reg->weights_off, EP_DTYPE_FLOAT32, rows, K);
}

/* What the barrier after a cached dispatch's send compares across ranks (a dispatch with a count exchange has
 * compared its sizes there already: 0). */
static uint64_t send_word(const ep_dispatch_args_t *a, ep_handle_t h, int num_scales) {
    return a->cached_handle ? EP_HT_SEND_DISPATCH | call_word(a, h, num_scales) : 0;
}

static ep_status_t run_send(ep_group_t g, const ep_dispatch_args_t *a, ep_handle_t h, int num_scales) {
    const ep_tensor_t *idx = ep_tensor_given(&a->topk_idx) ? &a->topk_idx : NULL;
    ep_ht_dispatch_args_t s = {
        .x = (const uint8_t *)a->x.data,
        .x_stride_bytes = a->x.strides[0] * (int64_t)ep_dtype_size(a->x.dtype),
        .x_row_bytes = a->x.shape[1] * (int64_t)ep_dtype_size(a->x.dtype),
        .scales = (const uint32_t *)a->x_scales.data,
        .scale_stride0 = a->x_scales.strides[0],
        .scale_stride1 = a->x_scales.strides[1],
        .num_scales = num_scales,
        .topk_idx = idx ? (const int64_t *)idx->data : NULL,
        .idx_stride = idx ? idx->strides[0] : 0,
        .weights = (const float *)a->topk_weights.data,
        .w_stride = a->topk_weights.strides[0],
        .topk = h->topk,
        .num_tokens = h->num_tokens,
        .num_experts = h->num_experts,
        .parity = (int)(g->dispatch_seq & 1),
        .data_bytes = g->config.num_nvl_bytes,
        .routing = h->routing,
        .num_blocks = ep_group_ht_blocks(g, a->num_sms),
        .use_tma = ep_env_ht_dispatch_tma(),
        .report_bad_ids = a->cached_handle != NULL,
    };
    cudaError_t err = ep_launch_ht_dispatch_send(&g->dev, &s, g->stream);
    if (err == cudaSuccess)
        err = ep_launch_barrier(&g->dev, EP_STAGE_DISPATCH_SEND, send_word(a, h, num_scales), g->stream);
    if (err == cudaSuccess && h->num_worst_tokens > 0)
        err = ep_launch_ht_dispatch_pad(&g->dev, &s, h->num_rows, g->stream);
    return err == cudaSuccess ? EP_SUCCESS : ep_cuda_fail(err, "dispatch send", __FILE__, __LINE__);
}

/* The topk of a call's topk_idx, 0 without one. */
static int given_topk(const ep_dispatch_args_t *a) {
    return ep_tensor_given(&a->topk_idx) ? (int)a->topk_idx.shape[1] : 0;
}

/* A cached dispatch sends the handle's rows at this call's row size, which may be larger than the handle's
 * dispatch had (another hidden size or dtype): the rows into every rank must still fit its receive region. The
 * rows are known on the host (the counts, or num_worst_tokens, which bounds them on every rank). */
static ep_status_t check_cached_capacity(ep_group_t g, const ep_dispatch_args_t *a, const ep_ht_dispatch_region_t *reg,
                                         int num_scales) {
    ep_handle_t h = a->cached_handle;
    const int R = g->num_ranks;
    int64_t rows = h->num_worst_tokens;
    int most = -1;                                     /* the rank receiving the most rows, when the counts are known */
    const int counted = rows == 0 && h->num_recv >= 0; /* else num_worst_tokens bounds every rank's rows */
    for (int d = 0; d < R && counted; d++) {
        int64_t into = 0;
        for (int s = 0; s < R; s++)
            into += h->counts[s * R + d];
        if (into > rows)
            rows = into, most = d;
    }
    if (rows <= (int64_t)reg->rows)
        return EP_SUCCESS;
    char who[48];
    snprintf(who, sizeof(who), most >= 0 ? "rank %d" : "every rank (num_worst_tokens)", most);
    return ep_fail(
        EP_ERROR_BUFFER_TOO_SMALL,
        "x: the cached handle sends %s %lld rows, but at hidden=%lld %s the dispatch buffer holds %llu; "
        "num_nvl_bytes must be at least %zu (ep_normal_buffer_bytes)",
        who, (long long)rows, (long long)a->x.shape[1], ep_dtype_name(a->x.dtype), (unsigned long long)reg->rows,
        ep_normal_buffer_bytes(1, (int)rows, (int)a->x.shape[1], (int)ep_dtype_size(a->x.dtype), num_scales, h->topk));
}

/* A cached dispatch in worst-token mode keeps its handle's row count. */
static ep_status_t check_cached_worst(const ep_dispatch_args_t *a) {
    const ep_handle_t h = a->cached_handle;
    if (a->num_worst_tokens > 0 && h->num_worst_tokens != a->num_worst_tokens)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "num_worst_tokens: the cached handle was made with %d, got %d",
                       h->num_worst_tokens, a->num_worst_tokens);
    return EP_SUCCESS;
}

/* The cached handle (checked against this call before anything started: check_cached_worst), or a new one; a
 * new handle's row count is num_worst_tokens, or in the default mode set later from the notify kernel's answer. */
static ep_status_t prepare_handle(ep_group_t g, const ep_dispatch_args_t *a, ep_handle_t *out) {
    if (a->cached_handle != NULL) {
        *out = a->cached_handle;
        return EP_SUCCESS;
    }
    ep_handle_t h;
    EP_CHECK(ep_handle_create(g, (int)a->x.shape[0], &h));
    h->topk = given_topk(a);
    h->num_experts = a->num_experts;
    h->num_worst_tokens = a->num_worst_tokens;
    h->num_rows = a->num_worst_tokens;
    *out = h;
    return EP_SUCCESS;
}

ep_status_t ep_dispatch(ep_group_t group, const ep_dispatch_args_t *args, ep_dispatch_result_t *result,
                        const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_group_check_usable(group));
    int num_scales = 0;
    EP_CHECK(check_dispatch_args(group, args, result, &num_scales));
    int topk = args->cached_handle ? args->cached_handle->topk : given_topk(args);
    ep_ht_dispatch_region_t reg = ep_ht_dispatch_region(
        group->config.num_nvl_bytes, (uint64_t)(args->x.shape[1] * (int64_t)ep_dtype_size(args->x.dtype)),
        (uint64_t)num_scales * 4, (uint64_t)topk);
    int64_t capacity = (int64_t)reg.rows;
    if (args->num_worst_tokens > 0) {
        if ((uint64_t)args->num_worst_tokens > reg.rows)
            return ep_fail(EP_ERROR_BUFFER_TOO_SMALL,
                           "num_worst_tokens: %d rows asked for, but the dispatch buffer "
                           "holds %llu; num_nvl_bytes must be at least %zu (ep_normal_buffer_bytes)",
                           args->num_worst_tokens, (unsigned long long)reg.rows,
                           ep_normal_buffer_bytes(1, args->num_worst_tokens, (int)args->x.shape[1],
                                                  (int)ep_dtype_size(args->x.dtype), num_scales, topk));
        capacity = args->num_worst_tokens;
    }
    if (args->cached_handle != NULL) {
        EP_CHECK(check_cached_worst(args));
        EP_CHECK(check_cached_capacity(group, args, &reg, num_scales));
    }
    ep_launch_frame_t frame;
    EP_CHECK(ep_launch_check(group, launch, &frame));
    if (args->cached_handle == NULL && args->num_worst_tokens == 0 && ep_launch_is_capturing(&frame))
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "num_worst_tokens: the default dispatch waits on the host for the "
                       "receive count and cannot be captured in a CUDA graph; pass num_worst_tokens > 0 or a "
                       "cached handle");
    EP_CHECK(ep_launch_begin(group, &frame));
    ep_handle_t h = NULL;
    uint32_t seq = 0;
    ep_status_t st = prepare_handle(group, args, &h); /* may fail (memory) on this rank alone: before any launch */
    if (st == EP_SUCCESS)
        st = ep_launch_enter_mode(group, &frame, EP_DATA_HT);
    if (st == EP_SUCCESS && args->cached_handle == NULL)
        st = launch_notify(group, args, h, capacity, num_scales, &seq);
    /* The send goes into the stream before the host waits for the count: it reads the routing the notify
     * kernel wrote (and does nothing if that kernel abandoned the op), so the wait overlaps the transfer. */
    if (st == EP_SUCCESS)
        st = run_send(group, args, h, num_scales);
    /* Once enqueued, the dispatch runs on every rank in this parity's slots, abandoned or not, so the next one
     * takes the other parity, also where the host learns of an abandon (a worst-token rank cannot tell). */
    const int enqueued = st == EP_SUCCESS;
    if (st == EP_SUCCESS && args->cached_handle == NULL && args->num_worst_tokens == 0)
        st = take_notify_answer(group, h, seq);
    if (st == EP_SUCCESS) {
        fill_views(group, args, h, num_scales, &reg, result);
        if (result->num_recv_tokens_per_expert && h->num_recv >= 0 && args->cached_handle == NULL)
            memcpy(result->num_recv_tokens_per_expert, group->mapped_host->notify.recv_per_expert,
                   sizeof(int32_t) * (size_t)(h->num_experts / group->num_ranks));
        result->handle = args->cached_handle ? NULL : h;
    } else if (h != NULL && args->cached_handle == NULL) {
        ep_handle_release(h);
    }
    if (enqueued)
        group->dispatch_seq++;
    st = ep_launch_end(group, &frame, st);
    if (st != EP_SUCCESS && result->handle != NULL) { /* failed at the end (the group has failed): no handle */
        ep_handle_release(result->handle);
        result->handle = NULL;
    }
    return st;
}
