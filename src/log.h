/* NCCL_DEBUG-style logging to stderr, switched on by EPCOMM_DEBUG. Each line names the rank and device. */
#ifndef EP_LOG_H
#define EP_LOG_H

#include "env.h"
#include "error.h"

void ep_log(ep_log_level_t level, int rank, int device, const char *fmt, ...) EP_PRINTF_LIKE(4, 5);

#endif
