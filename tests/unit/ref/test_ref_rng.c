/* The reference's random numbers and routing: reproducible from (seed, stream), distinct streams differ,
 * sane distributions, and random routing gives distinct in-range experts per token. */
#include "reftest.h"

static void rng_same_seed_and_stream_give_the_same_sequence(void) {
    epref_rng_t a, b;
    epref_rng_seed(&a, 1234, 7);
    epref_rng_seed(&b, 1234, 7);
    for (int i = 0; i < 1000; i++) {
        uint64_t x = epref_rng_next(&a), y = epref_rng_next(&b);
        if (x != y) {
            TCHECK(x == y, "draw %d: 0x%llx vs 0x%llx", i, (unsigned long long)x, (unsigned long long)y);
            return;
        }
    }
}

static void rng_other_streams_and_seeds_give_other_sequences(void) {
    epref_rng_t base, other_stream, other_seed;
    epref_rng_seed(&base, 5, 0);
    epref_rng_seed(&other_stream, 5, 1);
    epref_rng_seed(&other_seed, 6, 0);
    int same_stream = 0, same_seed = 0;
    for (int i = 0; i < 64; i++) {
        uint64_t x = epref_rng_next(&base);
        same_stream += x == epref_rng_next(&other_stream);
        same_seed += x == epref_rng_next(&other_seed);
    }
    TCHECK(same_stream == 0 && same_seed == 0, "equal draws: %d (stream) %d (seed)", same_stream, same_seed);
}

static void rng_uniform_and_normal_have_the_right_range_and_moments(void) {
    epref_rng_t r;
    epref_rng_seed(&r, 9, 0);
    const int n = 200000;
    double su = 0, sn = 0, sn2 = 0;
    for (int i = 0; i < n; i++) {
        float u = epref_rng_uniform(&r);
        TCHECK(u >= 0.0f && u < 1.0f, "uniform draw %d is %g", i, (double)u);
        su += u;
        float z = epref_rng_normal(&r);
        TCHECK(isfinite(z), "normal draw %d is %g", i, (double)z);
        sn += z;
        sn2 += (double)z * z;
    }
    TCHECK(fabs(su / n - 0.5) < 0.005, "uniform mean %g", su / n);
    TCHECK(fabs(sn / n) < 0.01, "normal mean %g", sn / n);
    TCHECK(fabs(sn2 / n - 1.0) < 0.02, "normal variance %g", sn2 / n);
}

static void routing_gives_distinct_in_range_experts_and_weights_in_range(void) {
    const int cases[][3] = {{8, 1, 8}, {8, 8, 8}, {64, 8, 200}, {256, 8, 300}, {288, 32, 100}};
    for (int c = 0; c < 5; c++) {
        int E = cases[c][0], K = cases[c][1], N = cases[c][2];
        epref_rng_t r;
        epref_rng_seed(&r, 10, (uint64_t)c);
        int64_t *idx = malloc((size_t)N * K * sizeof(int64_t));
        float *w = malloc((size_t)N * K * sizeof(float));
        TCHECK_EQ_INT(epref_random_routing(&r, N, K, E, 0.0f, idx, w), EPREF_OK);
        for (int t = 0; t < N; t++)
            for (int k = 0; k < K; k++) {
                int64_t e = idx[t * K + k];
                TCHECK(e >= 0 && e < E, "E %d token %d k %d: expert %lld", E, t, k, (long long)e);
                for (int j = 0; j < k; j++)
                    TCHECK(idx[t * K + j] != e, "E %d token %d: expert %lld at k %d and %d", E, t, (long long)e, j, k);
                float wt = w[t * K + k];
                TCHECK(wt >= 0.5f && wt < 1.5f, "E %d token %d k %d: weight %g", E, t, k, (double)wt);
            }
        free(idx), free(w);
    }
}

static void routing_is_reproducible_and_independent_of_weights_being_asked_for(void) {
    int64_t a[50 * 8], b[50 * 8];
    float w[50 * 8];
    epref_rng_t r1, r2;
    epref_rng_seed(&r1, 77, 3);
    epref_rng_seed(&r2, 77, 3);
    TCHECK_EQ_INT(epref_random_routing(&r1, 50, 8, 64, 0.1f, a, w), EPREF_OK);
    TCHECK_EQ_INT(epref_random_routing(&r2, 50, 8, 64, 0.1f, b, NULL), EPREF_OK);
    TCHECK(memcmp(a, b, sizeof(a)) == 0, "routing depends on whether weights were asked for");
    TCHECK(epref_rng_next(&r1) == epref_rng_next(&r2), "the generators should be in the same state afterwards");
}

static void routing_mask_probability_0_and_1_and_bad_topk(void) {
    int64_t idx[100 * 4];
    epref_rng_t r;
    epref_rng_seed(&r, 3, 0);
    TCHECK_EQ_INT(epref_random_routing(&r, 100, 4, 16, 1.0f, idx, NULL), EPREF_OK);
    int masked = 0;
    for (int i = 0; i < 400; i++)
        masked += idx[i] == -1;
    TCHECK(masked == 400, "mask 1: %d of 400 entries are -1", masked);
    TCHECK_EQ_INT(epref_random_routing(&r, 100, 4, 16, 0.0f, idx, NULL), EPREF_OK);
    masked = 0;
    for (int i = 0; i < 400; i++)
        masked += idx[i] == -1;
    TCHECK(masked == 0, "mask 0: %d entries are -1", masked);
    TCHECK_EQ_INT(epref_random_routing(&r, 100, 4, 16, 0.5f, idx, NULL), EPREF_OK);
    masked = 0;
    for (int i = 0; i < 400; i++)
        masked += idx[i] == -1;
    TCHECK(masked > 140 && masked < 260, "mask 0.5: %d of 400 entries are -1", masked);
    TCHECK_EQ_INT(epref_random_routing(&r, 10, 9, 8, 0.0f, idx, NULL), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "topk <= num_experts");
}

int main(void) {
    TRUN(rng_same_seed_and_stream_give_the_same_sequence);
    TRUN(rng_other_streams_and_seeds_give_other_sequences);
    TRUN(rng_uniform_and_normal_have_the_right_range_and_moments);
    TRUN(routing_gives_distinct_in_range_experts_and_weights_in_range);
    TRUN(routing_is_reproducible_and_independent_of_weights_being_asked_for);
    TRUN(routing_mask_probability_0_and_1_and_bad_topk);
    return TDONE();
}
