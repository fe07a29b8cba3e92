/* Normal (high-throughput) combine on the reference: the float32 sum in ascending rank order, 0/1/2 biases,
 * weights summed back, tokens that went nowhere, NaN/Inf policy, handle checks, and the property
 * dispatch -> identity experts -> combine == x * (number of destination ranks). */
#include "reftest.h"

typedef struct {
    int R, E, H, K;
    int n[8];
    epref_rank_input_t in[8];
    test_rank_t *ranks;
    epref_dispatch_result_t recv[8];
    uint16_t *y[8]; /* expert outputs per destination, [num_recv, y_stride] */
    size_t y_stride[8];
    float *w[8]; /* weights sent back: the received weights */
} world_t;

/* Dispatches for every rank; the expert on rank d returns bf16(x * scale_d) (scale_d = 1: identity). */
static void world_make(world_t *w, uint64_t seed, int R, int E, int H, int K, float mask, int exact,
                       const float *scale) {
    w->R = R, w->E = E, w->H = H, w->K = K;
    w->ranks = test_ranks_make(seed, R, w->n, H, K, E, mask, 10, 0, exact, w->in);
    for (int d = 0; d < R; d++) {
        TCHECK_EQ_INT(epref_dispatch(w->in, R, E, d, 1, 0, &w->recv[d]), EPREF_OK);
        w->y_stride[d] = (size_t)H + 8; /* rows further apart than their length */
        w->y[d] = calloc((size_t)w->recv[d].num_recv * w->y_stride[d] + 1, sizeof(uint16_t));
        for (int r = 0; r < w->recv[d].num_recv; r++)
            for (int h = 0; h < H; h++) {
                uint16_t v;
                memcpy(&v, w->recv[d].x + ((size_t)r * H + h) * 2, 2);
                w->y[d][r * w->y_stride[d] + h] = epref_float_to_bf16(epref_bf16_to_float(v) * scale[d]);
            }
        w->w[d] = w->recv[d].topk_weights;
    }
}

static void world_free(world_t *w) {
    for (int d = 0; d < w->R; d++) {
        epref_dispatch_result_free(&w->recv[d]);
        free(w->y[d]);
    }
    test_ranks_free(w->ranks, w->R);
}

static epref_status_t world_combine(world_t *w, int rank, const uint16_t *b0, const uint16_t *b1, uint16_t *out,
                                    float *out_w) {
    return epref_combine(w->in, w->recv, (const uint16_t *const *)w->y, w->y_stride, (const float *const *)w->w, w->R,
                         w->E, rank, w->H, b0, b1, out, out_w);
}

/* The row of token t of `rank` on destination d, by a plain search (the slow, obvious way). */
static int find_row(const world_t *w, int d, int rank, int t) {
    for (int r = 0; r < w->recv[d].num_recv; r++)
        if (w->recv[d].src_rank[r] == rank && w->recv[d].src_token[r] == t)
            return r;
    return -1;
}

static uint16_t *random_bias(epref_rng_t *rng, int n, int H) {
    uint16_t *b = malloc((size_t)n * H * 2 + 2);
    for (int i = 0; i < n * H; i++)
        b[i] = epref_float_to_bf16(epref_rng_normal(rng));
    return b;
}

static void combine_sums_in_float_in_ascending_rank_order_then_biases(void) {
    const float scale[8] = {1.0f, 1.37f, -0.61f, 2.03f, 0.77f, 1.11f, -1.5f, 0.3f};
    world_t w = {0};
    w.R = 4;
    for (int s = 0; s < 4; s++)
        w.n[s] = 25 + 7 * s;
    world_make(&w, 61, 4, 64, 256, 8, 0.3f, 0, scale);
    epref_rng_t rng;
    epref_rng_seed(&rng, 61, 99);
    for (int rank = 0; rank < w.R; rank++) {
        int n = w.n[rank], H = w.H;
        uint16_t *b0 = random_bias(&rng, n, H), *b1 = random_bias(&rng, n, H);
        uint16_t *out = malloc((size_t)n * H * 2 + 2);
        for (int nb = 0; nb <= 2; nb++) {
            const uint16_t *c0 = nb >= 1 ? b0 : NULL, *c1 = nb >= 2 ? b1 : NULL;
            TCHECK_EQ_INT(world_combine(&w, rank, c0, c1, out, NULL), EPREF_OK);
            int bad = 0;
            for (int t = 0; t < n && !bad; t++)
                for (int h = 0; h < H && !bad; h++) {
                    float acc = 0.0f;
                    for (int d = 0; d < w.R; d++) {
                        int r = find_row(&w, d, rank, t);
                        if (r >= 0)
                            acc += epref_bf16_to_float(w.y[d][r * w.y_stride[d] + h]);
                    }
                    if (c0)
                        acc += epref_bf16_to_float(c0[t * H + h]);
                    if (c1)
                        acc += epref_bf16_to_float(c1[t * H + h]);
                    uint16_t want = epref_float_to_bf16(acc);
                    if (out[t * H + h] != want) {
                        TCHECK(out[t * H + h] == want, "%d biases, rank %d token %d h %d: 0x%04X, expected 0x%04X", nb,
                               rank, t, h, out[t * H + h], want);
                        bad = 1;
                    }
                }
        }
        free(b0), free(b1), free(out);
    }
    world_free(&w);
}

static void combine_order_is_ascending_rank_then_bias0_then_bias1(void) {
    /* Absorption makes the order visible: 2^25 + 1 rounds back to 2^25 in float. R = 3, one expert per rank. */
    const float one[3] = {1, 1, 1};
    world_t w = {0};
    w.n[0] = 2, w.n[1] = 0, w.n[2] = 0;
    world_make(&w, 67, 3, 3, 128, 3, 0.0f, 1, one);
    const int64_t idx[6] = {0, 1, 2, 1, -1, -1}; /* token 0 to every rank, token 1 to rank 1 only */
    memcpy(w.ranks[0].topk_idx, idx, sizeof(idx));
    for (int d = 0; d < 3; d++) {
        epref_dispatch_result_free(&w.recv[d]);
        TCHECK_EQ_INT(epref_dispatch(w.in, 3, 3, d, 1, 0, &w.recv[d]), EPREF_OK);
        w.w[d] = w.recv[d].topk_weights;
    }
    const uint16_t big = epref_float_to_bf16(0x1p25f), neg_big = epref_float_to_bf16(-0x1p25f);
    const uint16_t one_bf16 = epref_float_to_bf16(1.0f);
    w.y[0][0] = one_bf16; /* token 0: 1 + 2^25 - 2^25 = 0 in ascending order (descending would give 1) */
    w.y[1][0] = big;
    w.y[2][0] = neg_big;
    w.y[1][w.y_stride[1]] = big; /* token 1: 2^25 + bias0 1 + bias1 -2^25 = 0 (bias1 first would give 1) */
    uint16_t b0[2 * 128] = {0}, b1[2 * 128] = {0}, out[2 * 128];
    b0[128] = one_bf16;
    b1[128] = neg_big;
    TCHECK_EQ_INT(world_combine(&w, 0, b0, b1, out, NULL), EPREF_OK);
    TCHECK(out[0] == 0, "token 0: 0x%04X, expected +0 (ranks summed in ascending order)", out[0]);
    TCHECK(out[128] == 0, "token 1: 0x%04X, expected +0 (ranks, then bias0, then bias1)", out[128]);
    world_free(&w);
}

static void combine_token_that_went_nowhere_gives_its_bias_or_zero(void) {
    const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    world_t w = {0};
    w.n[0] = 6, w.n[1] = 4;
    world_make(&w, 62, 2, 8, 128, 2, 0.0f, 0, one);
    for (int i = 0; i < 2 * 2; i++) /* tokens 0 and 1 of rank 0 go nowhere */
        w.ranks[0].topk_idx[i] = -1;
    for (int d = 0; d < 2; d++) { /* re-dispatch with the new routing */
        epref_dispatch_result_free(&w.recv[d]);
        TCHECK_EQ_INT(epref_dispatch(w.in, 2, 8, d, 1, 0, &w.recv[d]), EPREF_OK);
        w.w[d] = w.recv[d].topk_weights;
        for (int r = 0; r < w.recv[d].num_recv; r++)
            memcpy(w.y[d] + r * w.y_stride[d], w.recv[d].x + (size_t)r * 256, 256);
    }
    epref_rng_t rng;
    epref_rng_seed(&rng, 62, 9);
    uint16_t *b0 = random_bias(&rng, 6, 128), *b1 = random_bias(&rng, 6, 128), out[6 * 128];
    float out_w[6 * 2];
    TCHECK_EQ_INT(world_combine(&w, 0, NULL, NULL, out, out_w), EPREF_OK);
    for (int h = 0; h < 2 * 128; h++)
        TCHECK(out[h] == 0, "no bias: element %d is 0x%04X, expected +0", h, out[h]);
    for (int k = 0; k < 4; k++)
        TCHECK(out_w[k] == 0.0f, "weight %d is %g, expected 0", k, (double)out_w[k]);
    TCHECK_EQ_INT(world_combine(&w, 0, b0, NULL, out, NULL), EPREF_OK);
    for (int h = 0; h < 2 * 128; h++)
        TCHECK(out[h] == epref_float_to_bf16(0.0f + epref_bf16_to_float(b0[h])), "one bias: element %d", h);
    TCHECK_EQ_INT(world_combine(&w, 0, b0, b1, out, NULL), EPREF_OK);
    for (int h = 0; h < 2 * 128; h++) {
        uint16_t want = epref_float_to_bf16(epref_bf16_to_float(b0[h]) + epref_bf16_to_float(b1[h]));
        TCHECK(out[h] == want, "two biases: element %d is 0x%04X, expected 0x%04X", h, out[h], want);
    }
    free(b0), free(b1);
    world_free(&w);
}

static void combine_sums_weights_back_to_the_original(void) {
    const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    world_t w = {0};
    for (int s = 0; s < 5; s++)
        w.n[s] = 30 + s;
    world_make(&w, 63, 5, 40, 128, 6, 0.25f, 0, one);
    for (int rank = 0; rank < 5; rank++) {
        int n = w.n[rank], K = w.K;
        uint16_t *out = malloc((size_t)n * 128 * 2);
        float *out_w = malloc((size_t)n * K * sizeof(float));
        TCHECK_EQ_INT(world_combine(&w, rank, NULL, NULL, out, out_w), EPREF_OK);
        for (int i = 0; i < n * K; i++) {
            float want = w.ranks[rank].topk_idx[i] >= 0 ? w.ranks[rank].topk_weights[i] : 0.0f;
            TCHECK(out_w[i] == want, "rank %d entry %d: weight %g, expected %g", rank, i, (double)out_w[i],
                   (double)want);
        }
        free(out), free(out_w);
    }
    world_free(&w);
}

static void combine_follows_ieee_for_nan_and_inf(void) {
    /* one token sent to both ranks of R = 2; the experts return NaN / Inf in some channels */
    const float one[2] = {1, 1};
    world_t w = {0};
    w.n[0] = 1, w.n[1] = 0;
    world_make(&w, 64, 2, 4, 128, 2, 0.0f, 1, one);
    w.ranks[0].topk_idx[0] = 0, w.ranks[0].topk_idx[1] = 3; /* experts on rank 0 and rank 1 */
    for (int d = 0; d < 2; d++) {
        epref_dispatch_result_free(&w.recv[d]);
        TCHECK_EQ_INT(epref_dispatch(w.in, 2, 4, d, 1, 0, &w.recv[d]), EPREF_OK);
        w.w[d] = w.recv[d].topk_weights;
        free(w.y[d]);
        w.y[d] = calloc(w.y_stride[d], 2);
        TCHECK_EQ_INT(w.recv[d].num_recv, 1);
    }
    w.y[0][0] = 0x7FC0, w.y[1][0] = epref_float_to_bf16(1.0f);  /* NaN + 1 = NaN */
    w.y[0][1] = 0x7F80, w.y[1][1] = epref_float_to_bf16(-5.0f); /* Inf - 5 = Inf */
    w.y[0][2] = 0x7F80, w.y[1][2] = 0xFF80;                     /* Inf - Inf = NaN */
    w.y[0][3] = 0x7F7F, w.y[1][3] = 0x7F7F;                     /* max bf16 * 2 overflows to Inf */
    w.y[0][4] = 0x8000, w.y[1][4] = 0x8000;                     /* 0 + -0 + -0 = +0 */
    uint16_t out[128];
    TCHECK_EQ_INT(world_combine(&w, 0, NULL, NULL, out, NULL), EPREF_OK);
    TCHECK(isnan(epref_bf16_to_float(out[0])), "NaN + 1 gave 0x%04X", out[0]);
    TCHECK(out[1] == 0x7F80, "Inf - 5 gave 0x%04X", out[1]);
    TCHECK(isnan(epref_bf16_to_float(out[2])), "Inf - Inf gave 0x%04X", out[2]);
    TCHECK(out[3] == 0x7F80, "overflow gave 0x%04X", out[3]);
    TCHECK(out[4] == 0x0000, "-0 + -0 from a +0 accumulator gave 0x%04X", out[4]);
    world_free(&w);
}

static void combine_rejects_a_handle_from_other_routing_and_bad_ids(void) {
    const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    world_t w = {0};
    w.n[0] = 20, w.n[1] = 20, w.n[2] = 20;
    world_make(&w, 65, 3, 24, 128, 4, 0.0f, 0, one);
    uint16_t out[20 * 128];
    out[0] = 0x1234;
    int64_t saved = w.ranks[1].topk_idx[5 * 4];
    /* token 5 now names a different expert than the one it was dispatched with */
    w.ranks[1].topk_idx[5 * 4] = (saved + 8) % 24;
    epref_status_t st = world_combine(&w, 1, NULL, NULL, out, NULL);
    TCHECK(st == EPREF_BAD_ARGUMENT || st == EPREF_OK, "status %d", st); /* may still map to the same ranks */
    int64_t all_on_one[4] = {0, 1, 2, 3};                                /* now rank 0 only */
    memcpy(w.ranks[1].topk_idx + 5 * 4, all_on_one, sizeof(all_on_one));
    out[0] = 0x1234;
    TCHECK_EQ_INT(world_combine(&w, 1, NULL, NULL, out, NULL), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "does not match");
    TCHECK(out[0] == 0x1234, "out written before the handle check failed");
    w.ranks[1].topk_idx[5 * 4] = 24;
    TCHECK_EQ_INT(world_combine(&w, 1, NULL, NULL, out, NULL), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "token 5, k 0: expert id 24");
    world_free(&w);
}

static void combine_of_identity_experts_gives_x_times_destination_count(void) {
    const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    const int experts[] = {8, 64, 256, 288};
    int c = 0;
    for (int R = 2; R <= 8; R++) {
        for (int ei = 0; ei < 4; ei++) {
            int E = experts[ei];
            if (E % R)
                continue;
            int H = c % 3 == 0 ? 2048 : 256, K = E >= 64 ? 8 : 3;
            world_t w = {0};
            for (int s = 0; s < R; s++)
                w.n[s] = (s + c) % 4 == 0 ? 0 : 12 + (s * 7 + c) % 20;
            world_make(&w, 66 + (uint64_t)c, R, E, H, K, 0.1f, 1, one);
            int bad = 0;
            for (int rank = 0; rank < R && !bad; rank++) {
                int n = w.n[rank];
                uint16_t *out = malloc((size_t)n * H * 2 + 2);
                TCHECK_EQ_INT(world_combine(&w, rank, NULL, NULL, out, NULL), EPREF_OK);
                for (int t = 0; t < n && !bad; t++) {
                    int copies = 0;
                    for (int d = 0; d < R; d++)
                        copies += test_goes_to(&w.in[rank], t, d, E / R);
                    for (int h = 0; h < H && !bad; h++) {
                        float x = epref_bf16_to_float(test_x(&w.in[rank], t, h));
                        /* the sum starts from +0, so a token that went nowhere gives +0, not x * 0 = -0 */
                        uint16_t want = epref_float_to_bf16(0.0f + x * (float)copies);
                        if (out[(size_t)t * H + h] != want) {
                            TCHECK(0, "R %d E %d rank %d token %d h %d: 0x%04X, expected 0x%04X (x %g, %d copies)", R,
                                   E, rank, t, h, out[(size_t)t * H + h], want, (double)x, copies);
                            bad = 1;
                        }
                    }
                }
                free(out);
            }
            world_free(&w);
            c++;
        }
    }
}

int main(void) {
    TRUN(combine_sums_in_float_in_ascending_rank_order_then_biases);
    TRUN(combine_order_is_ascending_rank_then_bias0_then_bias1);
    TRUN(combine_token_that_went_nowhere_gives_its_bias_or_zero);
    TRUN(combine_sums_weights_back_to_the_original);
    TRUN(combine_follows_ieee_for_nan_and_inf);
    TRUN(combine_rejects_a_handle_from_other_routing_and_bad_ids);
    TRUN(combine_of_identity_experts_gives_x_times_destination_count);
    return TDONE();
}
