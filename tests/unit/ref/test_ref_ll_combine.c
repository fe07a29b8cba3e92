/* Low-latency combine on the reference: fmaf in k order, -1 entries skipped, a token with no expert is zero,
 * a duplicated expert's row counts once per entry, LogFMT, handle checks, per-rank sums, and the properties
 * dispatch(BF16 / FP8) -> identity experts -> combine == x * sum of weights (within the format's error). */
#include "reftest.h"

typedef struct {
    int R, E, T, H, K;
    int n[8];
    epref_rank_input_t in[8];
    test_rank_t *ranks;
    epref_ll_dispatch_result_t recv[8];
    uint16_t *y[8]; /* [L, R*T, H] expert outputs per destination */
} ll_world_t;

/* The expert on rank d returns bf16(value * scale[d]), where value is the bf16 row or the dequantised FP8 row. */
static void ll_world_dispatch(ll_world_t *w, int use_fp8, const float *scale) {
    int L = w->E / w->R;
    size_t slots = (size_t)w->R * w->T, H = (size_t)w->H;
    for (int d = 0; d < w->R; d++) {
        TCHECK_EQ_INT(epref_ll_dispatch(w->in, w->R, w->E, w->T, w->H, d, use_fp8, 0, 0, &w->recv[d]), EPREF_OK);
        w->y[d] = calloc((size_t)L * slots * H, sizeof(uint16_t));
        for (size_t row = 0; row < (size_t)L * slots; row++)
            for (size_t h = 0; h < H; h++) {
                float v;
                if (use_fp8)
                    v = epref_e4m3_to_float(((const uint8_t *)w->recv[d].x)[row * H + h]) *
                        ((const float *)w->recv[d].scales)[row * (H / 128) + h / 128];
                else
                    v = epref_bf16_to_float(((const uint16_t *)w->recv[d].x)[row * H + h]);
                w->y[d][row * H + h] = epref_float_to_bf16(v * scale[d]);
            }
    }
}

static void ll_world_make(ll_world_t *w, uint64_t seed, int R, int E, int T, int H, int K, float mask, float x_scale) {
    w->R = R, w->E = E, w->T = T, w->H = H, w->K = K;
    w->ranks = test_ranks_make(seed, R, w->n, H, K, E, mask, 0, 0, 0, w->in);
    for (int s = 0; s < R; s++) /* x_scale < 1 keeps groups below 1, where LogFMT applies */
        for (int i = 0; i < w->n[s] * H; i++) {
            uint16_t v;
            memcpy(&v, w->ranks[s].x + 2 * (size_t)i, 2);
            v = epref_float_to_bf16(epref_bf16_to_float(v) * x_scale);
            memcpy(w->ranks[s].x + 2 * (size_t)i, &v, 2);
        }
}

static void ll_world_free(ll_world_t *w) {
    for (int d = 0; d < w->R; d++) {
        epref_ll_dispatch_result_free(&w->recv[d]);
        free(w->y[d]);
    }
    test_ranks_free(w->ranks, w->R);
}

static epref_status_t ll_world_combine(ll_world_t *w, int rank, int use_logfmt, uint16_t *out) {
    return epref_ll_combine((const uint16_t *const *)w->y, w->recv, w->R, w->E, rank, w->n[rank], w->K,
                            w->ranks[rank].topk_idx, w->ranks[rank].topk_weights, use_logfmt, out);
}

/* The row expert e produced for token t of `rank`, found the slow way (scan of src_info in the block). */
static const uint16_t *expert_row(const ll_world_t *w, int rank, int t, int64_t e) {
    int L = w->E / w->R, d = (int)(e / L), l = (int)(e % L);
    size_t slots = (size_t)w->R * w->T;
    int64_t range = w->recv[d].layout_range[l * w->R + rank];
    for (int64_t i = range >> 32; i < (range >> 32) + (range & 0xFFFFFFFF); i++)
        if (w->recv[d].src_info[l * slots + i] == t)
            return w->y[d] + ((size_t)l * slots + (size_t)i) * w->H;
    return NULL;
}

/* Checks every output element against fmaf in k order over the rows (decoded with LogFMT if asked). */
static int check_against_fma_chain(ll_world_t *w, int rank, int use_logfmt, const uint16_t *out, const char *what) {
    int H = w->H, K = w->K;
    float *v = malloc((size_t)H * sizeof(float)), *acc = malloc((size_t)H * sizeof(float));
    int ok = 1;
    for (int t = 0; t < w->n[rank] && ok; t++) {
        for (int h = 0; h < H; h++)
            acc[h] = 0.0f;
        for (int k = 0; k < K; k++) {
            int64_t e = w->ranks[rank].topk_idx[t * K + k];
            if (e < 0)
                continue;
            const uint16_t *row = expert_row(w, rank, t, e);
            for (int g = 0; g < H; g += 128) {
                if (use_logfmt)
                    epref_logfmt_roundtrip(row + g, 128, v + g);
                else
                    for (int h = g; h < g + 128; h++)
                        v[h] = epref_bf16_to_float(row[h]);
            }
            for (int h = 0; h < H; h++)
                acc[h] = fmaf(w->ranks[rank].topk_weights[t * K + k], v[h], acc[h]);
        }
        for (int h = 0; h < H && ok; h++) {
            uint16_t want = epref_float_to_bf16(acc[h]);
            ok = out[(size_t)t * H + h] == want;
            TCHECK(ok, "%s: rank %d token %d h %d: 0x%04X, expected 0x%04X", what, rank, t, h, out[(size_t)t * H + h],
                   want);
        }
    }
    free(v), free(acc);
    return ok;
}

static void ll_combine_is_fmaf_in_k_order_over_expert_rows(void) {
    const float scale[4] = {1.0f, -0.37f, 1.91f, 0.613f};
    ll_world_t w = {0};
    for (int s = 0; s < 4; s++)
        w.n[s] = 5 + 3 * s;
    ll_world_make(&w, 81, 4, 32, 16, 256, 6, 0.2f, 1.0f);
    ll_world_dispatch(&w, 0, scale);
    for (int rank = 0; rank < 4; rank++) {
        uint16_t *out = malloc((size_t)w.n[rank] * w.H * 2);
        TCHECK_EQ_INT(ll_world_combine(&w, rank, 0, out), EPREF_OK);
        check_against_fma_chain(&w, rank, 0, out, "scaled experts");
        free(out);
    }
    ll_world_free(&w);
}

static void ll_combine_token_with_no_expert_is_zero_and_duplicates_count_per_entry(void) {
    const float one[2] = {1, 1};
    ll_world_t w = {0};
    w.n[0] = 3, w.n[1] = 1;
    ll_world_make(&w, 82, 2, 4, 4, 128, 3, 0.0f, 1.0f);
    int64_t r0[9] = {-1, -1, -1, 2, 2, -1, 1, 3, 1}; /* token 0 nowhere; tokens 1 and 2 repeat an expert */
    memcpy(w.ranks[0].topk_idx, r0, sizeof(r0));
    float wts[9] = {1, 1, 1, 0.75f, 0.5f, 9.0f, 0.25f, 1.0f, 2.0f};
    memcpy(w.ranks[0].topk_weights, wts, sizeof(wts));
    ll_world_dispatch(&w, 0, one);
    TCHECK_EQ_INT(w.recv[1].recv_count[0], 1 + (w.ranks[1].topk_idx[0] == 2 || w.ranks[1].topk_idx[1] == 2 ||
                                                w.ranks[1].topk_idx[2] == 2)); /* (0,1) sent to expert 2 once */
    uint16_t out[3 * 128];
    TCHECK_EQ_INT(ll_world_combine(&w, 0, 0, out), EPREF_OK);
    for (int h = 0; h < 128; h++)
        TCHECK(out[h] == 0, "token 0 h %d: 0x%04X, expected +0", h, out[h]);
    for (int h = 0; h < 128; h++) {
        float x1 = epref_bf16_to_float(test_x(&w.in[0], 1, h)), x2 = epref_bf16_to_float(test_x(&w.in[0], 2, h));
        uint16_t want1 = epref_float_to_bf16(fmaf(0.5f, x1, fmaf(0.75f, x1, 0.0f)));
        uint16_t want2 = epref_float_to_bf16(fmaf(2.0f, x2, fmaf(1.0f, x2, fmaf(0.25f, x2, 0.0f))));
        TCHECK(out[128 + h] == want1, "token 1 h %d: 0x%04X, expected 0x%04X", h, out[128 + h], want1);
        TCHECK(out[256 + h] == want2, "token 2 h %d: 0x%04X, expected 0x%04X", h, out[256 + h], want2);
    }
    ll_world_free(&w);
}

static void ll_combine_rejects_bad_ids_more_than_t_and_foreign_handles(void) {
    const float one[3] = {1, 1, 1};
    ll_world_t w = {0};
    w.n[0] = 4, w.n[1] = 4, w.n[2] = 4;
    ll_world_make(&w, 83, 3, 6, 4, 128, 2, 0.0f, 1.0f);
    ll_world_dispatch(&w, 0, one);
    uint16_t out[4 * 128];
    out[0] = 0x4321;
    int64_t e_saved = w.ranks[2].topk_idx[3 * 2 + 1];
    w.ranks[2].topk_idx[3 * 2 + 1] = 6;
    TCHECK_EQ_INT(ll_world_combine(&w, 2, 0, out), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "token 3, k 1: expert id 6 is outside [-1, 6)");
    /* token 3 now names an expert it was not dispatched to: the handle has no row for it */
    int64_t *row3 = w.ranks[2].topk_idx + 3 * 2, other = 0;
    row3[1] = e_saved;
    while (other == row3[0] || other == row3[1])
        other++;
    row3[0] = other;
    row3[1] = -1;
    TCHECK_EQ_INT(ll_world_combine(&w, 2, 0, out), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "has no row for token 3 of rank 2");
    TCHECK(out[0] == 0x4321, "out written although the call failed");
    w.n[2] = 5; /* more tokens than T */
    TCHECK_EQ_INT(ll_world_combine(&w, 2, 0, out), EPREF_TOO_MANY);
    w.n[2] = 4;
    ll_world_free(&w);
}

static void ll_combine_of_identity_experts_gives_x_times_weight_sum(void) {
    const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    const int experts[] = {8, 64, 256, 288};
    int c = 0;
    for (int R = 2; R <= 8; R++)
        for (int ei = 0; ei < 4; ei++) {
            int E = experts[ei];
            if (E % R)
                continue;
            ll_world_t w = {0};
            int T = 8, H = c % 4 == 3 ? 2048 : 128 * (1 + c % 3), K = E >= 64 ? 8 : 4;
            for (int s = 0; s < R; s++)
                w.n[s] = (s + c) % 6 == 0 ? 0 : 1 + (s + 2 * c) % T;
            ll_world_make(&w, 84 + (uint64_t)c, R, E, T, H, K, 0.15f, 1.0f);
            ll_world_dispatch(&w, 0, one);
            int ok = 1;
            for (int rank = 0; rank < R && ok; rank++) {
                uint16_t *out = malloc((size_t)w.n[rank] * H * 2 + 2);
                TCHECK_EQ_INT(ll_world_combine(&w, rank, 0, out), EPREF_OK);
                ok = check_against_fma_chain(&w, rank, 0, out, "identity");
                /* and within one bf16 rounding (plus float rounding) of x * sum(w) */
                for (int t = 0; t < w.n[rank] && ok; t++) {
                    double wsum = 0;
                    for (int k = 0; k < K; k++)
                        if (w.ranks[rank].topk_idx[t * K + k] >= 0)
                            wsum += w.ranks[rank].topk_weights[t * K + k];
                    for (int h = 0; h < H && ok; h++) {
                        double x = epref_bf16_to_float(test_x(&w.in[rank], t, h)), want = x * wsum;
                        double got = epref_bf16_to_float(out[(size_t)t * H + h]);
                        ok = fabs(got - want) <= fabs(want) * (0x1p-8 + 0x1p-20);
                        TCHECK(ok, "R %d E %d rank %d token %d h %d: %g, expected %g", R, E, rank, t, h, got, want);
                    }
                }
                free(out);
            }
            ll_world_free(&w);
            if (!ok)
                return;
            c++;
        }
}

static void ll_combine_with_logfmt_decodes_each_group_and_stays_within_its_bound(void) {
    const float one[4] = {1, 1, 1, 1};
    ll_world_t w = {0};
    for (int s = 0; s < 4; s++)
        w.n[s] = 6 + s;
    ll_world_make(&w, 85, 4, 64, 12, 1024, 8, 0.1f, 0.125f); /* |x| mostly < 1: log format */
    /* one group of token 0 on rank 0 keeps amax >= 1: raw bf16 */
    uint16_t big = epref_float_to_bf16(3.0f);
    memcpy(w.ranks[0].x + 2 * 130, &big, 2);
    ll_world_dispatch(&w, 0, one);
    int encoded = 0, raw = 0;
    for (int s = 0; s < 4; s++)
        for (int g = 0; g < w.n[s] * w.H / 128; g++) {
            uint16_t group[128];
            float dec[128];
            memcpy(group, w.ranks[s].x + 256 * (size_t)g, 256);
            if (epref_logfmt_roundtrip(group, 128, dec))
                encoded++;
            else
                raw++;
        }
    TCHECK(encoded > 0 && raw > 0, "inputs should mix encoded (%d) and raw (%d) groups", encoded, raw);
    for (int rank = 0; rank < 4; rank++) {
        int n = w.n[rank], H = w.H, K = w.K;
        uint16_t *out = malloc((size_t)n * H * 2);
        TCHECK_EQ_INT(ll_world_combine(&w, rank, 1, out), EPREF_OK);
        if (!check_against_fma_chain(&w, rank, 1, out, "logfmt"))
            break;
        int ok = 1;
        for (int t = 0; t < n && ok; t++) {
            double wsum = 0;
            for (int k = 0; k < K; k++)
                if (w.ranks[rank].topk_idx[t * K + k] >= 0)
                    wsum += w.ranks[rank].topk_weights[t * K + k];
            for (int h = 0; h < H && ok; h++) {
                uint16_t xb = test_x(&w.in[rank], t, h);
                double x = epref_bf16_to_float(xb), got = epref_bf16_to_float(out[(size_t)t * H + h]);
                if (fabs(x) < 0x1p-126)
                    continue;
                float dec[128]; /* zero only if flushed (below amax / 2^32 of its group) */
                uint16_t group[128];
                for (int i = 0; i < 128; i++)
                    group[i] = test_x(&w.in[rank], t, h / 128 * 128 + i);
                epref_logfmt_roundtrip(group, 128, dec);
                double eps = epref_logfmt_error_bound(group, 128);
                if (dec[h % 128] == 0.0f)
                    continue;
                double tol = fabs(x) * wsum * (eps * (1 + 0x1p-8) + 0x1p-8 + 0x1p-20);
                ok = fabs(got - x * wsum) <= tol;
                TCHECK(ok, "rank %d token %d h %d: %g, expected %g within %g", rank, t, h, got, x * wsum, tol);
            }
        }
        free(out);
    }
    ll_world_free(&w);
}

static void ll_combine_of_fp8_identity_experts_is_within_fp8_error(void) {
    const float one[2] = {1, 1};
    ll_world_t w = {0};
    w.n[0] = 7, w.n[1] = 5;
    ll_world_make(&w, 86, 2, 16, 8, 512, 4, 0.0f, 1.0f);
    ll_world_dispatch(&w, 1, one);
    for (int rank = 0; rank < 2; rank++) {
        int n = w.n[rank], H = w.H, K = w.K;
        uint16_t *out = malloc((size_t)n * H * 2);
        TCHECK_EQ_INT(ll_world_combine(&w, rank, 0, out), EPREF_OK);
        int ok = 1;
        for (int t = 0; t < n && ok; t++) {
            double wsum = 0;
            for (int k = 0; k < K; k++)
                wsum += w.ranks[rank].topk_weights[t * K + k];
            for (int g = 0; g < H / 128 && ok; g++) {
                double amax = 1e-4;
                for (int i = 0; i < 128; i++)
                    amax = fmax(amax, fabs(epref_bf16_to_float(test_x(&w.in[rank], t, g * 128 + i))));
                for (int i = 0; i < 128 && ok; i++) {
                    int h = g * 128 + i;
                    double x = epref_bf16_to_float(test_x(&w.in[rank], t, h));
                    double got = epref_bf16_to_float(out[(size_t)t * H + h]);
                    /* e4m3: relative 2^-4 at normal magnitudes, absolute 2^-10 * amax / 448 below; then the
                     * expert's bf16 and the output's bf16 roundings */
                    double e_fp8 = fmax(fabs(x) * 0x1p-4, 0x1p-10 * amax / 448.0);
                    double tol = wsum * (e_fp8 + (fabs(x) + e_fp8) * 0x1p-8) + (fabs(x) * wsum + e_fp8) * 0x1p-8;
                    ok = fabs(got - x * wsum) <= tol;
                    TCHECK(ok, "rank %d token %d h %d: %g, expected %g within %g", rank, t, h, got, x * wsum, tol);
                }
            }
        }
        free(out);
    }
    ll_world_free(&w);
}

static epref_status_t ll_world_combine_per_rank(ll_world_t *w, int rank, uint16_t *out) {
    return epref_ll_combine_per_rank((const uint16_t *const *)w->y, w->recv, w->R, w->E, rank, w->n[rank], w->K,
                                     w->ranks[rank].topk_idx, w->ranks[rank].topk_weights, out);
}

static void ll_combine_per_rank_rounds_each_ranks_sum_in_first_k_order(void) {
    const float one[2] = {1, 1};
    ll_world_t w = {0};
    w.n[0] = 3, w.n[1] = 1;
    ll_world_make(&w, 87, 2, 4, 4, 128, 4, 0.0f, 1.0f);
    /* experts 0, 1 on rank 0 and 2, 3 on rank 1. Token 0: rank 1 (k 0, 3), then rank 0 (k 1, with a -1 at k 2);
     * token 1: nowhere; token 2: expert 1 twice and expert 0 (rank 0 only). */
    int64_t r0[12] = {2, 0, -1, 3, -1, -1, -1, -1, 1, 1, -1, 0};
    memcpy(w.ranks[0].topk_idx, r0, sizeof(r0));
    float wts[12] = {0.75f, 1.25f, 5.0f, -0.5f, 1, 1, 1, 1, 0.3f, 0.6f, 7.0f, 1.1f};
    memcpy(w.ranks[0].topk_weights, wts, sizeof(wts));
    ll_world_dispatch(&w, 0, one); /* identity experts: every row is x */
    uint16_t out[3 * 128];
    TCHECK_EQ_INT(ll_world_combine_per_rank(&w, 0, out), EPREF_OK);
    for (int h = 0; h < 128; h++) {
        float x0 = epref_bf16_to_float(test_x(&w.in[0], 0, h)), x2 = epref_bf16_to_float(test_x(&w.in[0], 2, h));
        float rank1 = epref_bf16_to_float(epref_float_to_bf16(fmaf(-0.5f, x0, fmaf(0.75f, x0, 0.0f))));
        float rank0 = epref_bf16_to_float(epref_float_to_bf16(fmaf(1.25f, x0, 0.0f)));
        uint16_t want0 = epref_float_to_bf16((0.0f + rank1) + rank0);
        float only = epref_bf16_to_float(epref_float_to_bf16(fmaf(1.1f, x2, fmaf(0.6f, x2, fmaf(0.3f, x2, 0.0f)))));
        uint16_t want2 = epref_float_to_bf16(0.0f + only);
        TCHECK(out[h] == want0, "token 0 h %d: 0x%04X, expected 0x%04X", h, out[h], want0);
        TCHECK(out[128 + h] == 0, "token 1 h %d: 0x%04X, expected +0", h, out[128 + h]);
        TCHECK(out[256 + h] == want2, "token 2 h %d: 0x%04X, expected 0x%04X", h, out[256 + h], want2);
    }
    ll_world_free(&w);
}

/* Within epref.h's bound of the exact sum (two bf16 roundings, 2^-8 each, of the sum of |w * v| over the token's
 * k, plus float32's), and so within three of the one-rounding combine's output. */
static void ll_combine_per_rank_is_within_its_bound_of_the_exact_sum(void) {
    const float scale[4] = {1.0f, -0.37f, 1.91f, 0.613f};
    ll_world_t w = {0};
    for (int s = 0; s < 4; s++)
        w.n[s] = 9 + 2 * s;
    ll_world_make(&w, 88, 4, 32, 16, 512, 8, 0.15f, 1.0f);
    for (int t = 0; t < w.n[0]; t += 5) /* duplicates */
        w.ranks[0].topk_idx[t * 8 + 2] = w.ranks[0].topk_idx[t * 8];
    ll_world_dispatch(&w, 0, scale);
    int differs = 0;
    for (int rank = 0; rank < 4; rank++) {
        int n = w.n[rank], H = w.H, K = w.K;
        uint16_t *out = malloc((size_t)n * H * 2), *exact = malloc((size_t)n * H * 2);
        TCHECK_EQ_INT(ll_world_combine_per_rank(&w, rank, out), EPREF_OK);
        TCHECK_EQ_INT(ll_world_combine(&w, rank, 0, exact), EPREF_OK);
        int ok = 1;
        for (int t = 0; t < n && ok; t++)
            for (int h = 0; h < H && ok; h++) {
                double mag = 0, sum = 0;
                for (int k = 0; k < K; k++) {
                    int64_t e = w.ranks[rank].topk_idx[t * K + k];
                    if (e < 0)
                        continue;
                    double p = (double)w.ranks[rank].topk_weights[t * K + k] *
                               epref_bf16_to_float(expert_row(&w, rank, t, e)[h]);
                    mag += fabs(p), sum += p;
                }
                double got = epref_bf16_to_float(out[(size_t)t * H + h]);
                double want = epref_bf16_to_float(exact[(size_t)t * H + h]);
                differs += got != want;
                /* bf16's unit roundoff is 2^-8; 2^-16 covers float32's products and sums */
                ok =
                    fabs(got - sum) <= mag * (2 * 0x1p-8 + 0x1p-16) && fabs(got - want) <= mag * (3 * 0x1p-8 + 0x1p-16);
                TCHECK(ok, "rank %d token %d h %d: %g, exact sum %g, one-rounding combine %g, sum of |w v| %g", rank, t,
                       h, got, sum, want, mag);
            }
        free(out), free(exact);
    }
    TCHECK(differs > 0, "the per-rank sums never differed from the exact combine: the test does not tell them apart");
    ll_world_free(&w);
}

int main(void) {
    TRUN(ll_combine_is_fmaf_in_k_order_over_expert_rows);
    TRUN(ll_combine_token_with_no_expert_is_zero_and_duplicates_count_per_entry);
    TRUN(ll_combine_rejects_bad_ids_more_than_t_and_foreign_handles);
    TRUN(ll_combine_of_identity_experts_gives_x_times_weight_sum);
    TRUN(ll_combine_with_logfmt_decodes_each_group_and_stays_within_its_bound);
    TRUN(ll_combine_of_fp8_identity_experts_is_within_fp8_error);
    TRUN(ll_combine_per_rank_rounds_each_ranks_sum_in_first_k_order);
    TRUN(ll_combine_per_rank_is_within_its_bound_of_the_exact_sum);
    return TDONE();
}
