/*
 * epcomm: expert-parallel communication for Mixture-of-Experts models.
 *
 * The public C API (C11). Every function returns an ep_status_t; on failure, ep_last_error() returns a
 * message for the calling thread that names the argument or the rank and stage involved.
 *
 * Only what works is declared here. See README.md for the status of each mode.
 */
#ifndef EPCOMM_H
#define EPCOMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define EP_API __attribute__((visibility("default")))
#else
#define EP_API
#endif

#define EP_VERSION_MAJOR 0
#define EP_VERSION_MINOR 1
#define EP_VERSION_PATCH 0
#define EP_VERSION_CODE  (EP_VERSION_MAJOR * 10000 + EP_VERSION_MINOR * 100 + EP_VERSION_PATCH)

/* ---------------------------------------------------------------------------------------------------------
 * Status and errors
 * ------------------------------------------------------------------------------------------------------- */
typedef enum {
    EP_SUCCESS = 0,
    EP_ERROR_INVALID_ARGUMENT = 1, /* a bad argument: nothing was launched, nothing changed */
    EP_ERROR_BUFFER_TOO_SMALL = 2, /* a buffer or capacity is too small; the message gives the size needed */
    EP_ERROR_UNSUPPORTED = 3,      /* valid, but not supported by this build or machine */
    EP_ERROR_CUDA = 4,             /* a CUDA call failed (the message names it and the CUDA error) */
    EP_ERROR_NCCL = 5,             /* an NCCL call failed */
    EP_ERROR_TIMEOUT = 6,          /* a peer or the device did not arrive in time (message: rank, stage) */
    EP_ERROR_OUT_OF_MEMORY = 7,
    EP_ERROR_IN_PROGRESS = 8,       /* work is still in flight (e.g. destroy while busy); retry later */
    EP_ERROR_PEER_UNREACHABLE = 9,  /* two ranks of the group cannot reach each other's memory */
    EP_ERROR_VERSION_MISMATCH = 10, /* NCCL library and headers differ */
    EP_ERROR_DEVICE_INPUT = 11,     /* the device found bad input data (e.g. expert id out of range), or a
                                     * low-latency receive found a peer's later call (this one fails the group) */
    EP_ERROR_GROUP_FAILED = 12,     /* an earlier error left the group unusable; only destroy is allowed */
    EP_ERROR_INTERNAL = 13,
} ep_status_t;

/* A constant string naming the status ("EP_ERROR_TIMEOUT: ..."). Never NULL. */
EP_API const char *ep_status_string(ep_status_t status);
/* The message of the last failed call in this thread, "" if none. Valid until the next epcomm call. */
EP_API const char *ep_last_error(void);

/* ---------------------------------------------------------------------------------------------------------
 * Tensors: a small descriptor for device (or host) arrays. Strides are in elements, like torch.
 * ------------------------------------------------------------------------------------------------------- */
typedef enum {
    EP_DTYPE_BFLOAT16 = 0,
    EP_DTYPE_FLOAT8_E4M3 = 1, /* float8_e4m3fn */
    EP_DTYPE_FLOAT32 = 2,
    EP_DTYPE_INT32 = 3,
    EP_DTYPE_INT64 = 4,
    EP_DTYPE_BOOL = 5, /* one byte */
    EP_DTYPE_UINT8 = 6,
} ep_dtype_t;

#define EP_MAX_DIMS 4

/* An optional argument is absent when its data is NULL, unless it has a zero extent: a tensor with no elements
 * (an empty torch tensor's data pointer is 0, as is cudaMalloc(0)'s) is given, and is then checked like any
 * other (a rank with no tokens passes its topk_idx as [0, K], and gets topk outputs like the others). */
typedef struct {
    void *data;
    ep_dtype_t dtype;
    int ndim;
    int64_t shape[EP_MAX_DIMS];
    int64_t strides[EP_MAX_DIMS]; /* in elements */
} ep_tensor_t;

/* Bytes per element of a dtype; 0 for an unknown dtype. */
EP_API size_t ep_dtype_size(ep_dtype_t dtype);
/* A short name ("bfloat16", "int64", ...); "unknown" for an unknown dtype. */
EP_API const char *ep_dtype_name(ep_dtype_t dtype);
/* Contiguous (row-major) descriptors. */
EP_API ep_tensor_t ep_tensor_1d(void *data, ep_dtype_t dtype, int64_t n0);
EP_API ep_tensor_t ep_tensor_2d(void *data, ep_dtype_t dtype, int64_t n0, int64_t n1);
EP_API ep_tensor_t ep_tensor_3d(void *data, ep_dtype_t dtype, int64_t n0, int64_t n1, int64_t n2);

/* ---------------------------------------------------------------------------------------------------------
 * Groups
 * ------------------------------------------------------------------------------------------------------- */
typedef struct ep_group *ep_group_t;

/* The NCCL unique id, passed out of band to every rank (same layout as ncclUniqueId). */
#define EP_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[EP_UNIQUE_ID_BYTES];
} ep_unique_id_t;

typedef struct {
    size_t size;           /* sizeof(ep_group_config_t): lets the struct grow */
    size_t num_nvl_bytes;  /* symmetric NVLink buffer per rank (DeepEP's num_nvl_bytes) */
    size_t num_rdma_bytes; /* scale-out buffer per rank (DeepEP's num_rdma_bytes); 0 for none */
    int low_latency_mode;  /* the group will be used for low-latency kernels */
    int num_sms;           /* SMs high-throughput kernels may use; 0: the default */
    int64_t timeout_ms;    /* every device and host wait; 0: EPCOMM_TIMEOUT_MS or 30000 */
    void *comm_stream;     /* a cudaStream_t on cuda_device for the group's own work, which the caller owns and
                              keeps alive past ep_group_destroy (e.g. one of PyTorch's pooled streams); NULL: the
                              group creates and destroys its own. Added in 0.2: older callers' smaller size works */
} ep_group_config_t;

#define EP_GROUP_CONFIG_INIT                                                                                           \
    { sizeof(ep_group_config_t), 0, 0, 0, 0, 0, NULL }

/* Writes a fresh NCCL unique id (call on one rank, send it to the others). Makes no CUDA call, so a
 * process may call it before forking workers. */
EP_API ep_status_t ep_get_unique_id(ep_unique_id_t *id);

/* Writes a fresh id for an in-process group: every rank is a thread of this process and calls ep_group_create
 * with this id. Ranks may drive different GPUs (peer access is enabled between them) or share one (each rank
 * best in its own green context, an SM partition, so that one rank's waiting kernels cannot hold every SM its
 * peers need; tests use this to run many ranks on one GPU). No NCCL communicator is made. */
EP_API ep_status_t ep_get_local_unique_id(ep_unique_id_t *id);

/* Collective over the `num_ranks` ranks: each calls it with its own `rank` and the CUDA device it drives.
 * Creates an NCCL communicator, the symmetric buffers, a communication stream and host-mapped counters. */
EP_API ep_status_t ep_group_create(const ep_unique_id_t *id, int num_ranks, int rank, int cuda_device,
                                   const ep_group_config_t *config, ep_group_t *group);

/* Like ep_group_create, over an NCCL communicator the caller already has (an ncclComm_t). The caller keeps
 * ownership of the communicator and must keep it alive until ep_group_destroy returns. */
struct ncclComm;
EP_API ep_status_t ep_group_create_from_comm(struct ncclComm *comm, int cuda_device, const ep_group_config_t *config,
                                             ep_group_t *group);

/* Releases everything the group holds. Collective when the group is healthy. Returns EP_ERROR_IN_PROGRESS
 * (and destroys nothing) while work is in flight on the group's stream; low-latency work that ran on the
 * caller's stream must be finished first (ep_group_synchronize with that stream). A group whose peer failed is torn
 * down locally (its communicator aborted) so that destroy never hangs. A healthy group whose peer does not reach
 * destroy within the timeout is torn down locally too, and destroy returns EP_ERROR_TIMEOUT naming that peer;
 * any status other than EP_ERROR_IN_PROGRESS means the group was freed. NULL is a no-op. */
EP_API ep_status_t ep_group_destroy(ep_group_t group);

EP_API ep_status_t ep_group_rank(ep_group_t group, int *rank);
EP_API ep_status_t ep_group_size(ep_group_t group, int *num_ranks);
/* The group's communication stream (a cudaStream_t). */
EP_API ep_status_t ep_group_stream(ep_group_t group, void **cuda_stream);
/* This rank's part of the symmetric NVLink buffer: the first num_nvl_bytes bytes that peers can write to. */
EP_API ep_status_t ep_group_local_buffer(ep_group_t group, void **ptr, size_t *num_bytes);

/* A device barrier over the group, ordered after `cuda_stream` (a cudaStream_t; NULL = legacy default).
 * Memory written to peers before it is visible to them after it. Asynchronous: a peer that does not arrive
 * within the timeout makes it end and records EP_ERROR_TIMEOUT, reported by ep_group_synchronize or by
 * the next call on the group. */
EP_API ep_status_t ep_group_barrier(ep_group_t group, void *cuda_stream);

/* Waits (host side, with the group's timeout) for the work enqueued on `cuda_stream` and on the group's
 * stream, then returns any error the device recorded (e.g. a timeout naming the rank and stage). On a group
 * that failed earlier it still waits for the group's stream to drain (bounded) and returns the failure, so
 * ep_group_destroy can follow. */
EP_API ep_status_t ep_group_synchronize(ep_group_t group, void *cuda_stream);

/* The error the device recorded for this group, if any (does not wait). */
EP_API ep_status_t ep_group_get_async_error(ep_group_t group);

/* ---------------------------------------------------------------------------------------------------------
 * Ordering (DeepEP's previous_event / async_finish). Operations run on the group's stream, after the
 * caller's stream (or previous_event). Low-latency operations without previous_event and async_finish run
 * on the caller's stream itself, which is the same order at a lower cost.
 * ------------------------------------------------------------------------------------------------------- */
typedef struct {
    size_t size;          /* sizeof(ep_launch_t) */
    void *stream;         /* the caller's cudaStream_t; NULL: the legacy default stream */
    void *previous_event; /* a cudaEvent_t: when set, the op waits for it instead of for `stream` */
    int async_finish;     /* 0: `stream` waits for the op; 1: it does not (wait on finish_event instead) */
    void *finish_event;   /* a cudaEvent_t of the caller's: when set, recorded after the op on the stream it ran on */
} ep_launch_t;

#define EP_LAUNCH_INIT                                                                                                 \
    { sizeof(ep_launch_t), NULL, NULL, 0, NULL }

/* ---------------------------------------------------------------------------------------------------------
 * Dispatch layout (DeepEP: get_dispatch_layout)
 * ------------------------------------------------------------------------------------------------------- */
/* From topk_idx [N, K] int64 (-1 = no expert; last dimension contiguous) and E experts (E % R == 0):
 * num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool (last
 * dimension contiguous). A token counts once per rank however many of its experts live there, and once per
 * (token, expert). num_tokens_per_rdma_rank must be NULL inside one NVLink domain. Outputs are written on
 * the group's stream. Expert ids outside [-1, E) are skipped and reported as EP_ERROR_DEVICE_INPUT by the
 * next ep_group_synchronize. */
EP_API ep_status_t ep_get_dispatch_layout(ep_group_t group, const ep_tensor_t *topk_idx, int num_experts,
                                          ep_tensor_t *num_tokens_per_rank, ep_tensor_t *num_tokens_per_rdma_rank,
                                          ep_tensor_t *num_tokens_per_expert, ep_tensor_t *is_token_in_rank,
                                          const ep_launch_t *launch);

/* ---------------------------------------------------------------------------------------------------------
 * High-throughput (normal) mode: training and prefill (DeepEP: dispatch / combine)
 * ------------------------------------------------------------------------------------------------------- */
typedef struct ep_handle *ep_handle_t;

/* Bytes of symmetric NVLink buffer (config.num_nvl_bytes) that normal mode needs so that up to
 * max_tokens_per_rank tokens of `hidden` elements of `elem_bytes` bytes (2: bf16, 1: fp8), with num_scales
 * 4-byte scales per token and `topk` experts per token, can be dispatched and combined in one group.
 * 0 for sizes no dispatch accepts (num_ranks outside [1, 8], hidden outside [0, 2^24), elem_bytes outside
 * [1, 8], num_scales above 4096, topk above 32, any negative). */
EP_API size_t ep_normal_buffer_bytes(int num_ranks, int max_tokens_per_rank, int hidden, int elem_bytes, int num_scales,
                                     int topk);

typedef struct {
    size_t size;                       /* sizeof(ep_dispatch_args_t) */
    ep_tensor_t x;                     /* [N, H] bfloat16 or float8_e4m3; rows 16-byte aligned */
    ep_tensor_t x_scales;              /* FP8: [N, S] float32 or int32 words (any strides); else data NULL */
    ep_tensor_t topk_idx;              /* [N, K] int64, K <= 32, or data NULL (then no topk outputs); NULL
                                          for a cached dispatch unless its handle was made with topk */
    ep_tensor_t topk_weights;          /* [N, K] float32, or data NULL (needs topk_idx) */
    ep_tensor_t num_tokens_per_rank;   /* [R] int32, from ep_get_dispatch_layout (ignored when cached) */
    ep_tensor_t is_token_in_rank;      /* [N, R] bool (ignored when cached) */
    ep_tensor_t num_tokens_per_expert; /* [E] int32 (ignored when cached) */
    int num_experts;                   /* E (ignored when cached) */
    int expert_alignment;              /* >= 1: per-expert counts are rounded up to it */
    int num_worst_tokens;              /* > 0: outputs have this many rows and the host never waits */
    int num_sms;                       /* blocks for the send kernel; 0: the group's default */
    ep_handle_t cached_handle;         /* non-NULL: resend new x with this handle's routing, no host wait */
} ep_dispatch_args_t;

#define EP_DISPATCH_ARGS_INIT                                                                                          \
    { .size = sizeof(ep_dispatch_args_t) }

/* The recv_* outputs are views into the group's buffer, valid until the group's next dispatch: copy them if
 * they must live longer (zero-copy is what lets the receiver spend no SM time on the transfer). */
typedef struct {
    size_t size;                         /* sizeof(ep_dispatch_result_t) */
    int num_recv_tokens;                 /* Nr, or -1 when the host does not know it (worst-token or cached mode) */
    int num_rows;                        /* rows in the recv_* views: Nr, or num_worst_tokens */
    ep_tensor_t recv_x;                  /* [rows, H], same dtype as x, ordered by (source rank, source token) */
    ep_tensor_t recv_x_scales;           /* [rows, S] (FP8), else data NULL */
    ep_tensor_t recv_topk_idx;           /* [rows, K] int64: local expert ids, -1 for experts elsewhere / past Nr;
                                            data NULL for a cached dispatch without topk_idx */
    ep_tensor_t recv_topk_weights;       /* [rows, K] float32, 0 where idx is -1; data NULL without weights */
    ep_tensor_t recv_src_idx;            /* [rows] int32: token index at the source rank, -1 past Nr */
    int32_t *num_recv_tokens_per_expert; /* caller's host array of >= E/R entries, or NULL: filled unless the
                                            host does not wait (worst-token / cached mode) */
    ep_handle_t handle;                  /* new handle (not in cached mode): release with ep_handle_destroy */
} ep_dispatch_result_t;

#define EP_DISPATCH_RESULT_INIT                                                                                        \
    { .size = sizeof(ep_dispatch_result_t) }

/* Collective. Sends each token once to every rank that holds one of its experts. In the default mode the
 * host waits (with the group's timeout) for the receive count through mapped memory; with num_worst_tokens
 * or a cached handle it never waits, so the call can be captured in a CUDA graph. */
EP_API ep_status_t ep_dispatch(ep_group_t group, const ep_dispatch_args_t *args, ep_dispatch_result_t *result,
                               const ep_launch_t *launch);

typedef struct {
    size_t size;                  /* sizeof(ep_combine_args_t) */
    ep_tensor_t x;                /* [rows, H] bfloat16: row i answers received row i of the handle's dispatch */
    ep_tensor_t topk_weights;     /* [rows, K] float32 to sum back, or data NULL */
    ep_tensor_t bias0, bias1;     /* [N, H] bfloat16, or data NULL */
    ep_tensor_t out;              /* [N, H] bfloat16 (caller's memory) */
    ep_tensor_t out_topk_weights; /* [N, K] float32 when topk_weights is given, else data NULL */
    ep_handle_t handle;
    int num_sms;
} ep_combine_args_t;

#define EP_COMBINE_ARGS_INIT                                                                                           \
    { .size = sizeof(ep_combine_args_t) }

/* Collective. out[t] = sum over the ranks token t went to, in ascending rank order, of that rank's row,
 * then + bias0, + bias1, accumulated in float32 and rounded once (bitwise reproducible). */
EP_API ep_status_t ep_combine(ep_group_t group, const ep_combine_args_t *args, const ep_launch_t *launch);

/* Autotune (collective): runs one dispatch with `args` (not cached) to get a handle, then times a cached
 * dispatch plus a combine of the received rows for each candidate SM count (several runs each, slowest rank
 * counted) and returns the fastest in *best_num_sms (and its time, in microseconds, if best_time_us is not
 * NULL). Every rank must pass the same candidates. Needs a stream that can be synchronised. */
EP_API ep_status_t ep_autotune_normal(ep_group_t group, const ep_dispatch_args_t *args, const int *candidates,
                                      int num_candidates, int *best_num_sms, float *best_time_us,
                                      const ep_launch_t *launch);

/* Facts of a handle: tokens at this rank (N), tokens received (-1 if unknown on the host), rows of the
 * dispatch outputs. */
EP_API ep_status_t ep_handle_info(ep_handle_t handle, int *num_tokens, int *num_recv_tokens, int *num_rows);
/* Releases a handle (its device memory is freed in stream order on the group's stream). NULL is a no-op. */
EP_API ep_status_t ep_handle_destroy(ep_handle_t handle);

/* ---------------------------------------------------------------------------------------------------------
 * Low-latency mode: decode (DeepEP: low_latency_dispatch / low_latency_combine)
 * ------------------------------------------------------------------------------------------------------- */
typedef struct ep_ll_handle *ep_ll_handle_t;

/* Bytes of symmetric buffer (config.num_nvl_bytes) the low-latency mode needs for these sizes; 0 for sizes no
 * low-latency dispatch accepts (num_ranks in [1, 8], max_tokens_per_rank in [1, 65536], hidden a multiple of 128
 * in [128, 65536], topk in [1, 16], num_experts a multiple of num_ranks up to 4096; ep_last_error names which). */
EP_API size_t ep_low_latency_buffer_bytes(int num_ranks, int max_tokens_per_rank, int hidden, int topk,
                                          int num_experts);

typedef struct {
    size_t size;          /* sizeof(ep_low_latency_dispatch_args_t) */
    ep_tensor_t x;        /* [N, H] bfloat16, N <= max_tokens, H % 128 == 0 (% 512 with UE8M0) */
    ep_tensor_t topk_idx; /* [N, K] int64, K <= 16, -1 = no expert */
    int max_tokens;       /* T (DeepEP's num_max_dispatch_tokens_per_rank), the same on every rank */
    int num_experts;      /* E, E % R == 0 */
    int use_fp8, round_scale, use_ue8m0;
    int return_recv_hook; /* 1: only the sends now; ep_low_latency_dispatch_hook completes the receive */
    /* outputs (caller's memory, contiguous) */
    ep_tensor_t recv_x;        /* [L, R*T, H] float8_e4m3 (use_fp8) or bfloat16 */
    ep_tensor_t recv_x_scales; /* use_fp8: [L, H/128, R*T] float32, or [L, H/512, R*T] int32 (UE8M0, 4 per word)
                                  i.e. column-major in the last two dims of DeepEP's [L, R*T, S] */
    ep_tensor_t recv_count;    /* [L] int32 */
    ep_tensor_t src_info;      /* [L, R*T] int32: source token index of each row */
    ep_tensor_t layout_range;  /* [L, R] int64: (begin << 32) | count of the rows from each source rank */
    ep_tensor_t cumulative_local_expert_recv_stats; /* [L] int32 (added to), or data NULL */
    ep_tensor_t dispatch_wait_recv_cost_stats;      /* [R] int64 nanoseconds (added to), or data NULL */
} ep_low_latency_dispatch_args_t;

#define EP_LOW_LATENCY_DISPATCH_ARGS_INIT                                                                              \
    { .size = sizeof(ep_low_latency_dispatch_args_t) }

/* Collective. Each token goes once to every rank holding one of its experts; the receiver packs the
 * (token, expert) pairs per local expert in (source rank, source token) order. Never waits on the host: the
 * call (and its hook) can be captured in a CUDA graph. *handle receives a new handle for combine and the hook;
 * at most two dispatch results may be alive at once (the buffer has two halves): a handle whose half two later
 * dispatches reused, or from before a normal-mode call or ep_clean_low_latency_buffer, is refused
 * (EP_ERROR_INVALID_ARGUMENT, "stale") by its hook and by combine instead of reading another call's routing.
 * Across ranks: a dispatch's receive (its hook) must run before any rank sends the dispatch two later (without
 * hooks this holds by itself). A receive that finds a peer already there fails with EP_ERROR_DEVICE_INPUT
 * naming it, which fails the group (a best-effort check, made when the flags are read). */
EP_API ep_status_t ep_low_latency_dispatch(ep_group_t group, const ep_low_latency_dispatch_args_t *args,
                                           ep_ll_handle_t *handle, const ep_launch_t *launch);
EP_API ep_status_t ep_low_latency_dispatch_hook(ep_group_t group, ep_ll_handle_t handle, const ep_launch_t *launch);

typedef struct {
    size_t size;              /* sizeof(ep_low_latency_combine_args_t) */
    ep_tensor_t x;            /* [L, R*T, H] bfloat16: each expert's output rows, in the dispatch's order */
    ep_tensor_t topk_idx;     /* [N, K] int64: the dispatch's */
    ep_tensor_t topk_weights; /* [N, K] float32 */
    ep_tensor_t out;          /* [N, H] bfloat16 (caller's memory) */
    int return_recv_hook;     /* 1: only the sends now; ep_low_latency_combine_hook completes the receive */
    ep_tensor_t combine_wait_recv_cost_stats; /* [R] int64 nanoseconds (added to), or data NULL */
    int use_logfmt; /* 1: rows travel in LogFMT, 10 bits a value plus 4 bytes per 128-channel group, for groups
                       whose amax < 1 (others raw bf16); lossy, relative error <= 0.0324 per value (see
                       ref/logfmt.c); bit-exact with the reference's LogFMT combine */
} ep_low_latency_combine_args_t;

#define EP_LOW_LATENCY_COMBINE_ARGS_INIT                                                                               \
    { .size = sizeof(ep_low_latency_combine_args_t) }

/* Collective. out[t] = bf16(sum over k of topk_weights[t, k] * row[t, k]), float32 fmaf in k order, -1
 * entries skipped, a token with none is 0 (bit-exact with the CPU reference; with use_logfmt each row is the
 * LogFMT round trip of the expert's row). A handle may be combined any number of times. Combines alternate
 * between two staging halves, so a combine's receive (its hook) must run before any rank sends the combine two
 * later (without hooks this holds by itself; with hooks, so does a dispatch that every rank makes after that
 * hook and before that combine; a receive that finds a peer already there fails with EP_ERROR_DEVICE_INPUT
 * naming it, which fails the group). A handle holds one
 * pending combine receive: combining it again before ep_low_latency_combine_hook ran is
 * EP_ERROR_INVALID_ARGUMENT. Eager combines take turns by a host count that replays of a captured graph do not
 * advance: after a replay, dispatch before combining another handle eagerly. */
EP_API ep_status_t ep_low_latency_combine(ep_group_t group, const ep_low_latency_combine_args_t *args,
                                          ep_ll_handle_t handle, const ep_launch_t *launch);
EP_API ep_status_t ep_low_latency_combine_hook(ep_group_t group, ep_ll_handle_t handle, const ep_launch_t *launch);
/* Releases a low-latency handle. NULL is a no-op. */
EP_API ep_status_t ep_ll_handle_destroy(ep_ll_handle_t handle);
/* Zeroes the low-latency region after high-throughput use of the same buffer, or when T / H / K / E change
 * (collective: ends with a barrier). */
EP_API ep_status_t ep_clean_low_latency_buffer(ep_group_t group, int max_tokens, int hidden, int topk, int num_experts,
                                               void *cuda_stream);

#ifdef __cplusplus
}
#endif
#endif
