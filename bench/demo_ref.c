/* The CPU half of the main job: an MoE round trip on the reference for R simulated ranks.
 * Normal mode: dispatch, expert y = 2x (exact in bf16), combine; each token must come back as
 * bf16(2x * number of ranks it went to). Low-latency mode (BF16): dispatch, expert y = x, weighted combine;
 * each token must come back as bf16(sum_k w_k x) accumulated with fmaf in k order. */
#include "demo.h"
#include "epref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint16_t *x;
    int64_t *topk_idx;
    float *topk_weights;
    epref_rank_input_t in;
} rank_data_t;

static void make_rank(const demo_args_t *a, int rank, rank_data_t *d) {
    size_t n = (size_t)a->tokens;
    d->x = malloc(n * (size_t)a->hidden * sizeof(uint16_t) + 16);
    d->topk_idx = malloc(n * (size_t)a->topk * sizeof(int64_t) + 16);
    d->topk_weights = malloc(n * (size_t)a->topk * sizeof(float) + 16);
    epref_rng_t rng;
    epref_rng_seed(&rng, a->seed, (uint64_t)rank);
    for (size_t i = 0; i < n * (size_t)a->hidden; i++)
        d->x[i] = epref_float_to_bf16(epref_rng_normal(&rng));
    epref_random_routing(&rng, a->tokens, a->topk, a->experts, 0.02f, d->topk_idx, d->topk_weights);
    memset(&d->in, 0, sizeof(d->in));
    d->in.num_tokens = a->tokens;
    d->in.x = (const uint8_t *)d->x;
    d->in.row_bytes = (size_t)a->hidden * 2;
    d->in.stride_bytes = d->in.row_bytes;
    d->in.topk = a->topk;
    d->in.topk_idx = d->topk_idx;
    d->in.topk_weights = d->topk_weights;
}

static void print_routing_stats(const demo_args_t *a, rank_data_t *ranks) {
    int R = a->ranks, E = a->experts;
    int32_t *per_rank = calloc((size_t)R, sizeof(int32_t));
    int32_t *per_expert = calloc((size_t)E, sizeof(int32_t));
    int32_t *tmp_rank = calloc((size_t)R, sizeof(int32_t));
    int32_t *tmp_expert = calloc((size_t)E, sizeof(int32_t));
    long long sends = 0, remote_sends = 0;
    for (int r = 0; r < R; r++) {
        uint8_t *in_rank = malloc((size_t)a->tokens * (size_t)R + 1);
        epref_dispatch_layout(ranks[r].topk_idx, a->tokens, a->topk, R, E, tmp_rank, tmp_expert, in_rank);
        for (int d = 0; d < R; d++) {
            per_rank[d] += tmp_rank[d];
            sends += tmp_rank[d];
            remote_sends += d == r ? 0 : tmp_rank[d];
        }
        for (int e = 0; e < E; e++)
            per_expert[e] += tmp_expert[e];
        free(in_rank);
    }
    int emin = per_expert[0], emax = per_expert[0];
    long long esum = 0;
    for (int e = 0; e < E; e++) {
        emin = per_expert[e] < emin ? per_expert[e] : emin;
        emax = per_expert[e] > emax ? per_expert[e] : emax;
        esum += per_expert[e];
    }
    printf("  routing: %d ranks x %d tokens, top-%d of %d experts, H=%d\n", R, a->tokens, a->topk, E, a->hidden);
    printf("  tokens received per rank:");
    for (int d = 0; d < R; d++)
        printf(" %d", per_rank[d]);
    printf("\n  (token, expert) pairs per expert: min %d, mean %.1f, max %d\n", emin, (double)esum / E, emax);
    printf("  a token reaches %.2f ranks on average; %.1f%% of its copies cross NVLink; "
           "%.1f MB of bf16 rows cross per rank per dispatch\n",
           (double)sends / ((double)R * a->tokens), 100.0 * (double)remote_sends / (double)(sends ? sends : 1),
           (double)remote_sends * a->hidden * 2 / R / 1e6);
    free(per_rank);
    free(per_expert);
    free(tmp_rank);
    free(tmp_expert);
}

/* Normal mode: returns the number of mismatching elements. */
static long long normal_round_trip(const demo_args_t *a, rank_data_t *ranks) {
    int R = a->ranks;
    epref_rank_input_t *in = calloc((size_t)R, sizeof(*in));
    epref_dispatch_result_t *recv = calloc((size_t)R, sizeof(*recv));
    uint16_t **y = calloc((size_t)R, sizeof(*y));
    size_t *y_stride = calloc((size_t)R, sizeof(*y_stride));
    for (int r = 0; r < R; r++)
        in[r] = ranks[r].in;
    long long bad = 0;
    for (int d = 0; d < R; d++) {
        if (epref_dispatch(in, R, a->experts, d, 1, 0, &recv[d]) != EPREF_OK) {
            fprintf(stderr, "dispatch: %s\n", epref_last_error());
            return -1;
        }
        size_t n = (size_t)recv[d].num_recv * (size_t)a->hidden;
        y[d] = malloc(n * sizeof(uint16_t) + 16);
        y_stride[d] = (size_t)a->hidden;
        const uint16_t *rx = (const uint16_t *)recv[d].x;
        for (size_t i = 0; i < n; i++) /* the expert: y = 2x */
            y[d][i] = epref_float_to_bf16(2.0f * epref_bf16_to_float(rx[i]));
    }
    uint16_t *out = malloc((size_t)a->tokens * (size_t)a->hidden * sizeof(uint16_t) + 16);
    uint8_t *in_rank = malloc((size_t)a->tokens * (size_t)R + 1);
    for (int r = 0; r < R; r++) {
        if (epref_combine(in, recv, (const uint16_t *const *)y, y_stride, NULL, R, a->experts, r, a->hidden, NULL, NULL,
                          out, NULL) != EPREF_OK) {
            fprintf(stderr, "combine: %s\n", epref_last_error());
            return -1;
        }
        epref_dispatch_layout(ranks[r].topk_idx, a->tokens, a->topk, R, a->experts, NULL, NULL, in_rank);
        for (int t = 0; t < a->tokens; t++) {
            int copies = 0;
            for (int d = 0; d < R; d++)
                copies += in_rank[(size_t)t * R + d];
            for (int h = 0; h < a->hidden; h++) {
                float x = epref_bf16_to_float(ranks[r].x[(size_t)t * a->hidden + h]);
                uint16_t want = epref_float_to_bf16(2.0f * x * (float)copies);
                bad += out[(size_t)t * a->hidden + h] != want;
            }
        }
    }
    for (int d = 0; d < R; d++) {
        epref_dispatch_result_free(&recv[d]);
        free(y[d]);
    }
    free(out);
    free(in_rank);
    free(in);
    free(recv);
    free(y);
    free(y_stride);
    return bad;
}

/* Low-latency mode (BF16): returns the number of mismatching elements. */
static long long ll_round_trip(const demo_args_t *a, rank_data_t *ranks) {
    int R = a->ranks;
    epref_rank_input_t *in = calloc((size_t)R, sizeof(*in));
    epref_ll_dispatch_result_t *recv = calloc((size_t)R, sizeof(*recv));
    for (int r = 0; r < R; r++)
        in[r] = ranks[r].in;
    const uint16_t **y = calloc((size_t)R, sizeof(*y));
    for (int d = 0; d < R; d++) {
        if (epref_ll_dispatch(in, R, a->experts, a->tokens, a->hidden, d, 0, 0, 0, &recv[d]) != EPREF_OK) {
            fprintf(stderr, "ll dispatch: %s\n", epref_last_error());
            return -1;
        }
        y[d] = (const uint16_t *)recv[d].x; /* the expert: identity */
    }
    long long bad = 0;
    uint16_t *out = malloc((size_t)a->tokens * (size_t)a->hidden * sizeof(uint16_t) + 16);
    for (int r = 0; r < R; r++) {
        if (epref_ll_combine(y, recv, R, a->experts, r, a->tokens, a->topk, ranks[r].topk_idx, ranks[r].topk_weights, 0,
                             out) != EPREF_OK) {
            fprintf(stderr, "ll combine: %s\n", epref_last_error());
            return -1;
        }
        for (int t = 0; t < a->tokens; t++) {
            for (int h = 0; h < a->hidden; h++) {
                float x = epref_bf16_to_float(ranks[r].x[(size_t)t * a->hidden + h]);
                float acc = 0.0f;
                for (int k = 0; k < a->topk; k++)
                    if (ranks[r].topk_idx[(size_t)t * a->topk + k] >= 0)
                        acc = fmaf(ranks[r].topk_weights[(size_t)t * a->topk + k], x, acc);
                bad += out[(size_t)t * a->hidden + h] != epref_float_to_bf16(acc);
            }
        }
    }
    for (int d = 0; d < R; d++)
        epref_ll_dispatch_result_free(&recv[d]);
    free(out);
    free(in);
    free(recv);
    free(y);
    return bad;
}

int demo_ref_round_trip(const demo_args_t *a) {
    printf("CPU reference: MoE round trip\n");
    rank_data_t *ranks = calloc((size_t)a->ranks, sizeof(*ranks));
    for (int r = 0; r < a->ranks; r++)
        make_rank(a, r, &ranks[r]);
    print_routing_stats(a, ranks);
    long long bad_normal = normal_round_trip(a, ranks);
    printf("  normal mode: dispatch -> expert y=2x -> combine: %s (%lld mismatches)\n",
           bad_normal == 0 ? "ok" : "FAILED", bad_normal);
    demo_args_t ll = *a;
    long long bad_ll = ll_round_trip(&ll, ranks);
    printf("  low-latency mode (bf16): dispatch -> identity -> weighted combine: %s (%lld mismatches)\n",
           bad_ll == 0 ? "ok" : "FAILED", bad_ll);
    for (int r = 0; r < a->ranks; r++) {
        free(ranks[r].x);
        free(ranks[r].topk_idx);
        free(ranks[r].topk_weights);
    }
    free(ranks);
    return bad_normal != 0 || bad_ll != 0;
}
