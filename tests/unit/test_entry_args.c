/* The bad inputs SPEC.md lists, at the entry points that take them (ep_dispatch, ep_combine,
 * ep_low_latency_dispatch), host only: a group with nothing but its host-mapped error record, so nothing could be
 * launched. Each case starts from arguments that pass every check, changes one thing and expects the status and
 * a message naming the argument and what was expected. Every call also carries a launch that is refused after the
 * argument checks (async_finish without an event): the control case shows that the unchanged arguments get that
 * far, so a case passes only through its own check. */
#include "check.h"
#include "error.h"
#include "group.h"
#include "handle.h"
#include "launch.h"
#include "tcheck.h"

enum { R = 2, N = 8, H = 256, K = 4, E = 8 };

static _Alignas(256) char mem[256]; /* every tensor's data: never read, the checks look at descriptors only */

typedef struct {
    ep_mapped_t mapped;
    struct ep_group g;
    struct ep_group other;
    struct ep_handle h; /* of a dispatch on g with N tokens, K experts per token, N rows received */
    ep_launch_t late_refusal;
} fake_t;

static void fake(fake_t *f) {
    memset(f, 0, sizeof(*f));
    f->g.mapped_host = &f->mapped;
    f->g.num_ranks = R;
    f->g.config.num_nvl_bytes = (size_t)1 << 30;
    f->h.group = &f->g;
    f->h.num_tokens = N, f->h.num_recv = -1, f->h.num_rows = N, f->h.num_experts = E, f->h.topk = K;
    f->late_refusal = (ep_launch_t)EP_LAUNCH_INIT;
    f->late_refusal.async_finish = 1; /* and no finish_event */
}

#define LATE "launch.finish_event"

/* ---- ep_dispatch ---- */

static ep_dispatch_args_t good_dispatch(void) {
    ep_dispatch_args_t a = EP_DISPATCH_ARGS_INIT;
    a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, H);
    a.topk_idx = ep_tensor_2d(mem, EP_DTYPE_INT64, N, K);
    a.topk_weights = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, K);
    a.num_tokens_per_rank = ep_tensor_1d(mem, EP_DTYPE_INT32, R);
    a.is_token_in_rank = ep_tensor_2d(mem, EP_DTYPE_BOOL, N, R);
    a.num_tokens_per_expert = ep_tensor_1d(mem, EP_DTYPE_INT32, E);
    a.num_experts = E;
    a.expert_alignment = 1;
    return a;
}

static void expect_dispatch(fake_t *f, const ep_dispatch_args_t *a, ep_status_t status, const char *message) {
    ep_dispatch_result_t r = EP_DISPATCH_RESULT_INIT;
    TCHECK_EQ_INT(ep_dispatch(&f->g, a, &r, &f->late_refusal), status);
    TCHECK_STR_CONTAINS(ep_last_error(), message);
    TCHECK(r.handle == NULL, "a refused dispatch returned a handle");
    /* refused before it began: low-latency handles are still current */
    TCHECK_EQ_INT((int)f->g.ll_window_gen, 0);
}

static void dispatch_bad_inputs(void) {
    fake_t f;
    fake(&f);
    ep_dispatch_args_t a = good_dispatch();
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE); /* control */

    a = good_dispatch(), a.x.dtype = EP_DTYPE_FLOAT32;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: expected dtype bfloat16 or float8_e4m3fn, got float32");
    a = good_dispatch(), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 12);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: stride 0 (12 elements = 24 bytes) is not a multiple of 16");
    a.x.strides[0] = 16; /* rows 16-byte aligned, but 24 bytes long */
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: rows must be a multiple of 16 bytes");
    a = good_dispatch(), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 0);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x.shape[1] (hidden): expected a value in [1, 16777215], got 0");
    a = good_dispatch(), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 1 << 24); /* beyond the call word's 24 bits */
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x.shape[1] (hidden): expected a value in [1, 16777215]");
    a = good_dispatch(), a.x.strides[1] = 2;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x:");
    a = good_dispatch(), a.x_scales = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, H / 128);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x_scales: expected none for bfloat16 x");
    a = good_dispatch(), a.x.dtype = EP_DTYPE_FLOAT8_E4M3;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x_scales: float8_e4m3fn x needs its scales");
    a = good_dispatch(), a.x.dtype = EP_DTYPE_FLOAT8_E4M3, a.x_scales = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N - 1, 2);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x_scales: expected shape");
    a = good_dispatch(), a.topk_idx = ep_tensor_2d(mem, EP_DTYPE_INT64, N, 33);
    a.topk_weights = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, 33);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_idx.shape[1] (num_topk): expected a value in [1, 32]");
    a = good_dispatch(), a.topk_idx.dtype = EP_DTYPE_INT32;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_idx: expected dtype int64");
    a = good_dispatch(), a.topk_weights = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, K + 1);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_weights: expected shape");
    a = good_dispatch(), a.topk_idx = (ep_tensor_t){0};
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_weights: given without topk_idx");
    a = good_dispatch(), a.num_experts = 7, a.num_tokens_per_expert.shape[0] = 7;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_experts (must divide evenly over the ranks)");
    a = good_dispatch(), a.num_experts = 1;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_experts: expected a value in [2, 6144]");
    a = good_dispatch(), a.num_tokens_per_expert.shape[0] = E + R;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_tokens_per_expert: expected shape");
    a = good_dispatch(), a.is_token_in_rank = ep_tensor_2d(mem, EP_DTYPE_BOOL, N, R + 1);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "is_token_in_rank: expected shape");
    a = good_dispatch(), a.num_tokens_per_rank.dtype = EP_DTYPE_INT64;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_tokens_per_rank: expected dtype int32");
    a = good_dispatch(), a.expert_alignment = 0;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "expert_alignment: expected a value in [1,");
    a = good_dispatch(), a.num_sms = -1;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_sms: expected a value in [0, 1024]");
    a = good_dispatch(), a.num_worst_tokens = -1;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_worst_tokens: expected a value in [0,");
    /* Too small a buffer for the rows asked for: names the size needed. */
    f.g.config.num_nvl_bytes = ep_normal_buffer_bytes(R, N, H, 2, 0, K);
    a = good_dispatch(), a.num_worst_tokens = 1 << 20;
    expect_dispatch(&f, &a, EP_ERROR_BUFFER_TOO_SMALL, "num_nvl_bytes must be at least");
}

static void cached_dispatch_bad_inputs(void) {
    fake_t f;
    fake(&f);
    ep_dispatch_args_t a = good_dispatch();
    a.cached_handle = &f.h;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE); /* control */
    f.h.group = &f.other;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "cached_handle: it belongs to another group");
    f.h.group = &f.g;
    a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N - 1, H);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: the cached handle routes 8 tokens, got 7");
    a = good_dispatch(), a.cached_handle = &f.h, a.topk_idx = (ep_tensor_t){0};
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_weights: a cached dispatch that sends weights needs");
    a = good_dispatch(), a.cached_handle = &f.h, a.num_worst_tokens = 2 * N; /* the handle has 0 */
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_worst_tokens: the cached handle was made with 0, got 16");
    a = good_dispatch(), a.cached_handle = &f.h, a.topk_idx = ep_tensor_2d(mem, EP_DTYPE_INT64, N, K + 1);
    a.topk_weights = (ep_tensor_t){0};
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_idx: expected shape");
    /* The handle's rows at this call's row size must fit every receiver: with its counts (rank 1 receives the
     * most), and with num_worst_tokens (which bounds every rank's). */
    f.g.config.num_nvl_bytes = ep_normal_buffer_bytes(1, 3 * N, H, 2, 0, K);
    f.h.num_recv = N;
    f.h.counts[0 * R + 1] = 2 * N, f.h.counts[1 * R + 1] = N, f.h.counts[0] = N;
    a = good_dispatch(), a.cached_handle = &f.h;
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE); /* 3N rows of H fit */
    a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 2 * H);
    expect_dispatch(&f, &a, EP_ERROR_BUFFER_TOO_SMALL, "x: the cached handle sends rank 1 24 rows, but at hidden=512");
    f.h.num_recv = -1, f.h.num_worst_tokens = 3 * N;
    expect_dispatch(&f, &a, EP_ERROR_BUFFER_TOO_SMALL, "sends every rank (num_worst_tokens) 24 rows");
}

/* ---- ep_combine ---- */

static ep_combine_args_t good_combine(fake_t *f) {
    ep_combine_args_t a = EP_COMBINE_ARGS_INIT;
    a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, H); /* the handle's N rows received */
    a.topk_weights = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, K);
    a.bias0 = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, H);
    a.out = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, H);
    a.out_topk_weights = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, K);
    a.handle = &f->h;
    return a;
}

static void expect_combine(fake_t *f, const ep_combine_args_t *a, ep_status_t status, const char *message) {
    TCHECK_EQ_INT(ep_combine(&f->g, a, &f->late_refusal), status);
    TCHECK_STR_CONTAINS(ep_last_error(), message);
}

static void combine_bad_inputs(void) {
    fake_t f;
    fake(&f);
    ep_combine_args_t a = good_combine(&f);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE); /* control */

    a = good_combine(&f), a.handle = NULL;
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "handle: expected a non-NULL pointer");
    f.h.group = &f.other;
    a = good_combine(&f);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "handle: it belongs to another group");
    f.h.group = &f.g;
    a = good_combine(&f), a.x.dtype = EP_DTYPE_FLOAT8_E4M3;
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: expected dtype bfloat16");
    a = good_combine(&f), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N + 1, H);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: expected shape");
    a = good_combine(&f), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 12), a.bias0 = (ep_tensor_t){0};
    a.out = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 12), a.x.strides[0] = 16;
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x: rows must be a multiple of 16 bytes");
    a = good_combine(&f), a.topk_weights = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, K - 1);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_weights: expected shape");
    a = good_combine(&f), a.bias0 = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, H / 2);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "bias0: expected shape");
    a = good_combine(&f), a.bias1 = ep_tensor_2d(mem, EP_DTYPE_FLOAT32, N, H);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "bias1: expected dtype bfloat16");
    a = good_combine(&f), a.out = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N - 1, H);
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "out: expected shape");
    a = good_combine(&f), a.out_topk_weights = (ep_tensor_t){0};
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "out_topk_weights:");
    a = good_combine(&f), a.num_sms = 4096;
    expect_combine(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_sms: expected a value in [0, 1024]");
    /* Counts known on the host: more rows coming back to a rank than the combine buffer holds. */
    f.h.num_recv = N;
    f.h.counts[0] = 1 << 24; /* rank 0 sends this many rows to rank 0 */
    f.g.config.num_nvl_bytes = ep_normal_buffer_bytes(R, N, H, 2, 0, K);
    a = good_combine(&f);
    expect_combine(&f, &a, EP_ERROR_BUFFER_TOO_SMALL, "combine: rank 0 gets back 16777216 rows");
}

/* ---- ep_low_latency_dispatch ---- */

enum { T = 16, LL_H = 512, L = E / R };

static ep_low_latency_dispatch_args_t good_ll(void) {
    ep_low_latency_dispatch_args_t a = EP_LOW_LATENCY_DISPATCH_ARGS_INIT;
    a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, LL_H);
    a.topk_idx = ep_tensor_2d(mem, EP_DTYPE_INT64, N, K);
    a.max_tokens = T, a.num_experts = E, a.use_fp8 = 1, a.round_scale = 1, a.use_ue8m0 = 1;
    a.recv_x = ep_tensor_3d(mem, EP_DTYPE_FLOAT8_E4M3, L, R * T, LL_H);
    a.recv_x_scales = ep_tensor_3d(mem, EP_DTYPE_INT32, L, LL_H / 512, R * T); /* DeepEP's [L, R*T, S] transposed */
    a.recv_count = ep_tensor_1d(mem, EP_DTYPE_INT32, L);
    a.src_info = ep_tensor_2d(mem, EP_DTYPE_INT32, L, R * T);
    a.layout_range = ep_tensor_2d(mem, EP_DTYPE_INT64, L, R);
    return a;
}

static void expect_ll(fake_t *f, const ep_low_latency_dispatch_args_t *a, ep_status_t status, const char *message) {
    ep_ll_handle_t h = NULL;
    TCHECK_EQ_INT(ep_low_latency_dispatch(&f->g, a, &h, &f->late_refusal), status);
    TCHECK_STR_CONTAINS(ep_last_error(), message);
    TCHECK(h == NULL, "a refused low-latency dispatch returned a handle");
}

static void low_latency_dispatch_bad_inputs(void) {
    fake_t f;
    fake(&f);
    ep_low_latency_dispatch_args_t a = good_ll();
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE); /* control */

    a = good_ll(), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, T + 1, LL_H);
    a.topk_idx = ep_tensor_2d(mem, EP_DTYPE_INT64, T + 1, K);
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT,
              "x.shape[0] (num_tokens, at most num_max_dispatch_tokens_per_rank): expected a value in [0, 16]");
    a = good_ll(), a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 384); /* a multiple of 128, not of 512 */
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x.shape[1] (hidden): expected a multiple of 512, got 384");
    a = good_ll(), a.use_fp8 = 0, a.use_ue8m0 = 0, a.x = ep_tensor_2d(mem, EP_DTYPE_BFLOAT16, N, 192);
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "x.shape[1] (hidden): expected a multiple of 128, got 192");
    a = good_ll(), a.round_scale = 0;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "use_ue8m0: needs round_scale");
    a = good_ll(), a.topk_idx = ep_tensor_2d(mem, EP_DTYPE_INT64, N, 17);
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "topk_idx.shape[1] (num_topk): expected a value in [1, 16], got 17");
    a = good_ll(), a.max_tokens = 0;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_max_dispatch_tokens_per_rank: expected a value in [1,");
    a = good_ll(), a.num_experts = 9;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "num_experts (must divide evenly over the ranks)");
    a = good_ll(), a.recv_x.dtype = EP_DTYPE_BFLOAT16;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "recv_x: expected dtype float8_e4m3fn");
    a = good_ll(), a.recv_x_scales = (ep_tensor_t){0};
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "recv_x_scales:");
    a = good_ll(), a.src_info = ep_tensor_2d(mem, EP_DTYPE_INT32, L, T);
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "src_info: expected shape");
    /* The outputs are written without strides: any other layout is refused (a broadcast one would be written
     * past its memory). */
    a = good_ll(), a.src_info.strides[0] = 0;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT,
              "src_info: expected a contiguous tensor (strides [32, 1]), got "
              "strides [0, 1]");
    a = good_ll(), a.layout_range.strides[0] = R + 2;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "layout_range: expected a contiguous tensor");
    a = good_ll(), a.recv_count.strides[0] = 2;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "recv_count: expected a contiguous tensor");
    a = good_ll(), a.recv_x.strides[0] = (int64_t)(R * T + 1) * LL_H;
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "recv_x: expected a contiguous tensor");
    a = good_ll(), a.use_ue8m0 = 0, a.recv_x_scales = ep_tensor_3d(mem, EP_DTYPE_FLOAT32, L, LL_H / 128, R * T);
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE);                      /* float32 scales, contiguous */
    a.recv_x_scales.strides[1] = 1, a.recv_x_scales.strides[2] = LL_H / 128; /* DeepEP's [L, R*T, S] as given */
    expect_ll(&f, &a, EP_ERROR_INVALID_ARGUMENT, "recv_x_scales: expected a contiguous tensor");
    f.g.config.num_nvl_bytes = ep_low_latency_buffer_bytes(R, T, LL_H, K, E) - 1;
    a = good_ll();
    expect_ll(&f, &a, EP_ERROR_BUFFER_TOO_SMALL, "low-latency buffer:");
    TCHECK_STR_CONTAINS(ep_last_error(), "(ep_low_latency_buffer_bytes)");
}

/* clean_low_latency_buffer checks its sizes (the same as a dispatch's) and the group before it wipes anything. */
static void expect_clean(fake_t *f, int T_, int H_, int K_, int E_, ep_status_t status, const char *message) {
    TCHECK_EQ_INT(ep_clean_low_latency_buffer(&f->g, T_, H_, K_, E_, NULL), status);
    TCHECK_STR_CONTAINS(ep_last_error(), message);
    TCHECK_EQ_INT((int)f->g.ll_window_gen, 0); /* nothing was wiped: handles are still current */
}

static void clean_low_latency_buffer_bad_inputs(void) {
    fake_t f;
    fake(&f);
    expect_clean(&f, 0, LL_H, K, E, EP_ERROR_INVALID_ARGUMENT, "num_max_dispatch_tokens_per_rank: expected a value");
    expect_clean(&f, T, 100, K, E, EP_ERROR_INVALID_ARGUMENT, "hidden: expected a multiple of 128, got 100");
    expect_clean(&f, T, LL_H, 17, E, EP_ERROR_INVALID_ARGUMENT, "num_topk: expected a value in [1, 16], got 17");
    expect_clean(&f, T, LL_H, K, 9, EP_ERROR_INVALID_ARGUMENT, "num_experts (must divide evenly over the ranks)");
    f.g.config.num_nvl_bytes = ep_low_latency_buffer_bytes(R, T, LL_H, K, E) - 1;
    expect_clean(&f, T, LL_H, K, E, EP_ERROR_BUFFER_TOO_SMALL, "bytes needed for T=16, H=512, K=4, E=8, the group has");
    f.g.failed = EP_ERROR_TIMEOUT;
    snprintf(f.g.failed_message, sizeof(f.g.failed_message), "rank 0: timed out");
    expect_clean(&f, T, LL_H, K, E, EP_ERROR_TIMEOUT, "the group failed earlier");
}

/* The mode switch barrier (ep_launch_enter_mode) comes only between the modes: a group's first call and further
 * calls of the same mode launch nothing (this fake group has no device: any launch would fail). */
static void first_call_of_a_mode_needs_no_barrier(void) {
    fake_t f;
    fake(&f);
    ep_launch_frame_t frame = {.opts = EP_LAUNCH_INIT};
    TCHECK_EQ_INT(f.g.data_mode, EP_DATA_NONE);
    TCHECK_EQ_INT(ep_launch_enter_mode(&f.g, &frame, EP_DATA_LL), EP_SUCCESS);
    TCHECK_EQ_INT(f.g.data_mode, EP_DATA_LL);
    TCHECK_EQ_INT(ep_launch_enter_mode(&f.g, &frame, EP_DATA_LL), EP_SUCCESS);
    TCHECK_EQ_INT(f.g.data_mode, EP_DATA_LL);
}

/* A CUDA error once an op began (part of it may be enqueued, and peers pair with that part) fails the group;
 * other statuses at the end of an op (e.g. an abandoned dispatch, the same on every rank) do not. */
static void cuda_error_after_begin_fails_the_group(void) {
    fake_t f;
    fake(&f);
    ep_launch_frame_t frame = {.opts = EP_LAUNCH_INIT, .previous_device = -1}; /* no device to restore */
    ep_fail(EP_ERROR_CUDA, "combine kernels: a fake launch failure");
    TCHECK_EQ_INT(ep_launch_end(&f.g, &frame, EP_ERROR_CUDA), EP_ERROR_CUDA);
    TCHECK_EQ_INT(f.g.failed, EP_ERROR_CUDA);
    TCHECK_STR_CONTAINS(f.g.failed_message, "a fake launch failure");
    fake(&f);
    TCHECK_EQ_INT(ep_launch_end(&f.g, &frame, EP_ERROR_DEVICE_INPUT), EP_ERROR_DEVICE_INPUT);
    TCHECK_EQ_INT(f.g.failed, EP_SUCCESS);
}

/* A tensor with no elements is given even with data NULL (an empty torch tensor's data pointer is 0): a rank
 * with no tokens passes [0, K] topk ids and [0, S] scales, and a rank that received no rows [0, K] weights; each
 * is checked as given (only NULL data with elements to read means "absent"). */
static void empty_tensors_are_given(void) {
    fake_t f;
    fake(&f);
    ep_dispatch_args_t a = good_dispatch();
    a.x = ep_tensor_2d(NULL, EP_DTYPE_BFLOAT16, 0, H);
    a.topk_idx = ep_tensor_2d(NULL, EP_DTYPE_INT64, 0, K);
    a.topk_weights = ep_tensor_2d(NULL, EP_DTYPE_FLOAT32, 0, K);
    a.is_token_in_rank = ep_tensor_2d(NULL, EP_DTYPE_BOOL, 0, R);
    expect_dispatch(&f, &a, EP_ERROR_INVALID_ARGUMENT, LATE); /* every check passed */
    ep_dispatch_args_t b = a;
    b.topk_idx = ep_tensor_2d(NULL, EP_DTYPE_INT64, 0, 33); /* given, so its top-k is checked */
    b.topk_weights = ep_tensor_2d(NULL, EP_DTYPE_FLOAT32, 0, 33);
    expect_dispatch(&f, &b, EP_ERROR_INVALID_ARGUMENT, "topk_idx.shape[1] (num_topk): expected a value in [1, 32]");
    b = a, b.topk_idx = (ep_tensor_t){0};
    expect_dispatch(&f, &b, EP_ERROR_INVALID_ARGUMENT, "topk_weights: given without topk_idx");
    b = a, b.x_scales = ep_tensor_2d(NULL, EP_DTYPE_FLOAT32, 0, H / 128);
    expect_dispatch(&f, &b, EP_ERROR_INVALID_ARGUMENT, "x_scales: expected none for bfloat16 x");
    b.x.dtype = EP_DTYPE_FLOAT8_E4M3;
    expect_dispatch(&f, &b, EP_ERROR_INVALID_ARGUMENT, LATE);

    f.h.num_rows = 0; /* a handle of a dispatch that brought this rank no rows */
    ep_combine_args_t c = good_combine(&f);
    c.x = ep_tensor_2d(NULL, EP_DTYPE_BFLOAT16, 0, H);
    c.topk_weights = ep_tensor_2d(NULL, EP_DTYPE_FLOAT32, 0, K);
    expect_combine(&f, &c, EP_ERROR_INVALID_ARGUMENT, LATE);
    c.out_topk_weights = (ep_tensor_t){0}; /* the weights are given: their sums must have somewhere to go */
    expect_combine(&f, &c, EP_ERROR_INVALID_ARGUMENT, "out_topk_weights: expected dtype float32");
    TCHECK(!ep_tensor_given(&(ep_tensor_t){0}), "a zeroed descriptor is absent");
    TCHECK(!ep_tensor_given(&(ep_tensor_t){.ndim = 2, .shape = {N, K}}), "NULL data with elements is absent");
}

int main(void) {
    TRUN(dispatch_bad_inputs);
    TRUN(cached_dispatch_bad_inputs);
    TRUN(combine_bad_inputs);
    TRUN(low_latency_dispatch_bad_inputs);
    TRUN(clean_low_latency_buffer_bad_inputs);
    TRUN(first_call_of_a_mode_needs_no_barrier);
    TRUN(cuda_error_after_begin_fails_the_group);
    TRUN(empty_tensors_are_given);
    return TDONE();
}
