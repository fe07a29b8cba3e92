/* get_dispatch_layout on the reference: a token counts once per rank and once per expert, tokens with no
 * expert count nowhere, bad ids fail with a message naming token, k and id, and random routing matches a
 * brute-force count. */
#include "reftest.h"

static void layout_counts_a_token_once_per_rank_and_once_per_expert(void) {
    /* R = 2, E = 8 (experts 0-3 on rank 0, 4-7 on rank 1), K = 3 */
    const int64_t idx[] = {0,  1,  5,  /* token 0: ranks 0 and 1 */
                           2,  2,  -1, /* token 1: expert 2 twice -> counts once */
                           -1, -1, -1, /* token 2: nowhere */
                           7,  4,  6}; /* token 3: rank 1 only */
    int32_t per_rank[2], per_expert[8];
    uint8_t in_rank[4 * 2];
    TCHECK_EQ_INT(epref_dispatch_layout(idx, 4, 3, 2, 8, per_rank, per_expert, in_rank), EPREF_OK);
    const int32_t want_rank[2] = {2, 2}, want_expert[8] = {1, 1, 1, 0, 1, 1, 1, 1};
    const uint8_t want_in[8] = {1, 1, 1, 0, 0, 0, 0, 1};
    for (int r = 0; r < 2; r++)
        TCHECK(per_rank[r] == want_rank[r], "rank %d: %d tokens, expected %d", r, per_rank[r], want_rank[r]);
    for (int e = 0; e < 8; e++)
        TCHECK(per_expert[e] == want_expert[e], "expert %d: %d, expected %d", e, per_expert[e], want_expert[e]);
    for (int i = 0; i < 8; i++)
        TCHECK(in_rank[i] == want_in[i], "is_token_in_rank[%d] = %d, expected %d", i, in_rank[i], want_in[i]);
}

static void layout_accepts_zero_tokens_and_null_outputs(void) {
    int32_t per_rank[4] = {9, 9, 9, 9};
    TCHECK_EQ_INT(epref_dispatch_layout(NULL, 0, 8, 4, 64, per_rank, NULL, NULL), EPREF_OK);
    for (int r = 0; r < 4; r++)
        TCHECK(per_rank[r] == 0, "rank %d: %d tokens, expected 0", r, per_rank[r]);
}

static void layout_rejects_bad_expert_ids_naming_token_k_and_value(void) {
    int64_t idx[] = {0, 1, 2, 3, 4, 64, 5, 6};
    int32_t per_rank[4] = {7, 7, 7, 7};
    TCHECK_EQ_INT(epref_dispatch_layout(idx, 4, 2, 4, 64, per_rank, NULL, NULL), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "token 2, k 1: expert id 64 is outside [-1, 64)");
    TCHECK(per_rank[0] == 7, "outputs must stay untouched on error (got %d)", per_rank[0]);
    idx[5] = -2;
    TCHECK_EQ_INT(epref_dispatch_layout(idx, 4, 2, 4, 64, per_rank, NULL, NULL), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "token 2, k 1: expert id -2");
}

static void layout_rejects_experts_not_divisible_by_ranks(void) {
    int64_t idx[] = {0};
    TCHECK_EQ_INT(epref_dispatch_layout(idx, 1, 1, 3, 8, NULL, NULL, NULL), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "num_experts (8)");
}

static void layout_matches_brute_force_for_random_routing(void) {
    const int experts[] = {8, 64, 256, 288};
    for (int R = 2; R <= 8; R++) {
        for (int ei = 0; ei < 4; ei++) {
            int E = experts[ei], N = 200, K = E >= 32 ? (R % 2 ? 32 : 8) : 4, L = E / R;
            if (E % R)
                continue;
            epref_rng_t rng;
            epref_rng_seed(&rng, 41, (uint64_t)(R * 1000 + E));
            int64_t *idx = malloc((size_t)N * K * sizeof(int64_t));
            epref_random_routing(&rng, N, K, E, 0.1f, idx, NULL);
            int32_t *per_rank = malloc((size_t)R * 4), *per_expert = malloc((size_t)E * 4);
            uint8_t *in_rank = malloc((size_t)N * R);
            TCHECK_EQ_INT(epref_dispatch_layout(idx, N, K, R, E, per_rank, per_expert, in_rank), EPREF_OK);
            for (int r = 0; r < R; r++) {
                int want = 0;
                for (int t = 0; t < N; t++) {
                    int hit = 0;
                    for (int k = 0; k < K; k++)
                        hit |= idx[t * K + k] >= 0 && idx[t * K + k] / L == r;
                    want += hit;
                    TCHECK(in_rank[t * R + r] == hit, "R %d E %d: is_token_in_rank[%d, %d] = %d, expected %d", R, E, t,
                           r, in_rank[t * R + r], hit);
                }
                TCHECK(per_rank[r] == want, "R %d E %d rank %d: %d, expected %d", R, E, r, per_rank[r], want);
            }
            for (int e = 0; e < E; e++) {
                int want = 0;
                for (int t = 0; t < N * K; t++)
                    want += idx[t] == e; /* routing gives distinct experts per token */
                TCHECK(per_expert[e] == want, "R %d E %d expert %d: %d, expected %d", R, E, e, per_expert[e], want);
            }
            free(idx), free(per_rank), free(per_expert), free(in_rank);
        }
    }
}

int main(void) {
    TRUN(layout_counts_a_token_once_per_rank_and_once_per_expert);
    TRUN(layout_accepts_zero_tokens_and_null_outputs);
    TRUN(layout_rejects_bad_expert_ids_naming_token_k_and_value);
    TRUN(layout_rejects_experts_not_divisible_by_ranks);
    TRUN(layout_matches_brute_force_for_random_routing);
    return TDONE();
}
