/* Combine's transfer on copy engines (experimental, EPCOMM_HT_COMBINE_CE=1): the rows this rank received from
 * source s are one contiguous run, and they go back to one contiguous run of s's combine region, so with the
 * counts on the host the whole transfer is one peer copy per source, and no SM is held while it runs
 * (PERF.md measured copy engines above the SM-store ceiling). One stream per peer lets the engines run side
 * by side. Falls back to the SM kernel when the counts are not on the host or rows are not contiguous. */
#include "ht_combine_ce.h"

#include "error.h"
#include "kernels/ht_layout.h"

#include <stdlib.h>
#include <string.h>

int ep_ht_combine_ce_wanted(ep_group_t g, const ep_combine_args_t *a) {
    const char *env = getenv("EPCOMM_HT_COMBINE_CE");
    ep_handle_t h = a->handle;
    if (env == NULL || strcmp(env, "1") != 0 || h->num_recv < 0)
        return 0;
    if (a->x.shape[0] > 1 && a->x.strides[0] != a->x.shape[1])
        return 0;
    if (a->topk_weights.data != NULL && a->topk_weights.shape[0] > 1 && a->topk_weights.strides[0] != h->topk)
        return 0;
    return g->num_ranks <= EP_MAX_NVL_RANKS;
}

static cudaError_t ensure_streams(ep_group_t g) {
    if (g->ce_ready)
        return cudaSuccess;
    cudaError_t err = cudaSuccess;
    for (int i = 0; i < EP_MAX_NVL_RANKS && err == cudaSuccess; i++) /* after a failure, only what is missing */
        if (g->ce_streams[i] == NULL)
            err = cudaStreamCreateWithFlags(&g->ce_streams[i], cudaStreamNonBlocking);
    for (int i = 0; i <= EP_MAX_NVL_RANKS && err == cudaSuccess; i++)
        if (g->ce_events[i] == NULL)
            err = cudaEventCreateWithFlags(&g->ce_events[i], cudaEventDisableTiming);
    g->ce_ready = err == cudaSuccess;
    return err;
}

cudaError_t ep_ht_combine_send_ce(ep_group_t g, const ep_combine_args_t *a) {
    ep_handle_t h = a->handle;
    const int R = g->num_ranks, me = g->rank;
    const uint64_t row_bytes = (uint64_t)a->x.shape[1] * 2, K = (uint64_t)h->topk;
    ep_ht_combine_region_t reg = ep_ht_combine_region(g->config.num_nvl_bytes, row_bytes, K);
    uint64_t base = EP_CTRL_BYTES + ep_ht_combine_base(g->config.num_nvl_bytes, (int)(g->combine_seq & 1));
    cudaError_t err = ensure_streams(g);
    if (err == cudaSuccess)
        err = cudaEventRecord(g->ce_events[EP_MAX_NVL_RANKS], g->stream);
    int64_t recv_start = 0;
    for (int s = 0; s < R && err == cudaSuccess; s++) {
        int64_t count = h->counts[s * R + me], dst_start = 0;
        for (int d = 0; d < me; d++)
            dst_start += h->counts[s * R + d];
        if (count > 0) {
            cudaStream_t cs = g->ce_streams[s];
            char *region = g->dev.window[s] + base;
            err = cudaStreamWaitEvent(cs, g->ce_events[EP_MAX_NVL_RANKS], 0);
            if (err == cudaSuccess)
                err = cudaMemcpyAsync(region + reg.x_off + (uint64_t)dst_start * row_bytes,
                                      (const char *)a->x.data + (uint64_t)recv_start * row_bytes,
                                      (uint64_t)count * row_bytes, cudaMemcpyDefault, cs);
            if (err == cudaSuccess && a->topk_weights.data != NULL)
                err = cudaMemcpyAsync(region + reg.weights_off + (uint64_t)dst_start * K * 4,
                                      (const float *)a->topk_weights.data + (uint64_t)recv_start * K,
                                      (uint64_t)count * K * 4, cudaMemcpyDefault, cs);
            if (err == cudaSuccess)
                err = cudaEventRecord(g->ce_events[s], cs);
            if (err == cudaSuccess)
                err = cudaStreamWaitEvent(g->stream, g->ce_events[s], 0);
        }
        recv_start += count;
    }
    return err;
}
