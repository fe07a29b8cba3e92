#include "env.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

int64_t ep_env_timeout_ms(void) {
    const char *s = getenv("EPCOMM_TIMEOUT_MS");
    if (s == NULL || *s == '\0')
        return EP_DEFAULT_TIMEOUT_MS;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (*end != '\0' || v <= 0)
        return EP_DEFAULT_TIMEOUT_MS;
    return (int64_t)v;
}

ep_log_level_t ep_env_log_level(void) {
    const char *s = getenv("EPCOMM_DEBUG");
    if (s == NULL)
        return EP_LOG_NONE;
    if (strcasecmp(s, "WARN") == 0)
        return EP_LOG_WARN;
    if (strcasecmp(s, "INFO") == 0)
        return EP_LOG_INFO;
    if (strcasecmp(s, "TRACE") == 0)
        return EP_LOG_TRACE;
    return EP_LOG_NONE;
}

int ep_env_ll_combine_warps(void) {
    static int cached = 0; /* read once: this is on the per-call path */
    if (cached == 0) {
        const char *s = getenv("EPCOMM_LL_COMBINE_WARPS");
        char *end = NULL;
        long v = s != NULL && *s != '\0' ? strtol(s, &end, 10) : 0;
        cached = (end != NULL && *end == '\0' && v >= 16 && v <= 128 && v % 16 == 0) ? (int)v : -1;
    }
    return cached;
}

int ep_env_ll_fused(void) {
    static int cached = -1; /* read once: this is on the per-call path */
    if (cached < 0) {
        const char *s = getenv("EPCOMM_LL_FUSED");
        cached = s != NULL && strcmp(s, "0") == 0       ? EP_LL_TWO_KERNELS
                 : s != NULL && strcmp(s, "plain") == 0 ? EP_LL_FUSED_PLAIN
                                                        : EP_LL_FUSED_COOPERATIVE;
    }
    return cached;
}

int ep_env_ll_combine_per_rank(void) {
    /* Read at every call (a getenv, ~0.1 us), so that a benchmark can compare both in one process. */
    const char *s = getenv("EPCOMM_LL_COMBINE_PER_RANK");
    return s != NULL && strcmp(s, "1") == 0;
}

int ep_env_ht_combine_overlap(void) {
    /* Read at every call (hundreds of microseconds each), so that a benchmark can compare both in one process. */
    const char *s = getenv("EPCOMM_HT_COMBINE_OVERLAP");
    char *end = NULL;
    long v = s != NULL && *s != '\0' ? strtol(s, &end, 10) : 0;
    return end != NULL && *end == '\0' && v >= 1 && v <= 15 ? (int)v : 0;
}

int ep_env_ht_dispatch_tma(void) {
    /* Read at every call (a high-throughput dispatch takes hundreds of microseconds), so that a benchmark can
     * compare both transports in one process. */
    const char *s = getenv("EPCOMM_HT_DISPATCH_TMA");
    return s != NULL && strcmp(s, "1") == 0;
}
