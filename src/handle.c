#include "handle.h"

#include "check.h"
#include "error.h"

#include <stdlib.h>

ep_status_t ep_handle_create(ep_group_t g, int num_tokens, ep_handle_t *out) {
    ep_handle_t h = calloc(1, sizeof(*h));
    if (h == NULL)
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "handle: out of host memory");
    size_t R = (size_t)g->num_ranks;
    size_t bytes = sizeof(int32_t) * (R * R + 4 + (size_t)num_tokens * R);
    enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaError_t err = cudaStreamIsCapturing(g->stream, &capture);
    if (err == cudaSuccess && capture == cudaStreamCaptureStatusActive) {
        /* A stream-ordered allocation inside a graph would have to be freed before the graph runs again; a
         * plain allocation (allowed by switching this thread to relaxed capture mode) lives with the handle. */
        enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
        cudaThreadExchangeStreamCaptureMode(&mode);
        err = cudaMalloc(&h->device_mem, bytes);
        cudaThreadExchangeStreamCaptureMode(&mode);
        h->captured = 1;
    } else if (err == cudaSuccess) {
        err = cudaMallocAsync(&h->device_mem, bytes, g->stream);
    }
    if (err != cudaSuccess) {
        free(h);
        return ep_cuda_fail(err, "cudaMallocAsync (handle)", __FILE__, __LINE__);
    }
    h->group = g;
    g->live_handles++;
    h->num_tokens = num_tokens;
    h->num_recv = -1;
    h->routing.counts = (int32_t *)h->device_mem;
    h->routing.num_recv = h->routing.counts + R * R;
    h->routing.send_pos = h->routing.num_recv + 4;
    *out = h;
    return EP_SUCCESS;
}

ep_status_t ep_handle_info(ep_handle_t handle, int *num_tokens, int *num_recv_tokens, int *num_rows) {
    EP_CHECK(ep_check_not_null(handle, "handle"));
    if (num_tokens)
        *num_tokens = handle->num_tokens;
    if (num_recv_tokens)
        *num_recv_tokens = handle->num_recv;
    if (num_rows)
        *num_rows = handle->num_rows;
    return EP_SUCCESS;
}

ep_status_t ep_handle_destroy(ep_handle_t handle) {
    ep_clear_error();
    if (handle == NULL)
        return EP_SUCCESS;
    return ep_handle_release(handle);
}

struct ep_deferred_free {
    void *ptr;
    struct ep_deferred_free *next;
};

static cudaError_t ep_defer_free(ep_group_t g, void *ptr) {
    struct ep_deferred_free *node = malloc(sizeof(*node));
    if (node == NULL)
        return cudaFree(ptr);
    node->ptr = ptr;
    node->next = g->deferred;
    g->deferred = node;
    return cudaSuccess;
}

void ep_group_free_deferred(ep_group_t g) {
    while (g->deferred != NULL) {
        struct ep_deferred_free *node = g->deferred;
        g->deferred = node->next;
        cudaFree(node->ptr);
        free(node);
    }
}

ep_status_t ep_handle_release(ep_handle_t handle) {
    ep_group_t g = handle->group;
    int previous;
    ep_status_t st = ep_device_enter(g->device, &previous);
    if (st == EP_SUCCESS) {
        cudaError_t err;
        if (handle->captured && g->local) {
            err = ep_defer_free(g, handle->device_mem);
        } else if (handle->captured) {
            enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
            cudaThreadExchangeStreamCaptureMode(&mode);
            err = cudaFree(handle->device_mem);
            cudaThreadExchangeStreamCaptureMode(&mode);
        } else {
            err = cudaFreeAsync(handle->device_mem, g->stream);
        }
        if (err != cudaSuccess)
            st = ep_cuda_fail(err, "cudaFreeAsync (handle)", __FILE__, __LINE__);
        ep_device_restore(previous);
    }
    g->live_handles--;
    free(handle);
    return st;
}
