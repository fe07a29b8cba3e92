/* Status and last-error bookkeeping shared by every host file.
 * ep_fail() records a formatted message for the calling thread and returns the status, so call sites read
 * `return ep_fail(EP_ERROR_INVALID_ARGUMENT, "x: expected ...")`. The CUDA/NCCL macros record the failing
 * call, its file and line. */
#ifndef EP_ERROR_H
#define EP_ERROR_H

#include "epcomm.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#if defined(__GNUC__)
#define EP_PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#else
#define EP_PRINTF_LIKE(f, a)
#endif

ep_status_t ep_fail(ep_status_t status, const char *fmt, ...) EP_PRINTF_LIKE(2, 3);
/* Prepends "context: " to the current message (e.g. the rank), keeping the status. */
ep_status_t ep_fail_context(ep_status_t status, const char *fmt, ...) EP_PRINTF_LIKE(2, 3);
void ep_clear_error(void);

ep_status_t ep_cuda_fail(cudaError_t err, const char *call, const char *file, int line);
ep_status_t ep_nccl_fail(ncclResult_t res, const char *call, const char *file, int line);

#define EP_CUDA_CHECK(call)                                                                                            \
    do {                                                                                                               \
        cudaError_t ep_cuda_err_ = (call);                                                                             \
        if (ep_cuda_err_ != cudaSuccess)                                                                               \
            return ep_cuda_fail(ep_cuda_err_, #call, __FILE__, __LINE__);                                              \
    } while (0)

#define EP_NCCL_CHECK(call)                                                                                            \
    do {                                                                                                               \
        ncclResult_t ep_nccl_res_ = (call);                                                                            \
        if (ep_nccl_res_ != ncclSuccess)                                                                               \
            return ep_nccl_fail(ep_nccl_res_, #call, __FILE__, __LINE__);                                              \
    } while (0)

/* Propagates a failed epcomm status unchanged (its message is already recorded). */
#define EP_CHECK(call)                                                                                                 \
    do {                                                                                                               \
        ep_status_t ep_st_ = (call);                                                                                   \
        if (ep_st_ != EP_SUCCESS)                                                                                      \
            return ep_st_;                                                                                             \
    } while (0)

#endif
