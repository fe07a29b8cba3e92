/* Low-latency dispatch and combine: argument checks and launches. No host waits anywhere, so every call can
 * be captured in a CUDA graph. */
#include "ll.h"

#include "check.h"
#include "env.h"
#include "error.h"
#include "kernels/group_kernels.h"
#include "kernels/ll_layout.h"
#include "launch.h"

#include <stdlib.h>
#include <string.h>

static ep_ll_layout_t layout_for(int R, int T, int H, int K, int E) {
    return ep_ll_layout(R, T, H, K, E / R);
}

/* The sizes a low-latency buffer is laid out for (dispatch, clean_low_latency_buffer, the buffer's size). */
static ep_status_t check_sizes(int num_ranks, int64_t max_tokens, int64_t hidden, int hidden_multiple, int64_t topk,
                               int64_t num_experts, const char *hidden_name, const char *topk_name) {
    EP_CHECK(ep_check_range(num_ranks, 1, EP_MAX_NVL_RANKS, "num_ranks"));
    EP_CHECK(ep_check_range(max_tokens, 1, 1 << 16, "num_max_dispatch_tokens_per_rank"));
    EP_CHECK(ep_check_multiple(hidden, hidden_multiple, hidden_name));
    EP_CHECK(ep_check_range(hidden, 128, 1 << 16, hidden_name));
    EP_CHECK(ep_check_range(topk, 1, EP_LL_MAX_TOPK, topk_name));
    EP_CHECK(ep_check_range(num_experts, num_ranks, 4096, "num_experts"));
    return ep_check_multiple(num_experts, num_ranks, "num_experts (must divide evenly over the ranks)");
}

size_t ep_low_latency_buffer_bytes(int num_ranks, int max_tokens, int hidden, int topk, int num_experts) {
    if (check_sizes(num_ranks, max_tokens, hidden, 128, topk, num_experts, "hidden", "num_topk") != EP_SUCCESS)
        return 0; /* ep_last_error says which size */
    return (size_t)(2 * layout_for(num_ranks, max_tokens, hidden, topk, num_experts).half_bytes);
}

static ep_status_t check_dispatch(ep_group_t g, const ep_low_latency_dispatch_args_t *a) {
    EP_CHECK(ep_check_not_null(a, "args"));
    EP_CHECK(ep_check_struct_size(a->size, sizeof(*a), sizeof(*a), "ep_low_latency_dispatch_args_t"));
    const int R = g->num_ranks;
    EP_CHECK(ep_check_range(a->max_tokens, 1, 1 << 16, "num_max_dispatch_tokens_per_rank"));
    ep_tensor_spec_t xs = {"x", EP_DTYPE_BFLOAT16, 2, {EP_ANY, EP_ANY}, 1, 16};
    EP_CHECK(ep_check_tensor(&a->x, &xs));
    const int64_t N = a->x.shape[0], H = a->x.shape[1];
    EP_CHECK(ep_check_range(N, 0, a->max_tokens, "x.shape[0] (num_tokens, at most num_max_dispatch_tokens_per_rank)"));
    if (a->use_ue8m0 && !a->round_scale && a->use_fp8)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "use_ue8m0: needs round_scale (packed UE8M0 scales are powers of 2)");
    ep_tensor_spec_t is = {"topk_idx", EP_DTYPE_INT64, 2, {N, EP_ANY}, 1, 0};
    EP_CHECK(ep_check_tensor(&a->topk_idx, &is));
    EP_CHECK(check_sizes(R, a->max_tokens, H, a->use_fp8 && a->use_ue8m0 ? 512 : 128, a->topk_idx.shape[1],
                         a->num_experts, "x.shape[1] (hidden)", "topk_idx.shape[1] (num_topk)"));
    const int64_t L = a->num_experts / R, RT = (int64_t)R * a->max_tokens;
    /* The outputs are written at fixed offsets (no strides): each must be contiguous. */
    ep_tensor_spec_t rx = {
        "recv_x", a->use_fp8 ? EP_DTYPE_FLOAT8_E4M3 : EP_DTYPE_BFLOAT16, 3, {L, RT, H}, EP_CONTIGUOUS, 16};
    EP_CHECK(ep_check_tensor(&a->recv_x, &rx));
    if (a->use_fp8) {
        ep_tensor_spec_t sc = {"recv_x_scales",
                               a->use_ue8m0 ? EP_DTYPE_INT32 : EP_DTYPE_FLOAT32,
                               3,
                               {L, H / (a->use_ue8m0 ? 512 : 128), RT},
                               EP_CONTIGUOUS,
                               4};
        EP_CHECK(ep_check_tensor(&a->recv_x_scales, &sc));
    }
    ep_tensor_spec_t rc = {"recv_count", EP_DTYPE_INT32, 1, {L}, EP_CONTIGUOUS, 0};
    EP_CHECK(ep_check_tensor(&a->recv_count, &rc));
    ep_tensor_spec_t si = {"src_info", EP_DTYPE_INT32, 2, {L, RT}, EP_CONTIGUOUS, 0};
    EP_CHECK(ep_check_tensor(&a->src_info, &si));
    ep_tensor_spec_t lr = {"layout_range", EP_DTYPE_INT64, 2, {L, R}, EP_CONTIGUOUS, 0};
    EP_CHECK(ep_check_tensor(&a->layout_range, &lr));
    ep_tensor_spec_t cs = {"cumulative_local_expert_recv_stats", EP_DTYPE_INT32, 1, {L}, 1, 0};
    EP_CHECK(ep_check_optional_tensor(&a->cumulative_local_expert_recv_stats, &cs));
    ep_tensor_spec_t ws = {"dispatch_wait_recv_cost_stats", EP_DTYPE_INT64, 1, {R}, 1, 0};
    EP_CHECK(ep_check_optional_tensor(&a->dispatch_wait_recv_cost_stats, &ws));
    size_t need = ep_low_latency_buffer_bytes(R, a->max_tokens, (int)H, (int)a->topk_idx.shape[1], a->num_experts);
    if (need > g->config.num_nvl_bytes)
        return ep_fail(EP_ERROR_BUFFER_TOO_SMALL,
                       "low-latency buffer: %zu bytes needed for T=%d, H=%lld, K=%lld, "
                       "E=%d, the group has num_nvl_bytes = %zu (ep_low_latency_buffer_bytes)",
                       need, a->max_tokens, (long long)H, (long long)a->topk_idx.shape[1], a->num_experts,
                       g->config.num_nvl_bytes);
    return EP_SUCCESS;
}

static ep_status_t run(ep_group_t g, const ep_launch_t *launch,
                       cudaError_t (*fn)(const ep_dev_group_t *, const void *, cudaStream_t), const void *kargs,
                       const char *what) {
    ep_launch_frame_t frame;
    EP_CHECK(ep_launch_check(g, launch, &frame));
    EP_CHECK(ep_launch_begin_direct(g, &frame));
    ep_status_t st = ep_launch_enter_mode(g, &frame, EP_DATA_LL);
    if (st == EP_SUCCESS) {
        cudaError_t err = fn(&g->dev, kargs, frame.stream);
        st = err == cudaSuccess ? EP_SUCCESS : ep_cuda_fail(err, what, __FILE__, __LINE__);
    }
    return ep_launch_end(g, &frame, st);
}

static cudaError_t launch_dispatch_send(const ep_dev_group_t *d, const void *k, cudaStream_t s) {
    return ep_launch_ll_dispatch_send(d, (const ep_ll_dispatch_kargs_t *)k, s);
}
static cudaError_t launch_dispatch_recv(const ep_dev_group_t *d, const void *k, cudaStream_t s) {
    return ep_launch_ll_dispatch_recv(d, (const ep_ll_dispatch_kargs_t *)k, s);
}
static cudaError_t launch_dispatch_both(const ep_dev_group_t *d, const void *k, cudaStream_t s) {
    const int mode = ep_env_ll_fused();
    if (mode != EP_LL_TWO_KERNELS)
        return ep_launch_ll_dispatch_both(d, (const ep_ll_dispatch_kargs_t *)k, mode == EP_LL_FUSED_COOPERATIVE, s);
    cudaError_t err = ep_launch_ll_dispatch_send(d, (const ep_ll_dispatch_kargs_t *)k, s);
    return err == cudaSuccess ? ep_launch_ll_dispatch_recv(d, (const ep_ll_dispatch_kargs_t *)k, s) : err;
}
static cudaError_t launch_combine_send(const ep_dev_group_t *d, const void *k, cudaStream_t s) {
    return ep_launch_ll_combine_send(d, (const ep_ll_combine_kargs_t *)k, s);
}
static cudaError_t launch_combine_recv(const ep_dev_group_t *d, const void *k, cudaStream_t s) {
    return ep_launch_ll_combine_recv(d, (const ep_ll_combine_kargs_t *)k, s);
}
static cudaError_t launch_combine_both(const ep_dev_group_t *d, const void *k, cudaStream_t s) {
    const int mode = ep_env_ll_fused();
    if (mode != EP_LL_TWO_KERNELS)
        return ep_launch_ll_combine_both(d, (const ep_ll_combine_kargs_t *)k, mode == EP_LL_FUSED_COOPERATIVE, s);
    cudaError_t err = ep_launch_ll_combine_send(d, (const ep_ll_combine_kargs_t *)k, s);
    return err == cudaSuccess ? ep_launch_ll_combine_recv(d, (const ep_ll_combine_kargs_t *)k, s) : err;
}

static ep_ll_dispatch_kargs_t dispatch_kargs(ep_group_t g, const ep_low_latency_dispatch_args_t *a) {
    const int K = (int)a->topk_idx.shape[1];
    ep_ll_dispatch_kargs_t k = {
        .num_tokens = (int)a->x.shape[0],
        .max_tokens = a->max_tokens,
        .hidden = (int)a->x.shape[1],
        .topk = K,
        .num_experts = a->num_experts,
        .use_fp8 = a->use_fp8,
        .round_scale = a->use_fp8 && a->round_scale,
        .use_ue8m0 = a->use_fp8 && a->use_ue8m0,
        .parity = (int)(g->ll_seq & 1),
        .half_bytes = layout_for(g->num_ranks, a->max_tokens, (int)a->x.shape[1], K, a->num_experts).half_bytes,
        .layout_word = ep_ll_pack_layout(a->max_tokens, (int)a->x.shape[1], K, a->num_experts,
                                         ep_ll_format(a->use_fp8, a->round_scale, a->use_ue8m0)),
        .x = (const uint16_t *)a->x.data,
        .x_stride = a->x.strides[0],
        .topk_idx = (const int64_t *)a->topk_idx.data,
        .idx_stride = a->topk_idx.strides[0],
        .recv_x = (uint8_t *)a->recv_x.data,
        .recv_scales = a->recv_x_scales.data,
        .recv_count = (int32_t *)a->recv_count.data,
        .src_info = (int32_t *)a->src_info.data,
        .layout_range = (int64_t *)a->layout_range.data,
        .cumulative_stats = (int32_t *)a->cumulative_local_expert_recv_stats.data,
        .wait_cost_stats = (int64_t *)a->dispatch_wait_recv_cost_stats.data,
    };
    return k;
}

ep_status_t ep_low_latency_dispatch(ep_group_t g, const ep_low_latency_dispatch_args_t *a, ep_ll_handle_t *handle,
                                    const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(g, "group"));
    EP_CHECK(ep_check_not_null(handle, "handle"));
    EP_CHECK(ep_group_check_usable(g));
    EP_CHECK(check_dispatch(g, a));
    ep_ll_handle_t h = calloc(1, sizeof(*h));
    if (h == NULL)
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "low-latency handle: out of host memory");
    h->group = g;
    h->seq = g->ll_seq;
    h->window_gen = g->ll_window_gen;
    h->dispatch = dispatch_kargs(g, a);
    ep_status_t st = run(g, launch, a->return_recv_hook ? launch_dispatch_send : launch_dispatch_both, &h->dispatch,
                         "low-latency dispatch");
    if (st != EP_SUCCESS) {
        free(h);
        return st;
    }
    h->dispatch_recv_pending = a->return_recv_hook;
    g->ll_seq++;
    g->live_handles++;
    *handle = h;
    return EP_SUCCESS;
}

static ep_status_t check_handle(ep_group_t g, ep_ll_handle_t h) {
    EP_CHECK(ep_check_not_null(g, "group"));
    EP_CHECK(ep_check_not_null(h, "handle"));
    if (h->group != g)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "handle: it belongs to another group");
    return ep_group_check_usable(g);
}

/* A normal-mode call or ep_clean_low_latency_buffer overwrites everything a handle's calls left in the buffer. */
static ep_status_t check_window_current(ep_group_t g, ep_ll_handle_t h) {
    if (h->window_gen != g->ll_window_gen)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "handle: stale: a normal-mode call or clean_low_latency_buffer has reused the buffer since "
                       "its dispatch");
    return EP_SUCCESS;
}

/* Calls take turns between two halves: what call number `mine` left in its half is gone once the count `now`
 * is more than two past it. `who`, `call` / `calls` and `half` name the argument, the calls and the half. */
static ep_status_t check_turns(uint64_t now, uint64_t mine, const char *who, const char *call, const char *calls,
                               const char *half) {
    if (now - mine <= 2)
        return EP_SUCCESS;
    return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                   "%s: stale: %llu later low-latency %s have reused its %s (at most two %s results may be alive "
                   "at once)",
                   who, (unsigned long long)(now - mine - 1), calls, half, call);
}

/* The routing a handle's dispatch receive and combine send read lives in the buffer half of its dispatch: two
 * later dispatches overwrite it too. (The combine's receive reads only its own staging half.) */
static ep_status_t check_handle_current(ep_group_t g, ep_ll_handle_t h) {
    EP_CHECK(check_window_current(g, h));
    return check_turns(g->ll_seq, h->seq, "handle", "dispatch", "dispatches", "buffer half");
}

ep_status_t ep_low_latency_dispatch_hook(ep_group_t g, ep_ll_handle_t h, const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(check_handle(g, h));
    EP_CHECK(check_handle_current(g, h));
    if (!h->dispatch_recv_pending)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "hook: this dispatch's receive already ran (or it had no hook)");
    EP_CHECK(run(g, launch, launch_dispatch_recv, &h->dispatch, "low-latency dispatch receive"));
    h->dispatch_recv_pending = 0;
    return EP_SUCCESS;
}

static ep_status_t check_combine(ep_group_t g, const ep_low_latency_combine_args_t *a, ep_ll_handle_t h) {
    EP_CHECK(ep_check_not_null(a, "args"));
    EP_CHECK(ep_check_struct_size(a->size, sizeof(*a), sizeof(*a), "ep_low_latency_combine_args_t"));
    if (h->dispatch_recv_pending)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "handle: the dispatch's receive hook has not run yet");
    if (h->combine_recv_pending)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "handle: its previous combine's receive hook has not run yet (a handle holds one pending "
                       "combine receive; run that hook first)");
    const ep_ll_dispatch_kargs_t *d = &h->dispatch;
    const int R = g->num_ranks;
    const int64_t L = d->num_experts / R, RT = (int64_t)R * d->max_tokens, N = d->num_tokens, K = d->topk;
    ep_tensor_spec_t xs = {"x", EP_DTYPE_BFLOAT16, 3, {L, RT, d->hidden}, 1, 16};
    EP_CHECK(ep_check_tensor(&a->x, &xs));
    ep_tensor_spec_t is = {"topk_idx", EP_DTYPE_INT64, 2, {N, K}, 1, 0};
    EP_CHECK(ep_check_tensor(&a->topk_idx, &is));
    ep_tensor_spec_t ws = {"topk_weights", EP_DTYPE_FLOAT32, 2, {N, K}, 1, 0};
    EP_CHECK(ep_check_tensor(&a->topk_weights, &ws));
    ep_tensor_spec_t os = {"out", EP_DTYPE_BFLOAT16, 2, {N, d->hidden}, 1, 16};
    EP_CHECK(ep_check_tensor(&a->out, &os));
    ep_tensor_spec_t cs = {"combine_wait_recv_cost_stats", EP_DTYPE_INT64, 1, {R}, 1, 0};
    return ep_check_optional_tensor(&a->combine_wait_recv_cost_stats, &cs);
}

/* Warps per local expert in the combine's send: about one per row a loaded expert has (rows are copied
 * whole by one warp each: measured at EP4, T=128/256, a warp per row beats both two rows per warp and rows
 * split between warps), 1.5x the mean T*K/L rows, in blocks of 16 warps, at most 128. LogFMT rows cost
 * arithmetic per group, so at 1 to 8 mean rows per expert its send takes 64 warps, which cut each row in up
 * to 8 pieces (EP4, T=32: 22.8 us against 39.5 with 16 warps); with more rows, whole rows as for bf16 (T=128:
 * 45.0 us whole against 54.9 / 50.3 / 60.6 cut in 2 / 4 / 8). */
static int combine_send_warps(int max_tokens, int topk, int num_local_experts, int use_logfmt) {
    int forced = ep_env_ll_combine_warps();
    if (forced > 0)
        return forced;
    const int64_t tk = (int64_t)max_tokens * topk;
    if (use_logfmt && tk >= num_local_experts && tk < 8 * (int64_t)num_local_experts)
        return 64;
    int64_t rows = (tk * 3 / 2 + num_local_experts - 1) / num_local_experts;
    int64_t warps = (rows + 15) / 16 * 16;
    return (int)(warps < 16 ? 16 : warps > 128 ? 128 : warps);
}

/* Receive blocks per token: one per token from 128 tokens on (a block per SM), more for fewer tokens so that
 * the sum (and LogFMT's decode, which is arithmetic-bound) is spread over the SMs: 8 blocks at 1 token. */
static int combine_recv_slices(int num_tokens) {
    int slices = num_tokens > 0 ? 128 / num_tokens : 1;
    return slices < 1 ? 1 : slices > 8 ? 8 : slices;
}

ep_status_t ep_low_latency_combine(ep_group_t g, const ep_low_latency_combine_args_t *a, ep_ll_handle_t h,
                                   const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(check_handle(g, h));
    EP_CHECK(check_handle_current(g, h));
    EP_CHECK(check_combine(g, a, h));
    const ep_ll_dispatch_kargs_t *d = &h->dispatch;
    ep_ll_combine_kargs_t k = {
        .num_tokens = d->num_tokens,
        .max_tokens = d->max_tokens,
        .hidden = d->hidden,
        .topk = d->topk,
        .num_experts = d->num_experts,
        .parity = d->parity,
        .combine_parity = (int)(g->ll_combine_seq & 1),
        .half_bytes = d->half_bytes,
        .x = (const uint16_t *)a->x.data,
        .x_stride0 = a->x.strides[0],
        .x_stride1 = a->x.strides[1],
        .topk_idx = (const int64_t *)a->topk_idx.data,
        .idx_stride = a->topk_idx.strides[0],
        .weights = (const float *)a->topk_weights.data,
        .w_stride = a->topk_weights.strides[0],
        .out = (uint16_t *)a->out.data,
        .out_stride = a->out.strides[0],
        .wait_cost_stats = (int64_t *)a->combine_wait_recv_cost_stats.data,
        .use_logfmt = a->use_logfmt != 0,
        .per_rank = !a->use_logfmt && ep_env_ll_combine_per_rank(),
        .send_warps = combine_send_warps(d->max_tokens, d->topk, d->num_experts / g->num_ranks, a->use_logfmt != 0),
        .recv_slices = combine_recv_slices(d->num_tokens),
    };
    EP_CHECK(
        run(g, launch, a->return_recv_hook ? launch_combine_send : launch_combine_both, &k, "low-latency combine"));
    h->combine_seq = g->ll_combine_seq++;
    h->combine = k;
    h->combine_recv_pending = a->return_recv_hook;
    return EP_SUCCESS;
}

ep_status_t ep_low_latency_combine_hook(ep_group_t g, ep_ll_handle_t h, const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(check_handle(g, h));
    if (!h->combine_recv_pending)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "hook: this combine's receive already ran (or it had no hook)");
    EP_CHECK(check_window_current(g, h));
    EP_CHECK(check_turns(g->ll_combine_seq, h->combine_seq, "hook", "combine", "combines", "staging half"));
    EP_CHECK(run(g, launch, launch_combine_recv, &h->combine, "low-latency combine receive"));
    h->combine_recv_pending = 0;
    return EP_SUCCESS;
}

ep_status_t ep_ll_handle_destroy(ep_ll_handle_t h) {
    ep_clear_error();
    if (h == NULL)
        return EP_SUCCESS;
    h->group->live_handles--;
    free(h);
    return EP_SUCCESS;
}

ep_status_t ep_clean_low_latency_buffer(ep_group_t g, int max_tokens, int hidden, int topk, int num_experts,
                                        void *cuda_stream) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(g, "group"));
    EP_CHECK(ep_group_check_usable(g));
    EP_CHECK(ep_group_check_stream(g, (cudaStream_t)cuda_stream, "cuda_stream"));
    EP_CHECK(check_sizes(g->num_ranks, max_tokens, hidden, 128, topk, num_experts, "hidden", "num_topk"));
    size_t bytes = ep_low_latency_buffer_bytes(g->num_ranks, max_tokens, hidden, topk, num_experts);
    if (bytes > g->config.num_nvl_bytes)
        return ep_fail(EP_ERROR_BUFFER_TOO_SMALL,
                       "clean_low_latency_buffer: %zu bytes needed for T=%d, H=%d, K=%d, E=%d, the group has "
                       "num_nvl_bytes = %zu (ep_low_latency_buffer_bytes)",
                       bytes, max_tokens, hidden, topk, num_experts, g->config.num_nvl_bytes);
    int previous;
    EP_CHECK(ep_device_enter(g->device, &previous));
    /* after this rank's last high-throughput reads, which may still run on the group's stream */
    ep_status_t st = ep_group_order(g, g->stream, (cudaStream_t)cuda_stream);
    cudaError_t err = cudaSuccess;
    if (st == EP_SUCCESS)
        err = cudaMemsetAsync((char *)g->window_mem + EP_CTRL_BYTES, 0, bytes, (cudaStream_t)cuda_stream);
    ep_device_restore(previous);
    EP_CHECK(st);
    if (err != cudaSuccess)
        return ep_cuda_fail(err, "cudaMemsetAsync (clean_low_latency_buffer)", __FILE__, __LINE__);
    g->ll_window_gen++;                         /* low-latency handles from before refer to what is wiped here */
    EP_CHECK(ep_group_barrier(g, cuda_stream)); /* no rank writes into a wiped half before every rank wiped */
    g->data_mode = EP_DATA_LL;                  /* that barrier also ends high-throughput use (ep_launch_enter_mode) */
    return EP_SUCCESS;
}
