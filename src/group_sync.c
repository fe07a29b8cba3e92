/* Waiting, ordering and error reporting for a group: every host wait has a deadline, and every error the
 * device records (a timeout naming the rank and stage) becomes the group's sticky status. */
#define _POSIX_C_SOURCE 200809L
#include "check.h"
#include "error.h"
#include "group.h"
#include "kernels/group_kernels.h"
#include "kernels/ht_layout.h"
#include "kernels/ll_layout.h"
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

/* Host waits get this much beyond the device timeout, so that the device (which knows which peer it waited
 * for) reports first. */
#define EP_HOST_WAIT_MARGIN_MS 5000

int64_t ep_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Polls briefly at first (most waits are short), then backs off to at most 1 ms. */
static void backoff_sleep(int *round) {
    if (*round < 64) {
        (*round)++;
        return;
    }
    long ns = *round < 200 ? 20000 : 1000000;
    (*round)++;
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

const char *ep_stage_name(int stage) {
    switch (stage) {
    case EP_STAGE_GROUP_BARRIER: return "group barrier";
    case EP_STAGE_DESTROY_BARRIER: return "destroy handshake";
    case EP_STAGE_LAYOUT: return "dispatch layout";
    case EP_STAGE_DISPATCH_NOTIFY: return "dispatch (count exchange)";
    case EP_STAGE_DISPATCH_SEND: return "dispatch (send)";
    case EP_STAGE_COMBINE_SEND: return "combine (send)";
    case EP_STAGE_LL_DISPATCH_RECV: return "low-latency dispatch (receive)";
    case EP_STAGE_LL_COMBINE_RECV: return "low-latency combine (receive)";
    case EP_STAGE_LL_DISPATCH_SEND: return "low-latency dispatch (send)";
    case EP_STAGE_MODE_SWITCH: return "switch between high-throughput and low-latency mode";
    case EP_STAGE_LL_COMBINE_WEIGHTS: return "low-latency combine send (waiting for a source's weights)";
    default: return "unknown stage";
    }
}

ep_status_t ep_nccl_complete(ncclComm_t comm, ncclResult_t res, int64_t timeout_ms, const char *what) {
    if (res != ncclSuccess && res != ncclInProgress)
        return ep_fail(EP_ERROR_NCCL, "%s failed: %s (NCCL %d)", what, ncclGetErrorString(res), (int)res);
    if (comm == NULL)
        return EP_SUCCESS;
    int64_t deadline = ep_now_ms() + timeout_ms;
    int round = 0;
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(comm, &state);
        if (q != ncclSuccess)
            return ep_fail(EP_ERROR_NCCL, "%s: ncclCommGetAsyncError failed: %s", what, ncclGetErrorString(q));
        if (state == ncclSuccess)
            return EP_SUCCESS;
        if (state != ncclInProgress)
            return ep_fail(EP_ERROR_NCCL, "%s failed: %s (NCCL %d)", what, ncclGetErrorString(state), (int)state);
        if (ep_now_ms() > deadline)
            return ep_fail(EP_ERROR_TIMEOUT, "%s did not complete within %lld ms (a peer did not arrive?)", what,
                           (long long)timeout_ms);
        backoff_sleep(&round);
    }
}

ep_status_t ep_group_mark_failed(ep_group_t g, ep_status_t status) {
    if (g->failed == EP_SUCCESS) {
        g->failed = status;
        snprintf(g->failed_message, sizeof(g->failed_message), "%s", ep_last_error());
        ep_log(EP_LOG_WARN, g->rank, g->device, "group failed: %s", g->failed_message);
    }
    return status;
}

_Static_assert(EP_DEV_STATUS_TIMEOUT == EP_ERROR_TIMEOUT, "device and host timeout status differ");
_Static_assert(EP_DEV_STATUS_OVERRUN == EP_ERROR_DEVICE_INPUT, "device and host overrun status differ");
_Static_assert(EP_DEV_STATUS_MISMATCH == EP_ERROR_INVALID_ARGUMENT, "device and host mismatch status differ");

/* The message of a low-latency layout mismatch (ll_dispatch.cu, layout_differs). */
static void fail_layout_mismatch(const volatile ep_dev_error_t *e) {
    int t[2], h[2], k[2], x[2], f[2];
    ep_ll_unpack_layout(e->detail, &t[0], &h[0], &k[0], &x[0], &f[0]);
    ep_ll_unpack_layout(e->waited_ns, &t[1], &h[1], &k[1], &x[1], &f[1]);
    ep_fail(EP_ERROR_INVALID_ARGUMENT,
            "rank %d: stage '%s': rank %d called the low-latency dispatch with num_max_dispatch_tokens_per_rank=%d, "
            "hidden=%d, num_topk=%d, num_experts=%d, use_fp8=%d, round_scale=%d, use_ue8m0=%d, this rank with %d, "
            "%d, %d, %d, %d, %d, %d: every rank must pass the same (its rows were not read)",
            (int)e->rank, ep_stage_name(e->stage), (int)e->peer, t[0], h[0], k[0], x[0], !!(f[0] & EP_LL_FMT_FP8),
            !!(f[0] & EP_LL_FMT_ROUND_SCALE), !!(f[0] & EP_LL_FMT_UE8M0), t[1], h[1], k[1], x[1],
            !!(f[1] & EP_LL_FMT_FP8), !!(f[1] & EP_LL_FMT_ROUND_SCALE), !!(f[1] & EP_LL_FMT_UE8M0));
}

ep_status_t ep_group_take_device_error(ep_group_t g) {
    volatile ep_dev_error_t *e = &g->mapped_host->error;
    int32_t status = e->status;
    if (status == 0)
        return EP_SUCCESS;
    /* The device is writing the details (a few stores): wait for it to publish the status, briefly. */
    for (int64_t until = ep_now_ms() + 100; status == EP_DEV_ERROR_WRITING && ep_now_ms() < until;)
        status = e->status;
    if (status == EP_DEV_ERROR_WRITING) {
        ep_fail(EP_ERROR_INTERNAL, "rank %d: the device began recording an error but did not finish", g->rank);
        return ep_group_mark_failed(g, EP_ERROR_INTERNAL);
    }
    if (status == EP_DEV_STATUS_MISMATCH && e->peer >= 0 &&
        (e->stage == EP_STAGE_LL_COMBINE_RECV || e->stage == EP_STAGE_LL_COMBINE_WEIGHTS))
        ep_fail((ep_status_t)status,
                "rank %d: stage '%s': rank %d sent %s, this rank expected %s: EPCOMM_LL_COMBINE_PER_RANK must be "
                "set alike on every rank",
                (int)e->rank, ep_stage_name(e->stage), (int)e->peer,
                e->detail ? "one sum per token (per-rank combine)" : "one row per (token, k)",
                e->waited_ns ? "one sum per token" : "one row per (token, k)");
    else if (status == EP_DEV_STATUS_MISMATCH && e->peer >= 0)
        fail_layout_mismatch(e);
    else if (status == EP_DEV_STATUS_OVERRUN && e->peer >= 0) /* ep_flag_overrun */
        ep_fail((ep_status_t)status,
                "rank %d: stage '%s': rank %d had already sent a later call's data (epoch %llu, this call's %llu) "
                "into the buffer half this call reads, overwriting this call's: this rank read it only after a "
                "peer's next call on the same half (more than two low-latency results alive across the group)",
                (int)e->rank, ep_stage_name(e->stage), (int)e->peer, (unsigned long long)(e->detail >> 32),
                (unsigned long long)(e->detail & 0xffffffffu));
    else if (e->peer >= 0)
        ep_fail((ep_status_t)status,
                "rank %d: timed out after %.1f ms in stage '%s' waiting for rank %d "
                "(epoch %llu)",
                (int)e->rank, (double)e->waited_ns / 1e6, ep_stage_name(e->stage), (int)e->peer,
                (unsigned long long)e->detail);
    else
        ep_fail((ep_status_t)status, "rank %d: device error in stage '%s' (detail %llu)", (int)e->rank,
                ep_stage_name(e->stage), (unsigned long long)e->detail);
    return ep_group_mark_failed(g, (ep_status_t)status);
}

/* One side of a dispatch mismatch, as "hidden=7168, x float8_e4m3fn with 56 float32 scales per token,
 * num_topk=8, with topk_weights, num_experts=256". */
static void describe_call(uint64_t word, char *out, size_t size) {
    const ep_ht_call_t c = ep_ht_unpack_call(word);
    char x[64] = "x bfloat16", topk[32] = "no topk_idx";
    if (c.fp8)
        snprintf(x, sizeof(x), "x float8_e4m3fn with %d %s scales per token", c.num_scales,
                 c.int_scales ? "int32 (packed UE8M0)" : "float32");
    if (c.topk)
        snprintf(topk, sizeof(topk), "num_topk=%d", c.topk);
    snprintf(out, size, "hidden=%lld, %s, %s, %s topk_weights, num_experts=%d", (long long)c.hidden, x, topk,
             c.weights ? "with" : "without", c.num_experts);
}

/* The message of a dispatch whose call differs from a peer's (ht_notify.cu). */
static ep_status_t fail_call_mismatch(int rank, const char *op, int peer, uint64_t theirs, uint64_t mine) {
    char a[160], b[160];
    describe_call(theirs, a, sizeof(a));
    describe_call(mine, b, sizeof(b));
    return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                   "rank %d: %s: rank %d called dispatch with %s; this rank with %s: every rank must pass the same; "
                   "nothing was sent",
                   rank, op, peer, a, b);
}

/* The message of a cached dispatch or a combine whose sizes differ from a peer's (found at the barrier after the
 * send, ht_layout.h's EP_HT_SEND_* words): the rows went out, so the results are not valid. A peer at another
 * barrier is out of step with this rank (one made a call the other did not): the group fails. */
static ep_status_t fail_send_mismatch(ep_group_t g, const char *op, int peer, uint64_t theirs, uint64_t mine) {
    const int rank = g->rank;
    const uint64_t tags = EP_HT_SEND_DISPATCH | EP_HT_SEND_COMBINE | EP_BARRIER_PLAIN;
    if ((theirs & tags) != (mine & tags) || (mine & EP_BARRIER_PLAIN)) {
        ep_fail(EP_ERROR_INVALID_ARGUMENT,
                "rank %d: %s: rank %d was in another call at this point: every rank must make the same calls in the "
                "same order; this call's results are not valid, and the ranks are out of step",
                rank, op, peer);
        return ep_group_mark_failed(g, EP_ERROR_INVALID_ARGUMENT);
    }
    if (mine & EP_HT_SEND_COMBINE)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "rank %d: %s: rank %d combined rows of hidden=%lld %s topk_weights, this rank hidden=%lld %s: "
                       "every rank must pass the same; the combined output is not valid",
                       rank, op, peer, (long long)(theirs & 0xffffff), (theirs >> 24 & 1) ? "with" : "without",
                       (long long)(mine & 0xffffff), (mine >> 24 & 1) ? "with" : "without");
    char a[160], b[160];
    describe_call(theirs & ~EP_HT_SEND_DISPATCH, a, sizeof(a));
    describe_call(mine & ~EP_HT_SEND_DISPATCH, b, sizeof(b));
    return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                   "rank %d: %s: rank %d made a cached dispatch with %s; this rank with %s: every rank must pass the "
                   "same; the received rows are not valid",
                   rank, op, peer, a, b);
}

/* A dispatch (count exchange) or combine that would overflow a receiver's region; for a dispatch, the bytes its
 * rows need (from the call word, as ep_normal_buffer_bytes counts them). */
static ep_status_t fail_capacity(ep_group_t g, int stage, const char *op, int peer, int64_t rows, int64_t have) {
    char need[96] = "";
    if (stage == EP_STAGE_DISPATCH_NOTIFY && rows <= INT32_MAX) {
        const ep_ht_call_t c = ep_ht_unpack_call(g->notify_call_word);
        snprintf(need, sizeof(need), "; num_nvl_bytes must be at least %zu (ep_normal_buffer_bytes)",
                 ep_normal_buffer_bytes(1, (int)rows, (int)c.hidden, c.fp8 ? 1 : 2, c.num_scales, c.topk));
    }
    return ep_fail(EP_ERROR_BUFFER_TOO_SMALL,
                   "rank %d: %s: rank %d must receive %lld rows but its buffer holds %lld%s; nothing was sent (use a "
                   "larger num_nvl_bytes, see the size hints, or a larger num_worst_tokens)",
                   g->rank, op, peer, (long long)rows, (long long)have, need);
}

ep_status_t ep_group_take_input_error(ep_group_t g) {
    volatile ep_dev_input_error_t *e = &g->mapped_host->input_error;
    uint32_t count = e->count;
    if (count == 0)
        return EP_SUCCESS;
    ep_status_t st = EP_ERROR_DEVICE_INPUT;
    const char *op = ep_stage_name(e->op);
    switch (e->kind) {
    case EP_INPUT_CAPACITY: st = fail_capacity(g, e->op, op, (int)e->k, e->value, e->token); break;
    case EP_INPUT_CALL_MISMATCH:
        st = fail_call_mismatch(g->rank, op, (int)e->k, (uint64_t)e->value, (uint64_t)e->token);
        break;
    case EP_INPUT_SEND_MISMATCH:
        st = fail_send_mismatch(g, op, (int)e->k, (uint64_t)e->value, (uint64_t)e->token);
        break;
    case EP_INPUT_WORST_MISMATCH:
        st = ep_fail(EP_ERROR_INVALID_ARGUMENT,
                     "rank %d: %s: rank %d called dispatch with num_worst_tokens=%lld, this rank with %lld: every "
                     "rank must pass the same; nothing was sent",
                     g->rank, op, (int)e->k, (long long)e->value, (long long)e->token);
        break;
    case EP_INPUT_LAYOUT_MISMATCH:
        st = ep_fail(EP_ERROR_DEVICE_INPUT,
                     "rank %d: %s: is_token_in_rank sends %lld tokens to rank %d but "
                     "num_tokens_per_rank says %lld; nothing was sent (pass the layout of the same topk_idx)",
                     g->rank, op, (long long)e->value, (int)e->k, (long long)e->token);
        break;
    default:
        st = ep_fail(EP_ERROR_DEVICE_INPUT,
                     "rank %d: %s: topk_idx[%lld, %d] = %lld is outside [-1, num_experts) "
                     "(%u bad entries, skipped)",
                     g->rank, op, (long long)e->token, (int)e->k, (long long)e->value, count);
    }
    memset((void *)e, 0, sizeof(*e));
    return st;
}

ep_status_t ep_group_check_usable(ep_group_t g) {
    if (g->failed != EP_SUCCESS)
        return ep_fail(g->failed, "%s (the group failed earlier; only ep_group_destroy is allowed)", g->failed_message);
    return ep_group_take_device_error(g);
}

ep_status_t ep_group_order(ep_group_t g, cudaStream_t from, cudaStream_t to) {
    if (from == to)
        return EP_SUCCESS;
    EP_CUDA_CHECK(cudaEventRecord(g->order_event, from));
    EP_CUDA_CHECK(cudaStreamWaitEvent(to, g->order_event, 0));
    return EP_SUCCESS;
}

int64_t ep_host_wait_limit_ms(ep_group_t g) {
    return g->timeout_ms + EP_HOST_WAIT_MARGIN_MS;
}

ep_status_t ep_group_wait_stream(ep_group_t g, cudaStream_t stream, const char *stage) {
    cudaEvent_t ev;
    EP_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    cudaError_t err = cudaEventRecord(ev, stream);
    int64_t limit = ep_host_wait_limit_ms(g);
    int64_t deadline = ep_now_ms() + limit;
    int round = 0;
    while (err == cudaSuccess) {
        err = cudaEventQuery(ev);
        if (err == cudaErrorNotReady) {
            if (ep_now_ms() > deadline) {
                cudaEventDestroy(ev);
                ep_fail(EP_ERROR_TIMEOUT,
                        "rank %d: host wait for stage '%s' timed out after %lld ms (the device "
                        "is still busy)",
                        g->rank, stage, (long long)limit);
                return ep_group_mark_failed(g, EP_ERROR_TIMEOUT);
            }
            backoff_sleep(&round);
            err = cudaSuccess;
            continue;
        }
        break;
    }
    cudaEventDestroy(ev);
    if (err != cudaSuccess) {
        ep_cuda_fail(err, "waiting for the device", __FILE__, __LINE__);
        return ep_group_mark_failed(g, EP_ERROR_CUDA);
    }
    return EP_SUCCESS;
}

ep_status_t ep_group_check_stream(ep_group_t g, cudaStream_t stream, const char *name) {
    if (stream == NULL)
        return EP_SUCCESS; /* the legacy default stream of the current (group's) device */
    /* A capturing stream may not be asked for its device (that would invalidate the capture). */
    enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture != cudaStreamCaptureStatusNone)
        return EP_SUCCESS;
    cudaGetLastError();
    int device = -1;
    cudaError_t err = cudaStreamGetDevice(stream, &device);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: not a valid CUDA stream (%s)", name, cudaGetErrorString(err));
    }
    if (device != g->device)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "%s: the stream belongs to CUDA device %d, expected the group's "
                       "device %d",
                       name, device, g->device);
    return EP_SUCCESS;
}

ep_status_t ep_group_barrier(ep_group_t group, void *cuda_stream) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_group_check_usable(group));
    cudaStream_t user = (cudaStream_t)cuda_stream;
    EP_CHECK(ep_group_check_stream(group, user, "cuda_stream"));
    int previous;
    EP_CHECK(ep_device_enter(group->device, &previous));
    cudaGetLastError(); /* a stale error of the caller's must not be taken for our launch's */
    ep_status_t st = ep_group_order(group, user, group->stream);
    if (st == EP_SUCCESS) {
        cudaError_t err = ep_launch_barrier(&group->dev, EP_STAGE_GROUP_BARRIER,
                                            ep_plain_barrier_word(EP_STAGE_GROUP_BARRIER), group->stream);
        if (err != cudaSuccess)
            st = ep_cuda_fail(err, "barrier kernel launch", __FILE__, __LINE__);
    }
    if (st == EP_SUCCESS)
        st = ep_group_order(group, group->stream, user);
    ep_device_restore(previous);
    return st == EP_SUCCESS ? st : ep_group_mark_failed(group, st); /* the barrier may be enqueued: out of step */
}

/* A failed group's stream still drains (bounded: its kernels stop waiting once the device has recorded an error,
 * and every wait has a timeout), so that the group can be destroyed afterwards. */
static void drain_failed(ep_group_t g) {
    int previous;
    if (ep_device_enter(g->device, &previous) != EP_SUCCESS)
        return;
    ep_group_wait_stream(g, g->stream, "synchronize (draining a failed group)");
    ep_device_restore(previous);
}

ep_status_t ep_group_synchronize(ep_group_t group, void *cuda_stream) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    if (group->failed != EP_SUCCESS) {
        drain_failed(group);
        return ep_group_check_usable(group);
    }
    EP_CHECK(ep_group_check_stream(group, (cudaStream_t)cuda_stream, "cuda_stream"));
    int previous;
    EP_CHECK(ep_device_enter(group->device, &previous));
    ep_status_t st = ep_group_wait_stream(group, (cudaStream_t)cuda_stream, "synchronize (caller stream)");
    if (st == EP_SUCCESS)
        st = ep_group_wait_stream(group, group->stream, "synchronize (communication stream)");
    ep_device_restore(previous);
    /* A device error explains a host timeout better than the timeout itself. */
    ep_status_t device_st = ep_group_take_device_error(group);
    if (device_st != EP_SUCCESS)
        return device_st;
    return st != EP_SUCCESS ? st : ep_group_take_input_error(group);
}

ep_status_t ep_group_get_async_error(ep_group_t group) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    return ep_group_check_usable(group);
}
