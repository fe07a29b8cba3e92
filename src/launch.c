#include "launch.h"

#include "check.h"
#include "error.h"
#include "kernels/group_kernels.h"
#include "kernels/ht_layout.h"

#define EP_DEFAULT_HT_SMS 24

ep_status_t ep_launch_check(ep_group_t g, const ep_launch_t *launch, ep_launch_frame_t *frame) {
    ep_launch_t defaults = EP_LAUNCH_INIT;
    if (launch != NULL) {
        EP_CHECK(ep_check_struct_size(launch->size, sizeof(ep_launch_t), sizeof(ep_launch_t), "ep_launch_t"));
        defaults = *launch;
    }
    if (defaults.async_finish && defaults.finish_event == NULL)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "launch.finish_event: async_finish needs an event to record (got NULL)");
    EP_CHECK(ep_group_check_stream(g, (cudaStream_t)defaults.stream, "launch.stream"));
    frame->opts = defaults;
    return EP_SUCCESS;
}

int ep_launch_is_capturing(const ep_launch_frame_t *frame) {
    enum cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing((cudaStream_t)frame->opts.stream, &status) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return status == cudaStreamCaptureStatusActive;
}

ep_status_t ep_launch_begin_direct(ep_group_t g, ep_launch_frame_t *frame) {
    if (frame->opts.previous_event != NULL || frame->opts.async_finish)
        return ep_launch_begin(g, frame);
    EP_CHECK(ep_device_enter(g->device, &frame->previous_device));
    cudaGetLastError(); /* a stale error of the caller's must not be taken for our launches' */
    frame->stream = (cudaStream_t)frame->opts.stream;
    return EP_SUCCESS;
}

ep_status_t ep_launch_begin(ep_group_t g, ep_launch_frame_t *frame) {
    frame->stream = g->stream;
    EP_CHECK(ep_device_enter(g->device, &frame->previous_device));
    cudaGetLastError(); /* a stale error of the caller's must not be taken for our launches' */
    ep_status_t st = EP_SUCCESS;
    if (frame->opts.previous_event != NULL) {
        cudaError_t err = cudaStreamWaitEvent(g->stream, (cudaEvent_t)frame->opts.previous_event, 0);
        if (err != cudaSuccess)
            st = ep_cuda_fail(err, "cudaStreamWaitEvent(previous_event)", __FILE__, __LINE__);
    } else {
        st = ep_group_order(g, (cudaStream_t)frame->opts.stream, g->stream);
    }
    if (st != EP_SUCCESS)
        ep_device_restore(frame->previous_device);
    return st;
}

/* The barrier between the modes, when `mode` is not the one the group's last calls used. */
static ep_status_t switch_mode(ep_group_t g, const ep_launch_frame_t *frame, int mode) {
    if (g->data_mode == mode)
        return EP_SUCCESS;
    if (g->data_mode != EP_DATA_NONE) {
        EP_CHECK(ep_group_order(g, g->stream, frame->stream));
        EP_CHECK(ep_group_order(g, (cudaStream_t)frame->opts.stream, frame->stream));
        cudaError_t err = ep_launch_barrier(&g->dev, EP_STAGE_MODE_SWITCH, ep_plain_barrier_word(EP_STAGE_MODE_SWITCH),
                                            frame->stream);
        if (err != cudaSuccess)
            return ep_cuda_fail(err, "mode switch barrier", __FILE__, __LINE__);
    }
    g->data_mode = mode;
    return EP_SUCCESS;
}

ep_status_t ep_launch_enter_mode(ep_group_t g, const ep_launch_frame_t *frame, int mode) {
    EP_CHECK(switch_mode(g, frame, mode));
    if (mode == EP_DATA_HT)
        g->ll_window_gen++; /* the op overwrites the data region: low-latency handles from before are stale */
    return EP_SUCCESS;
}

ep_status_t ep_launch_end(ep_group_t g, ep_launch_frame_t *frame, ep_status_t status) {
    if (status == EP_SUCCESS && frame->opts.finish_event != NULL) {
        cudaError_t err = cudaEventRecord((cudaEvent_t)frame->opts.finish_event, frame->stream);
        if (err != cudaSuccess)
            status = ep_cuda_fail(err, "cudaEventRecord(finish_event)", __FILE__, __LINE__);
    }
    if (status == EP_SUCCESS && !frame->opts.async_finish)
        status = ep_group_order(g, frame->stream, (cudaStream_t)frame->opts.stream); /* nothing if direct */
    ep_device_restore(frame->previous_device);
    /* Part of the op may be enqueued (its peers' parts pair with it): this rank can no longer tell where it
     * stands in the group's sequence of calls, so the group fails rather than run out of step. */
    if (status == EP_ERROR_CUDA)
        ep_group_mark_failed(g, status);
    return status;
}

int ep_group_ht_blocks(ep_group_t g, int requested) {
    int n = requested > 0 ? requested : g->config.num_sms > 0 ? g->config.num_sms : EP_DEFAULT_HT_SMS;
    return n;
}
