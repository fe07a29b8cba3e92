/* What a kernel knows about its group: plain C, shared by host code (which fills it) and kernels (which
 * receive it by value). Kernels never call NCCL for data movement: at creation a setup kernel asks NCCL's
 * device API for every peer's window base once, and kernels use those raw NVLink-mapped pointers. */
#ifndef EP_DEV_GROUP_H
#define EP_DEV_GROUP_H

#include <stddef.h>
#include <stdint.h>

/* Ranks one NVLink domain may hold (SPEC: 2..8). */
#define EP_MAX_NVL_RANKS 8

/* The symmetric window: a control region (flags) followed by the data buffer. */
#define EP_WINDOW_ALIGN 4096
#define EP_CTRL_BYTES (64 * 1024)
/* Control region layout (offsets from the window base). */
#define EP_CTRL_BARRIER_FLAGS 0    /* uint64_t[num_ranks]: epoch each peer last reached, written by it */
#define EP_CTRL_DESTROY_FLAGS 4096 /* uint64_t[num_ranks]: each peer's destroy vote (written once) */

/* Stages, so that a timeout names what was waited on. */
typedef enum {
    EP_STAGE_NONE = 0,
    EP_STAGE_GROUP_BARRIER = 1,
    EP_STAGE_DESTROY_BARRIER = 2,
    EP_STAGE_LAYOUT = 3,
    EP_STAGE_COUNT
} ep_stage_t;

/* Written by the device (first error wins), read by the host; lives in host-mapped memory. */
typedef struct {
    int32_t status;  /* an ep_status_t; 0 while healthy */
    int32_t stage;   /* ep_stage_t */
    int32_t rank;    /* the rank that recorded it */
    int32_t peer;    /* the peer waited on, -1 if none */
    uint64_t detail; /* stage-specific (for barriers: the epoch waited for) */
    uint64_t waited_ns;
} ep_dev_error_t;

/* Bad input data found by a kernel (e.g. an expert id out of range). Not sticky: the op completes without
 * the bad entries and the host reports EP_ERROR_DEVICE_INPUT at its next check, then clears the record. */
typedef struct {
    uint32_t count;     /* bad entries seen */
    int32_t op;         /* ep_stage_t of the op that saw the first one */
    int64_t token;      /* where the first one was */
    int32_t k;
    int32_t pad;
    int64_t value;
} ep_dev_input_error_t;

typedef struct {
    int rank;
    int num_ranks;
    uint64_t timeout_ns;
    char *window[EP_MAX_NVL_RANKS]; /* every rank's window base, mapped here (own rank included) */
    uint64_t *barrier_epoch;        /* local device counter: epochs this rank has completed */
    ep_dev_error_t *error;          /* host-mapped error record (device pointer) */
    ep_dev_input_error_t *input_error; /* host-mapped bad-input record (device pointer) */
} ep_dev_group_t;

#endif
