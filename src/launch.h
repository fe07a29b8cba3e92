/* The common frame of every operation on a group: check the ordering arguments, make the group's stream
 * wait for the caller's work, run, then let the caller's stream wait (or record the finish event). */
#ifndef EP_LAUNCH_H
#define EP_LAUNCH_H

#include "group.h"

typedef struct {
    ep_launch_t opts;    /* the caller's options, defaults filled in */
    cudaStream_t stream; /* where the op's kernels go: the group's stream, or the caller's (direct) */
    int previous_device;
} ep_launch_frame_t;

/* Validates `launch` (NULL = defaults). Does not touch the GPU. */
ep_status_t ep_launch_check(ep_group_t g, const ep_launch_t *launch, ep_launch_frame_t *frame);
/* Whether the caller's stream is being captured into a CUDA graph. */
int ep_launch_is_capturing(const ep_launch_frame_t *frame);
/* Enters the group's device and orders the group's stream after the caller's stream / previous_event. */
ep_status_t ep_launch_begin(ep_group_t g, ep_launch_frame_t *frame);
/* Like ep_launch_begin, but when nothing asks for the group's stream (no previous_event, no async_finish) the
 * op runs on the caller's stream itself, with no cross-stream ordering (low-latency ops: every event record
 * and stream wait costs host and device time). */
ep_status_t ep_launch_begin_direct(ep_group_t g, ep_launch_frame_t *frame);
/* Which mode's calls use the window's data region (group.data_mode). */
enum { EP_DATA_NONE = 0, EP_DATA_HT = 1, EP_DATA_LL = 2 };
/* The high-throughput and low-latency modes share the window's data region, and neither's sends wait for peers
 * to finish reading what the other mode left there (a rank leaving a combine may write a low-latency dispatch
 * into a peer still reducing its combine rows). So the first call of one mode after the other's starts with a
 * barrier on the op's stream, ordered after the group's and the caller's streams (where this rank's last calls
 * of the other mode ran): nothing is written to a peer until every rank has finished the other mode. Every
 * high-throughput op also makes earlier low-latency handles stale (group.ll_window_gen): it overwrites their
 * data. Call it after ep_launch_begin*, before the op's first kernel. */
ep_status_t ep_launch_enter_mode(ep_group_t g, const ep_launch_frame_t *frame, int mode);
/* Orders the caller's stream after the op (unless async_finish), records finish_event, restores the device.
 * `status` is the op's status so far: on failure the device is restored and the status returned. A CUDA error
 * (EP_ERROR_CUDA: a launch, an event or a stream order failed once the op began) fails the group. */
ep_status_t ep_launch_end(ep_group_t g, ep_launch_frame_t *frame, ep_status_t status);

#endif
