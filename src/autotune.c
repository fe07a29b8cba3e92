/* ep_autotune_normal: measure the SM budget on the live group instead of guessing it. Each candidate is
 * timed with CUDA events around a cached dispatch plus a combine; ranks agree on the slowest rank's time with
 * all-gather and a max, so every rank picks the same answer. */
#include "check.h"
#include "error.h"
#include "handle.h"
#include "launch.h"

#include <string.h>

#define AUTOTUNE_RUNS 5

static ep_status_t time_candidate(ep_group_t g, const ep_dispatch_args_t *args, ep_handle_t h, int sms, cudaStream_t s,
                                  void *out, cudaEvent_t ev[2], float *us) {
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = s;
    ep_dispatch_args_t da = *args;
    da.cached_handle = h;
    da.num_sms = sms;
    memset(&da.topk_idx, 0, sizeof(da.topk_idx));
    memset(&da.topk_weights, 0, sizeof(da.topk_weights));
    float best = 1e30f;
    for (int run = 0; run < AUTOTUNE_RUNS + 1; run++) {
        ep_dispatch_result_t r = EP_DISPATCH_RESULT_INIT;
        EP_CUDA_CHECK(cudaEventRecord(ev[0], s));
        EP_CHECK(ep_dispatch(g, &da, &r, &l));
        if (args->x.dtype == EP_DTYPE_BFLOAT16) {
            ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
            ca.x = r.recv_x;
            ca.out = ep_tensor_2d(out, EP_DTYPE_BFLOAT16, h->num_tokens, args->x.shape[1]);
            ca.handle = h;
            ca.num_sms = sms;
            EP_CHECK(ep_combine(g, &ca, &l));
        }
        EP_CUDA_CHECK(cudaEventRecord(ev[1], s));
        EP_CHECK(ep_group_wait_stream(g, s, "autotune"));
        float ms = 0;
        EP_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
        if (run > 0 && ms * 1e3f < best) /* the first run warms up */
            best = ms * 1e3f;
    }
    *us = best;
    return EP_SUCCESS;
}

/* The slowest rank's time for each candidate, on every rank. */
static ep_status_t max_over_ranks(ep_group_t g, float *times, int n) {
    float all[EP_MAX_NVL_RANKS * 64]; /* n <= 64 candidates */
    EP_CHECK(ep_group_allgather(g, times, sizeof(float) * (size_t)n, all, "autotune (agreeing on times)"));
    for (int r = 0; r < g->num_ranks; r++)
        for (int i = 0; i < n; i++)
            times[i] = all[r * n + i] > times[i] ? all[r * n + i] : times[i];
    return EP_SUCCESS;
}

/* The first dispatch (its handle is what every candidate's cached dispatch reuses), then every candidate. Once
 * the first dispatch went through, this rank stopping early would leave its peers waiting in the next call:
 * a failure then fails the group. */
static ep_status_t tune(ep_group_t g, const ep_dispatch_args_t *args, const ep_launch_t *launch, const int *candidates,
                        int num_candidates, cudaStream_t s, void *out, cudaEvent_t ev[2], int *best_num_sms,
                        float *best_time_us) {
    ep_dispatch_result_t first = EP_DISPATCH_RESULT_INIT;
    EP_CHECK(ep_dispatch(g, args, &first, launch));
    ep_handle_t h = first.handle;
    float times[64];
    ep_status_t st = EP_SUCCESS;
    for (int i = 0; st == EP_SUCCESS && i < num_candidates; i++)
        st = time_candidate(g, args, h, candidates[i], s, out, ev, &times[i]);
    if (st == EP_SUCCESS)
        st = max_over_ranks(g, times, num_candidates);
    ep_handle_release(h);
    if (st != EP_SUCCESS)
        return ep_group_mark_failed(g, st);
    int best = 0;
    for (int i = 1; i < num_candidates; i++)
        best = times[i] < times[best] ? i : best;
    *best_num_sms = candidates[best];
    if (best_time_us)
        *best_time_us = times[best];
    return EP_SUCCESS;
}

ep_status_t ep_autotune_normal(ep_group_t group, const ep_dispatch_args_t *args, const int *candidates,
                               int num_candidates, int *best_num_sms, float *best_time_us, const ep_launch_t *launch) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(args, "args"));
    EP_CHECK(ep_check_not_null(candidates, "candidates"));
    EP_CHECK(ep_check_not_null(best_num_sms, "best_num_sms"));
    EP_CHECK(ep_check_range(num_candidates, 1, 64, "num_candidates"));
    for (int i = 0; i < num_candidates; i++)
        EP_CHECK(ep_check_range(candidates[i], 1, 1024, "candidates[i]"));
    if (args->cached_handle != NULL || args->num_worst_tokens != 0)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "args: autotune needs a plain dispatch (no cached_handle, "
                                                  "num_worst_tokens 0)");
    ep_launch_frame_t frame;
    EP_CHECK(ep_launch_check(group, launch, &frame));
    cudaStream_t s = (cudaStream_t)frame.opts.stream;
    int previous;
    EP_CHECK(ep_device_enter(group->device, &previous));
    /* What may fail on this rank alone comes before the first collective call. Stream-ordered scratch: a plain
     * cudaFree would wait for the whole device, peers' kernels included. */
    void *out = NULL;
    cudaEvent_t ev[2] = {NULL, NULL};
    ep_status_t st = EP_SUCCESS;
    if (cudaMallocAsync(&out, (size_t)args->x.shape[0] * (size_t)args->x.shape[1] * 2 + 16, s) != cudaSuccess ||
        cudaEventCreate(&ev[0]) != cudaSuccess || cudaEventCreate(&ev[1]) != cudaSuccess)
        st = ep_fail(EP_ERROR_OUT_OF_MEMORY, "autotune: could not allocate its scratch output or events");
    if (st == EP_SUCCESS)
        st = tune(group, args, launch, candidates, num_candidates, s, out, ev, best_num_sms, best_time_us);
    if (out)
        cudaFreeAsync(out, s);
    if (ev[0])
        cudaEventDestroy(ev[0]);
    if (ev[1])
        cudaEventDestroy(ev[1]);
    ep_device_restore(previous);
    return st;
}
