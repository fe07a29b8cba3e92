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
#define EP_CTRL_BYTES   (128 * 1024)
/* Control region layout (offsets from the window base). */
#define EP_CTRL_BARRIER_FLAGS     0     /* uint64_t[num_ranks]: epoch each peer last reached, written by it */
#define EP_CTRL_BARRIER_WORDS     2048  /* uint64_t[2][R]: by barrier epoch parity, each rank's word at that barrier
                                           (ep_cta_barrier: the call and, for a send, its sizes) */
#define EP_CTRL_DESTROY_FLAGS     4096  /* uint64_t[num_ranks]: each peer's destroy vote (written once) */
#define EP_CTRL_HT_COUNTS         8192  /* int32_t[2][R][R]: by dispatch parity, [src][dst] token counts */
#define EP_CTRL_HT_CALLS          12288 /* uint64_t[2][R][2]: by dispatch parity, each rank's ep_ht_pack_call word and
                                           num_worst_tokens */
#define EP_CTRL_HT_EXPERTS        16384 /* int32_t[2][R][L]: by parity, [src][local expert] (token, expert) counts */
#define EP_CTRL_HT_EXPERT_WORDS   (24 * 1024 / 4) /* per parity: R * L = E <= EP_MAX_EXPERTS */
#define EP_MAX_TOPK               32              /* normal mode; the low-latency limit is EP_LL_MAX_TOPK */
#define EP_MAX_EXPERTS            6144
#define EP_CTRL_LL_DISPATCH_FLAGS 65536 /* uint64_t[2][R]: by parity, (epoch << 32) | tokens, from each source */
#define EP_CTRL_LL_DISPATCH_LAYOUTS 67584 /* uint64_t[2][R]: by parity, each source's (T, H, K, E) (ep_ll_pack_layout) */
#define EP_CTRL_LL_COMBINE_FLAGS  69632 /* uint64_t[2][R]: by combine parity, epoch << 32 | per-rank sums (0/1) */
/* uint64_t[2][R]: by combine parity, (epoch << 32) | tokens, from each source: its weights have landed (per-rank
 * combine, EPCOMM_LL_COMBINE_PER_RANK). */
#define EP_CTRL_LL_COMBINE_WEIGHT_FLAGS 71680
/* uint32_t[2][R][EP_HT_COMBINE_MAX_CHUNKS]: by combine parity, for each source's run of rows in this rank's
 * combine region, the rows of each chunk that have landed (overlapped combine; zeroed after each use). */
#define EP_CTRL_HT_COMBINE_CHUNKS 73728
#define EP_HT_COMBINE_MAX_CHUNKS  448 /* per source: 28 KB in all, below EP_CTRL_BYTES */
#define EP_HT_COMBINE_CHUNK_ROWS  64  /* rows per chunk (a multiple of it when a run has more than 448 chunks) */

/* Stages, so that a timeout names what was waited on. */
typedef enum {
    EP_STAGE_NONE = 0,
    EP_STAGE_GROUP_BARRIER = 1,
    EP_STAGE_DESTROY_BARRIER = 2,
    EP_STAGE_LAYOUT = 3,
    EP_STAGE_DISPATCH_NOTIFY = 4,
    EP_STAGE_DISPATCH_SEND = 5,
    EP_STAGE_COMBINE_SEND = 6,
    EP_STAGE_LL_DISPATCH_RECV = 7,
    EP_STAGE_LL_COMBINE_RECV = 8,
    EP_STAGE_LL_DISPATCH_SEND = 9, /* bad input found while sending (no waits there) */
    EP_STAGE_MODE_SWITCH = 10,     /* the barrier between high-throughput and low-latency use of the window */
    EP_STAGE_LL_COMBINE_WEIGHTS = 11, /* the per-rank combine's send, waiting for a source's weights */
    EP_STAGE_COUNT
} ep_stage_t;

/* Written by the device (first error wins), read by the host; lives in host-mapped memory. */
#define EP_DEV_ERROR_WRITING (-1) /* status while the first error's details are being written */
#define EP_DEV_STATUS_TIMEOUT 6   /* EP_ERROR_TIMEOUT (the device code does not include epcomm.h) */
#define EP_DEV_STATUS_OVERRUN 11  /* EP_ERROR_DEVICE_INPUT, with a peer: a low-latency flag past this call */
#define EP_DEV_STATUS_MISMATCH 1  /* EP_ERROR_INVALID_ARGUMENT, with a peer: its low-latency (T, H, K, E) differ */
typedef struct {
    int32_t status;  /* an ep_status_t; 0 while healthy; EP_DEV_ERROR_WRITING until the details are complete */
    int32_t stage;   /* ep_stage_t */
    int32_t rank;    /* the rank that recorded it */
    int32_t peer;    /* the peer waited on, -1 if none */
    uint64_t detail; /* stage-specific: for barriers and low-latency timeouts the epoch waited for; for an
                        overrun the epoch seen << 32 | this call's epoch; for a mismatch the peer's packed layout
                        (low-latency combine stages: the peer's kind, 1 for per-rank sums) */
    uint64_t waited_ns; /* for a timeout; for a mismatch this rank's packed layout (or kind) */
} ep_dev_error_t;

/* Bad input data found by a kernel. Not sticky: the op completes without the bad entries (or, for a
 * capacity overflow, without sending anything) and the host reports it at its next check, then clears it. */
typedef enum {
    EP_INPUT_BAD_EXPERT = 1,      /* token, k, value: topk_idx[token, k] = value outside [-1, E) */
    EP_INPUT_CAPACITY = 2,        /* value rows needed at rank k, token = rows available */
    EP_INPUT_LAYOUT_MISMATCH = 3, /* k = rank: is_token_in_rank counts `value`, num_tokens_per_rank says token */
    EP_INPUT_CALL_MISMATCH = 4,   /* k = rank: its dispatch's ep_ht_pack_call word is `value`, this rank's token */
    EP_INPUT_WORST_MISMATCH = 5,  /* k = rank: its num_worst_tokens is `value`, this rank's token */
    EP_INPUT_SEND_MISMATCH = 6,   /* k = rank: its barrier word is `value`, this rank's token: a cached dispatch
                                     or a combine sent with other sizes, or the ranks at different calls */
} ep_input_error_kind_t;

typedef struct {
    uint32_t count; /* bad entries seen */
    int32_t op;     /* ep_stage_t of the op that saw the first one */
    int32_t kind;   /* ep_input_error_kind_t */
    int32_t k;
    int64_t token;
    int64_t value;
} ep_dev_input_error_t;

typedef struct {
    int rank;
    int num_ranks;
    uint64_t timeout_ns;
    char *window[EP_MAX_NVL_RANKS];    /* every rank's window base, mapped here (own rank included) */
    uint64_t *barrier_epoch;           /* local device counter: epochs this rank has completed */
    ep_dev_error_t *error;             /* host-mapped error record (device pointer) */
    ep_dev_input_error_t *input_error; /* host-mapped bad-input record (device pointer) */
    int num_sms;        /* SMs the group's context may use, a green context's share (host-side launch sizing) */
    uint32_t *ll_state; /* local device words: [0..1] dispatch epochs, [2..3] combine epochs, [4..7] done
                           counters (dispatch p0, p1, combine p0, p1), by dispatch parity and by combine
                           parity (combines take turns on their own); [8] done counter and [9] next token
                           of the high-throughput overlapped combine */
} ep_dev_group_t;

/* Whether a 32-bit epoch `seen` has reached `epoch`, in wrap-around order (per-half call counts wrap after 2^32
 * calls; any two compared are less than 2^31 apart). */
#ifdef __CUDACC__
__host__ __device__
#endif
static inline int ep_epoch_reached(uint32_t seen, uint32_t epoch) {
    return (int32_t)(seen - epoch) >= 0;
}

#endif
