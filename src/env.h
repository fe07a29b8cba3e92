/* Settings read from EPCOMM_* environment variables (the README has the table). */
#ifndef EP_ENV_H
#define EP_ENV_H

#include <stdint.h>

#define EP_DEFAULT_TIMEOUT_MS 30000

/* EPCOMM_TIMEOUT_MS, or the default when unset or not a positive integer. */
int64_t ep_env_timeout_ms(void);

typedef enum { EP_LOG_NONE = 0, EP_LOG_WARN = 1, EP_LOG_INFO = 2, EP_LOG_TRACE = 3 } ep_log_level_t;
/* EPCOMM_DEBUG: NONE (default), WARN, INFO or TRACE. */
ep_log_level_t ep_env_log_level(void);

/* EPCOMM_LL_COMBINE_WARPS: warps per local expert in the low-latency combine's send (16, 32, ... 128; a
 * multiple of 16), or -1 when unset or invalid (the library then picks by the expected rows per expert). */
int ep_env_ll_combine_warps(void);

/* EPCOMM_LL_FUSED: how a low-latency call without a hook runs. 0: two kernels (send, receive) even when one
 * fused kernel would fit on the GPU at once; "plain": fused where it fits, by an ordinary launch (to measure
 * what the cooperative launch costs); anything else or unset: fused where it fits, by a cooperative launch. */
#define EP_LL_TWO_KERNELS       0
#define EP_LL_FUSED_COOPERATIVE 1
#define EP_LL_FUSED_PLAIN       2
int ep_env_ll_fused(void);

/* EPCOMM_LL_COMBINE_PER_RANK: 1 makes the low-latency bf16 combine send one weighted sum per (token, rank) instead
 * of one row per (token, k) (experimental: fewer bytes, two roundings; ll_combine.cu). Every rank must set it
 * alike. Anything else or unset: off. Read at every call. */
int ep_env_ll_combine_per_rank(void);

/* EPCOMM_HT_COMBINE_OVERLAP=W (1..15): the high-throughput combine reduces while it transfers, W warps of each
 * block reducing (experimental); 0, unset or invalid: transfer, barrier, then reduce. Read at every call. */
int ep_env_ht_combine_overlap(void);

/* EPCOMM_HT_DISPATCH_TMA: 1 moves the high-throughput dispatch's rows with bulk copies through shared memory
 * (experimental); anything else or unset: SM stores. */
int ep_env_ht_dispatch_tma(void);

#endif
