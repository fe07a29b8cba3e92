#define _POSIX_C_SOURCE 200809L
#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define EP_MESSAGE_BYTES 1024

static _Thread_local char last_message[EP_MESSAGE_BYTES];

const char *ep_status_string(ep_status_t status) {
    switch (status) {
    case EP_SUCCESS: return "EP_SUCCESS: no error";
    case EP_ERROR_INVALID_ARGUMENT: return "EP_ERROR_INVALID_ARGUMENT: an argument is invalid";
    case EP_ERROR_BUFFER_TOO_SMALL: return "EP_ERROR_BUFFER_TOO_SMALL: a buffer is too small";
    case EP_ERROR_UNSUPPORTED: return "EP_ERROR_UNSUPPORTED: not supported here";
    case EP_ERROR_CUDA: return "EP_ERROR_CUDA: a CUDA call failed";
    case EP_ERROR_NCCL: return "EP_ERROR_NCCL: an NCCL call failed";
    case EP_ERROR_TIMEOUT: return "EP_ERROR_TIMEOUT: a wait timed out";
    case EP_ERROR_OUT_OF_MEMORY: return "EP_ERROR_OUT_OF_MEMORY: out of memory";
    case EP_ERROR_IN_PROGRESS: return "EP_ERROR_IN_PROGRESS: work is still in flight";
    case EP_ERROR_PEER_UNREACHABLE: return "EP_ERROR_PEER_UNREACHABLE: ranks cannot reach each other";
    case EP_ERROR_VERSION_MISMATCH: return "EP_ERROR_VERSION_MISMATCH: NCCL library and headers differ";
    case EP_ERROR_DEVICE_INPUT: return "EP_ERROR_DEVICE_INPUT: the device found bad input data";
    case EP_ERROR_GROUP_FAILED: return "EP_ERROR_GROUP_FAILED: the group failed earlier";
    case EP_ERROR_INTERNAL: return "EP_ERROR_INTERNAL: internal error";
    }
    return "EP_ERROR_UNKNOWN: unknown status";
}

const char *ep_last_error(void) {
    return last_message;
}

void ep_clear_error(void) {
    last_message[0] = '\0';
}

ep_status_t ep_fail(ep_status_t status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_message, sizeof(last_message), fmt, ap);
    va_end(ap);
    return status;
}

ep_status_t ep_fail_context(ep_status_t status, const char *fmt, ...) {
    char context[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(context, sizeof(context) - 2, fmt, ap);
    va_end(ap);
    size_t len = n < 0 ? 0 : strlen(context);
    memcpy(context + len, ": ", 3);
    len += 2;
    /* Shift the old message right and put the context in front, truncating the tail if needed. */
    size_t old_len = strnlen(last_message, sizeof(last_message) - 1);
    if (len + old_len > sizeof(last_message) - 1)
        old_len = sizeof(last_message) - 1 - len;
    memmove(last_message + len, last_message, old_len);
    memcpy(last_message, context, len);
    last_message[len + old_len] = '\0';
    return status;
}

ep_status_t ep_cuda_fail(cudaError_t err, const char *call, const char *file, int line) {
    ep_status_t status = err == cudaErrorMemoryAllocation ? EP_ERROR_OUT_OF_MEMORY : EP_ERROR_CUDA;
    return ep_fail(status, "%s failed: %s (%s) at %s:%d", call, cudaGetErrorName(err), cudaGetErrorString(err), file,
                   line);
}

ep_status_t ep_nccl_fail(ncclResult_t res, const char *call, const char *file, int line) {
    return ep_fail(EP_ERROR_NCCL, "%s failed: %s (NCCL %d) at %s:%d", call, ncclGetErrorString(res), (int)res, file,
                   line);
}
