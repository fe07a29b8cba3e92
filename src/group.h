/* The group object (internal view). Public functions live in group_create.c, group_destroy.c and
 * group_sync.c; kernels see the group only through ep_dev_group_t. */
#ifndef EP_GROUP_H
#define EP_GROUP_H

#include "epcomm.h"
#include "kernels/dev_group.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "kernels/ht_kernels.h"

/* Host-mapped memory layout: the device error records, destroy votes, and what the dispatch notify kernel
 * tells the host (the only thing the host ever waits for in normal mode). */
typedef struct {
    ep_dev_error_t error;
    ep_dev_input_error_t input_error;
    int32_t destroy_votes[EP_MAX_NVL_RANKS];
    ep_ht_notify_host_t notify;
} ep_mapped_t;

struct ep_group {
    int rank;
    int num_ranks;
    int device;
    ep_group_config_t config; /* with defaults filled in */
    int64_t timeout_ms;

    ncclComm_t comm; /* NULL for an in-process group */
    int owns_comm;
    struct ep_local_world *local; /* the in-process group's registry entry, else NULL */

    void *window_mem; /* control region + data buffer: ncclMemAlloc'd, or cudaMalloc'd in-process */
    size_t window_bytes;
    ncclWindow_t window;
    char **window_bases_dev; /* device copy of every rank's window base */

    ep_mapped_t *mapped_host; /* host-mapped */
    ep_mapped_t *mapped_dev;
    uint64_t *barrier_epoch_dev;
    uint32_t *ll_state_dev;
    uint64_t ll_seq;         /* low-latency dispatches so far: the parity picks the buffer half */
    uint64_t ll_combine_seq; /* low-latency combines so far: the parity picks the combine staging half */
    uint64_t ll_window_gen;  /* bumped by what overwrites low-latency state in the window (normal-mode calls,
                              * ep_clean_low_latency_buffer): handles from before are stale */

    cudaStream_t stream;
    int borrowed_stream; /* config.comm_stream: the caller's, not destroyed here */
    cudaEvent_t order_event;
    /* Copy-engine transfers (one stream per peer so the engines run in parallel), created on first use. */
    cudaStream_t ce_streams[EP_MAX_NVL_RANKS];
    cudaEvent_t ce_events[EP_MAX_NVL_RANKS + 1];
    int ce_ready;

    ep_dev_group_t dev; /* what kernels receive */

    uint64_t dispatch_seq; /* high-throughput ops so far: their parity picks the buffer half */
    uint64_t combine_seq;
    uint32_t notify_seq;
    int data_mode; /* EP_DATA_*: which mode's calls last used the window's data region (ep_launch_enter_mode) */
    uint64_t notify_call_word; /* the last count exchange's ep_ht_pack_call word (for a capacity error's bytes) */
    int live_handles;          /* the group may not be destroyed while handles refer to it */
    /* In-process groups: memory of handles made during graph capture, freed with the group. A cudaFree waits
     * for every kernel on the device, including a peer rank's kernel that waits for this rank. */
    struct ep_deferred_free *deferred;

    ep_status_t failed; /* sticky: set by a timeout or a device error */
    char failed_message[512];
};

/* Bytes of the control region and of the whole window for a config. */
size_t ep_group_window_bytes(const ep_group_config_t *config);

/* Makes `device` current and remembers the previous one (-1 when it was current already, and the current context,
 * green or primary, is kept); ep_device_restore puts it back. */
ep_status_t ep_device_enter(int device, int *previous);
void ep_device_restore(int previous);

/* Checks the group is usable: not failed earlier and no error recorded by the device since. */
ep_status_t ep_group_check_usable(ep_group_t g);
/* Converts the device error record into a status and message, marking the group failed. */
ep_status_t ep_group_take_device_error(ep_group_t g);
/* Marks the group failed with the current thread message. */
ep_status_t ep_group_mark_failed(ep_group_t g, ep_status_t status);

/* A caller's stream must belong to the group's device (NULL: the legacy default stream). */
ep_status_t ep_group_check_stream(ep_group_t g, cudaStream_t stream, const char *name);
/* Reports (EP_ERROR_DEVICE_INPUT) and clears bad input the device saw since the last check. */
ep_status_t ep_group_take_input_error(ep_group_t g);
/* `to` waits for the work enqueued so far on `from`. */
ep_status_t ep_group_order(ep_group_t g, cudaStream_t from, cudaStream_t to);
/* A monotonic clock in milliseconds, and how long host waits last (the group's timeout plus a margin, so that
 * device timeouts, which know the peer, fire first). */
int64_t ep_now_ms(void);
int64_t ep_host_wait_limit_ms(ep_group_t g);
/* Host wait for a stream with the group's timeout (plus a margin so device timeouts fire first). */
ep_status_t ep_group_wait_stream(ep_group_t g, cudaStream_t stream, const char *stage);

const char *ep_stage_name(int stage);

/* Blocks for high-throughput kernels: the call's request, else the group's num_sms, else the default. */
int ep_group_ht_blocks(ep_group_t g, int requested);

/* Every rank contributes `bytes` host bytes and receives all of them in rank order in `all` (NCCL, or the
 * in-process registry); `what` names the exchange in messages. */
ep_status_t ep_group_allgather(ep_group_t g, const void *mine, size_t bytes, void *all, const char *what);
/* In-process groups: leaves the registry. This rank's window stays mapped until the last rank leaves (a peer that
 * timed out may still write into it while tearing down), and that rank frees every window. */
void ep_group_leave_local(ep_group_t g);

/* Tears the group down on this rank alone (aborting the communicator if the group owns it) and frees it,
 * whatever point creation reached. For a creation that failed. */
void ep_group_release_local(ep_group_t g);

/* Waits for an NCCL call that may have returned ncclInProgress (non-blocking communicators), with a
 * deadline; `what` names the call in messages. */
ep_status_t ep_nccl_complete(ncclComm_t comm, ncclResult_t res, int64_t timeout_ms, const char *what);

#endif
