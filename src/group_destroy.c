/* Group destruction. A healthy group tears down collectively (window deregistration, communicator
 * finalize) after a handshake in which every rank votes; a rank that sees a vote to abort, or a peer that does
 * not vote in time (then destroy returns the timeout), tears down locally instead, so destroy never hangs on a
 * failed peer. */
#define _POSIX_C_SOURCE 200809L
#include "check.h"
#include "error.h"
#include "group.h"
#include "handle.h"
#include "kernels/group_kernels.h"
#include "local_world.h"
#include "log.h"

#include <stdlib.h>

/* Votes OK and collects every rank's vote: *all_ok = 1 when every rank voted OK. A peer that voted to abort is
 * not an error (it tore down locally, so this rank does too); a peer that did not vote in time is: the vote
 * kernel recorded which rank and stage, and that error is returned. Peers that saw this rank's OK vote tear
 * down collectively and report their own timeout. */
static ep_status_t handshake(ep_group_t g, int *all_ok) {
    int32_t *votes = g->mapped_host->destroy_votes;
    *all_ok = 0;
    for (int r = 0; r < g->num_ranks; r++)
        votes[r] = 0;
    cudaError_t err = ep_launch_destroy_vote(&g->dev, EP_VOTE_OK, 1, g->mapped_dev->destroy_votes, g->stream);
    if (err != cudaSuccess) {
        ep_cuda_fail(err, "launching the destroy handshake", __FILE__, __LINE__);
        return ep_group_mark_failed(g, EP_ERROR_CUDA);
    }
    EP_CHECK(ep_group_wait_stream(g, g->stream, "destroy handshake"));
    EP_CHECK(ep_group_take_device_error(g));
    for (int r = 0; r < g->num_ranks; r++) {
        if (((volatile int32_t *)votes)[r] != EP_VOTE_OK) {
            ep_log(EP_LOG_WARN, g->rank, g->device, "destroy: rank %d voted %d; tearing down locally", r,
                   (int)votes[r]);
            return EP_SUCCESS;
        }
    }
    *all_ok = 1;
    return EP_SUCCESS;
}

/* Best effort: tell peers not to wait for us, then give the stream a bounded time to drain. */
static void announce_abort(ep_group_t g) {
    if (ep_launch_destroy_vote(&g->dev, EP_VOTE_ABORT, 0, g->mapped_dev->destroy_votes, g->stream) == cudaSuccess)
        ep_group_wait_stream(g, g->stream, "destroy (announcing abort)");
}

static ep_status_t teardown_collective(ep_group_t g) {
    ep_status_t st = EP_SUCCESS;
    if (g->local) { /* every rank has stopped touching the others' windows before any frees its own */
        int32_t none = 0, all[EP_MAX_NVL_RANKS];
        return ep_group_allgather(g, &none, sizeof(none), all, "destroy (in-process)");
    }
    ncclResult_t res = ncclCommWindowDeregister(g->comm, g->window);
    if (res != ncclSuccess && res != ncclInProgress)
        st = ep_nccl_fail(res, "ncclCommWindowDeregister", __FILE__, __LINE__);
    else
        st = ep_nccl_complete(g->comm, res, g->timeout_ms, "ncclCommWindowDeregister");
    if (g->owns_comm) {
        if (st == EP_SUCCESS)
            st = ep_nccl_complete(g->comm, ncclCommFinalize(g->comm), g->timeout_ms, "ncclCommFinalize");
        if (st == EP_SUCCESS)
            ncclCommDestroy(g->comm);
        else
            ncclCommAbort(g->comm);
    }
    return st;
}

/* Drops this rank's share of the communicator without talking to peers. */
static void teardown_local(ep_group_t g) {
    if (g->local || g->comm == NULL)
        return;
    if (g->owns_comm)
        ncclCommAbort(g->comm);
    else if (g->window)
        ncclCommWindowDeregister(g->comm, g->window); /* the caller's communicator stays theirs */
}

/* Frees what the group holds on this rank. Fields creation did not reach are zero and skipped, so this
 * serves a failed creation as well as destroy. */
static void free_resources(ep_group_t g) {
    ep_group_free_deferred(g);
    if (g->local)
        ep_group_leave_local(g);
    else if (g->window_mem)
        ncclMemFree(g->window_mem);
    cudaFree(g->window_bases_dev);
    cudaFree(g->barrier_epoch_dev);
    cudaFree(g->ll_state_dev);
    cudaFreeHost(g->mapped_host);
    if (g->order_event)
        cudaEventDestroy(g->order_event);
    for (int i = 0; i < EP_MAX_NVL_RANKS; i++)
        if (g->ce_streams[i])
            cudaStreamDestroy(g->ce_streams[i]);
    for (int i = 0; i <= EP_MAX_NVL_RANKS; i++)
        if (g->ce_events[i])
            cudaEventDestroy(g->ce_events[i]);
    if (g->stream && !g->borrowed_stream)
        cudaStreamDestroy(g->stream);
    free(g);
}

void ep_group_release_local(ep_group_t g) {
    if (g->stream)
        cudaStreamSynchronize(g->stream);
    teardown_local(g);
    free_resources(g);
}

ep_status_t ep_group_destroy(ep_group_t group) {
    ep_clear_error();
    if (group == NULL)
        return EP_SUCCESS;
    if (group->live_handles > 0)
        return ep_fail(EP_ERROR_IN_PROGRESS,
                       "rank %d: ep_group_destroy: %d dispatch handles still refer to the "
                       "group; release them with ep_handle_destroy first",
                       group->rank, group->live_handles);
    int previous;
    EP_CHECK(ep_device_enter(group->device, &previous));
    cudaError_t busy = cudaStreamQuery(group->stream);
    if (busy == cudaErrorNotReady) {
        ep_device_restore(previous);
        return ep_fail(EP_ERROR_IN_PROGRESS,
                       "rank %d: ep_group_destroy: work is still in flight on the group's "
                       "stream; synchronize (ep_group_synchronize) before destroying",
                       group->rank);
    }
    ep_group_take_device_error(group);
    ep_status_t st = EP_SUCCESS;
    int all_ok = 0;
    if (group->failed == EP_SUCCESS)
        st = handshake(group, &all_ok);
    if (all_ok) {
        st = teardown_collective(group);
    } else {
        ep_log(EP_LOG_WARN, group->rank, group->device,
               "destroy: tearing down locally (group failed or a peer "
               "did not agree)");
        announce_abort(group);
        teardown_local(group);
    }
    free_resources(group);
    ep_device_restore(previous);
    return st;
}
