/* The EPCOMM_* settings read at every call parse as env.h says: the experimental kernels' switches take only
 * their documented values, anything else leaves them off. */
#define _POSIX_C_SOURCE 200809L
#include "env.h"
#include "tcheck.h"

#include <stdlib.h>

static void ll_combine_per_rank_is_on_only_for_1(void) {
    unsetenv("EPCOMM_LL_COMBINE_PER_RANK");
    TCHECK_EQ_INT(ep_env_ll_combine_per_rank(), 0);
    setenv("EPCOMM_LL_COMBINE_PER_RANK", "1", 1);
    TCHECK_EQ_INT(ep_env_ll_combine_per_rank(), 1);
    const char *off[] = {"0", "", "yes", "11", " 1"};
    for (int i = 0; i < 5; i++) {
        setenv("EPCOMM_LL_COMBINE_PER_RANK", off[i], 1);
        TCHECK(ep_env_ll_combine_per_rank() == 0, "'%s' turned it on", off[i]);
    }
    unsetenv("EPCOMM_LL_COMBINE_PER_RANK");
}

static void ht_combine_overlap_takes_1_to_15_warps(void) {
    unsetenv("EPCOMM_HT_COMBINE_OVERLAP");
    TCHECK_EQ_INT(ep_env_ht_combine_overlap(), 0);
    setenv("EPCOMM_HT_COMBINE_OVERLAP", "8", 1);
    TCHECK_EQ_INT(ep_env_ht_combine_overlap(), 8);
    setenv("EPCOMM_HT_COMBINE_OVERLAP", "15", 1);
    TCHECK_EQ_INT(ep_env_ht_combine_overlap(), 15);
    const char *off[] = {"0", "16", "-1", "4x", ""};
    for (int i = 0; i < 5; i++) {
        setenv("EPCOMM_HT_COMBINE_OVERLAP", off[i], 1);
        TCHECK(ep_env_ht_combine_overlap() == 0, "'%s' gave %d", off[i], ep_env_ht_combine_overlap());
    }
    unsetenv("EPCOMM_HT_COMBINE_OVERLAP");
}

static void ht_dispatch_tma_is_on_only_for_1(void) {
    unsetenv("EPCOMM_HT_DISPATCH_TMA");
    TCHECK_EQ_INT(ep_env_ht_dispatch_tma(), 0);
    setenv("EPCOMM_HT_DISPATCH_TMA", "1", 1);
    TCHECK_EQ_INT(ep_env_ht_dispatch_tma(), 1);
    setenv("EPCOMM_HT_DISPATCH_TMA", "true", 1);
    TCHECK_EQ_INT(ep_env_ht_dispatch_tma(), 0);
    unsetenv("EPCOMM_HT_DISPATCH_TMA");
}

static void timeout_falls_back_to_the_default(void) {
    setenv("EPCOMM_TIMEOUT_MS", "2500", 1);
    TCHECK(ep_env_timeout_ms() == 2500, "got %lld", (long long)ep_env_timeout_ms());
    const char *bad[] = {"0", "-5", "10s", ""};
    for (int i = 0; i < 4; i++) {
        setenv("EPCOMM_TIMEOUT_MS", bad[i], 1);
        TCHECK(ep_env_timeout_ms() == EP_DEFAULT_TIMEOUT_MS, "'%s' gave %lld", bad[i], (long long)ep_env_timeout_ms());
    }
    unsetenv("EPCOMM_TIMEOUT_MS");
}

int main(void) {
    TRUN(ll_combine_per_rank_is_on_only_for_1);
    TRUN(ht_combine_overlap_takes_1_to_15_warps);
    TRUN(ht_dispatch_tma_is_on_only_for_1);
    TRUN(timeout_falls_back_to_the_default);
    return TDONE();
}
