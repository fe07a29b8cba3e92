/* Random routing as PERF.md describes DeepEP's benchmark: each token's experts are the top-K of (|randn| + 1)
 * scores over all E experts, so they are distinct and roughly uniform.
 *
 * Draws per token, always in this order and always all of them (so the experts do not depend on whether
 * weights were asked for or on mask_prob): E normals (expert 0 first), K uniforms for the weights, K uniforms
 * for the mask. Experts are listed by descending score, ties to the lower id. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

/* Picks the K best of scores[E] into row[], best first; chosen scores are overwritten with -1 (all are >= 1). */
static void top_k(float *scores, int num_experts, int topk, int64_t *row) {
    for (int k = 0; k < topk; k++) {
        int best = 0;
        for (int e = 1; e < num_experts; e++)
            if (scores[e] > scores[best])
                best = e;
        row[k] = best;
        scores[best] = -1.0f;
    }
}

epref_status_t epref_random_routing(epref_rng_t *r, int num_tokens, int topk, int num_experts, float mask_prob,
                                    int64_t *topk_idx, float *topk_weights) {
    if (r == NULL || num_tokens < 0 || topk < 1 || num_experts < topk)
        return epref_fail(EPREF_BAD_ARGUMENT,
                          "random_routing: need num_tokens >= 0 and 1 <= topk <= num_experts, got %d, %d, %d",
                          num_tokens, topk, num_experts);
    if (num_tokens > 0 && topk_idx == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "random_routing: topk_idx is NULL");
    float *scores = epref_zalloc((size_t)num_experts, sizeof(float));
    if (scores == NULL)
        return epref_fail(EPREF_NO_MEMORY, "random_routing: out of memory");
    for (int t = 0; t < num_tokens; t++) {
        int64_t *row = topk_idx + (size_t)t * (size_t)topk;
        for (int e = 0; e < num_experts; e++)
            scores[e] = fabsf(epref_rng_normal(r)) + 1.0f;
        top_k(scores, num_experts, topk, row);
        for (int k = 0; k < topk; k++) { /* [0.5, 1.5) on a 2^-23 grid: exact in float */
            float w = 0.5f + (float)(epref_rng_next(r) >> 41) * 0x1p-23f;
            if (topk_weights)
                topk_weights[(size_t)t * (size_t)topk + (size_t)k] = w;
        }
        for (int k = 0; k < topk; k++)
            if (epref_rng_uniform(r) < mask_prob)
                row[k] = -1;
    }
    free(scores);
    return EPREF_OK;
}
