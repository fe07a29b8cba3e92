/* Helpers shared by the reference's unit tests: simulated ranks with random (but reproducible) tokens and
 * routing. Header-only, static functions, so each test stays one standalone program. */
#ifndef REFTEST_H
#define REFTEST_H

#include "epref.h"
#include "tcheck.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint8_t *x;        /* N rows of row_bytes, stride_bytes apart (stride may exceed the row) */
    uint32_t *scales;  /* N rows of num_scales words, scales_stride apart, or NULL */
    int64_t *topk_idx; /* [N, K] */
    float *topk_weights;
    epref_rank_input_t in;
} test_rank_t;

/* A bf16 value that sums exactly in float: a small integer (-8..8) times 2^e, e in [-4, 4]. */
static inline uint16_t exact_bf16(epref_rng_t *rng) {
    int m = (int)(epref_rng_next(rng) % 17) - 8;
    int e = (int)(epref_rng_next(rng) % 9) - 4;
    return epref_float_to_bf16(ldexpf((float)m, e));
}

/* Fills one rank: rows of hidden bf16 values (exact ones if `exact`, else normal), stride padded by
 * `pad_bytes` (poisoned, never to be read), routing from epref_random_routing. num_scales > 0 adds a scale
 * row of that many random words with stride num_scales + 3. */
static inline void test_rank_make(test_rank_t *r, epref_rng_t *rng, int n, int hidden, int topk, int experts,
                                  float mask_prob, size_t pad_bytes, int num_scales, int exact) {
    memset(r, 0, sizeof(*r));
    size_t row_bytes = 2 * (size_t)hidden, stride = row_bytes + pad_bytes;
    r->x = malloc((size_t)n * stride + 1);
    memset(r->x, 0xA5, (size_t)n * stride + 1);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < hidden; h++) {
            uint16_t v = exact ? exact_bf16(rng) : epref_float_to_bf16(epref_rng_normal(rng));
            memcpy(r->x + (size_t)t * stride + 2 * (size_t)h, &v, 2);
        }
    r->topk_idx = malloc((size_t)n * (size_t)topk * sizeof(int64_t) + 8);
    r->topk_weights = malloc((size_t)n * (size_t)topk * sizeof(float) + 8);
    epref_random_routing(rng, n, topk, experts, mask_prob, r->topk_idx, r->topk_weights);
    size_t sstride = (size_t)num_scales + 3;
    if (num_scales > 0) {
        r->scales = malloc((size_t)n * sstride * sizeof(uint32_t) + 4);
        for (size_t i = 0; i < (size_t)n * sstride; i++)
            r->scales[i] = (uint32_t)epref_rng_next(rng);
    }
    r->in.num_tokens = n;
    r->in.x = r->x;
    r->in.row_bytes = row_bytes;
    r->in.stride_bytes = stride;
    r->in.scales = r->scales;
    r->in.num_scales = num_scales;
    r->in.scales_stride = num_scales > 0 ? sstride : 0;
    r->in.topk = topk;
    r->in.topk_idx = r->topk_idx;
    r->in.topk_weights = r->topk_weights;
}

static inline void test_rank_free(test_rank_t *r) {
    free(r->x);
    free(r->scales);
    free(r->topk_idx);
    free(r->topk_weights);
    memset(r, 0, sizeof(*r));
}

/* Builds R ranks from (seed, rank) and returns the array of their inputs in `in`. */
static inline test_rank_t *test_ranks_make(uint64_t seed, int num_ranks, const int *num_tokens, int hidden, int topk,
                                           int experts, float mask_prob, size_t pad_bytes, int num_scales, int exact,
                                           epref_rank_input_t *in) {
    test_rank_t *ranks = calloc((size_t)num_ranks, sizeof(*ranks));
    for (int s = 0; s < num_ranks; s++) {
        epref_rng_t rng;
        epref_rng_seed(&rng, seed, (uint64_t)s);
        test_rank_make(&ranks[s], &rng, num_tokens[s], hidden, topk, experts, mask_prob, pad_bytes, num_scales, exact);
        in[s] = ranks[s].in;
    }
    return ranks;
}

static inline void test_ranks_free(test_rank_t *ranks, int num_ranks) {
    for (int s = 0; s < num_ranks; s++)
        test_rank_free(&ranks[s]);
    free(ranks);
}

/* bf16 element h of row t of a rank's input. */
static inline uint16_t test_x(const epref_rank_input_t *in, int t, int h) {
    uint16_t v;
    memcpy(&v, in->x + (size_t)t * in->stride_bytes + 2 * (size_t)h, 2);
    return v;
}

/* 1 if token t of `in` names an expert on rank d. */
static inline int test_goes_to(const epref_rank_input_t *in, int t, int d, int local) {
    for (int k = 0; k < in->topk; k++) {
        int64_t e = in->topk_idx[(size_t)t * (size_t)in->topk + (size_t)k];
        if (e >= 0 && e / local == d)
            return 1;
    }
    return 0;
}

static inline uint32_t test_float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float test_bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
