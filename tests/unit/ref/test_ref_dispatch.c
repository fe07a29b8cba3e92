/* Normal (high-throughput) dispatch on the reference: row order (source rank, source token), one copy per
 * destination rank, local expert ids, weights, per-expert counts with alignment, worst-token padding, strides,
 * and the errors (bad expert ids, too small num_worst_tokens, mismatched ranks). Random cases are checked
 * against a brute-force reading of SPEC.md. */
#include "reftest.h"

/* Compares a dispatch result with SPEC.md's definition, evaluated the slow way. Returns 1 if all matched. */
static int check_dispatch(const epref_rank_input_t *in, int R, int E, int rank, int align, int worst,
                          const epref_dispatch_result_t *res, const char *what) {
    int L = E / R, K = in[0].topk, row = 0, ok = 1;
    size_t rb = in[0].row_bytes;
    int64_t *per_expert = calloc((size_t)L, sizeof(int64_t));
    for (int s = 0; s < R && ok; s++) {
        for (int t = 0; t < in[s].num_tokens && ok; t++) {
            if (!test_goes_to(&in[s], t, rank, L))
                continue;
            if (row >= res->num_recv) {
                TCHECK(row < res->num_recv, "%s: rank %d: more rows expected than %d", what, rank, res->num_recv);
                ok = 0;
                break;
            }
            ok &= res->src_rank[row] == s && res->src_token[row] == t;
            TCHECK(ok, "%s: rank %d row %d comes from (%d, %d), expected (%d, %d)", what, rank, row, res->src_rank[row],
                   res->src_token[row], s, t);
            if (ok && memcmp(res->x + (size_t)row * rb, in[s].x + (size_t)t * in[s].stride_bytes, rb) != 0) {
                TCHECK(0, "%s: rank %d row %d: bytes differ from token %d of rank %d", what, rank, row, t, s);
                ok = 0;
            }
            for (int j = 0; ok && j < in[s].num_scales; j++)
                if (res->scales[(size_t)row * in[s].num_scales + j] != in[s].scales[t * in[s].scales_stride + j]) {
                    TCHECK(0, "%s: rank %d row %d scale %d: 0x%08X, expected 0x%08X", what, rank, row, j,
                           res->scales[(size_t)row * in[s].num_scales + j], in[s].scales[t * in[s].scales_stride + j]);
                    ok = 0;
                }
            uint64_t seen_mask = 0; /* which local experts this token already counted (when L <= 64) */
            for (int k = 0; ok && k < K; k++) {
                int64_t e = in[s].topk_idx[(size_t)t * K + k];
                int mine = e >= 0 && e / L == rank;
                int64_t want_idx = mine ? e - (int64_t)rank * L : -1;
                float want_w = mine ? in[s].topk_weights[(size_t)t * K + k] : 0.0f;
                ok &= res->topk_idx[(size_t)row * K + k] == want_idx;
                TCHECK(ok, "%s: rank %d row %d k %d: local id %lld, expected %lld", what, rank, row, k,
                       (long long)res->topk_idx[(size_t)row * K + k], (long long)want_idx);
                ok &= res->topk_weights[(size_t)row * K + k] == want_w;
                TCHECK(ok, "%s: rank %d row %d k %d: weight %g, expected %g", what, rank, row, k,
                       (double)res->topk_weights[(size_t)row * K + k], (double)want_w);
                if (mine && L <= 64 && !(seen_mask & (1ull << (e % L)))) {
                    seen_mask |= 1ull << (e % L);
                    per_expert[e % L]++;
                } else if (mine && L > 64) {
                    per_expert[e % L]++; /* random routing: experts are distinct */
                }
            }
            row++;
        }
    }
    if (ok) {
        TCHECK(res->num_recv == row, "%s: rank %d received %d rows, expected %d", what, rank, res->num_recv, row);
        TCHECK(res->num_rows == (worst ? worst : row), "%s: rank %d has %d rows, expected %d", what, rank,
               res->num_rows, worst ? worst : row);
        for (int r = res->num_recv; r < res->num_rows; r++) {
            int pad_ok = res->src_rank[r] == -1 && res->src_token[r] == -1;
            for (int k = 0; k < K; k++)
                pad_ok &= res->topk_idx[(size_t)r * K + k] == -1 && res->topk_weights[(size_t)r * K + k] == 0.0f;
            for (size_t b = 0; b < rb; b++)
                pad_ok &= res->x[(size_t)r * rb + b] == 0;
            if (!pad_ok) {
                TCHECK(pad_ok, "%s: rank %d padding row %d is not empty", what, rank, r);
                break;
            }
        }
        TCHECK(res->per_expert_valid == (worst == 0), "%s: per_expert_valid %d", what, res->per_expert_valid);
        for (int l = 0; worst == 0 && l < L; l++) {
            int64_t want = (per_expert[l] + align - 1) / align * align;
            TCHECK(res->num_recv_per_expert[l] == want, "%s: rank %d local expert %d: %d, expected %lld", what, rank, l,
                   res->num_recv_per_expert[l], (long long)want);
        }
        if (worst)
            TCHECK(res->num_recv_per_expert == NULL, "%s: worst-token mode must have no per-expert list", what);
    }
    free(per_expert);
    return ok;
}

static void dispatch_orders_rows_by_source_rank_then_token(void) {
    /* R = 2, E = 4 (experts 0-1 on rank 0, 2-3 on rank 1), K = 2, H = 128 */
    int n[2] = {3, 2};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(51, 2, n, 128, 2, 4, 0.0f, 0, 0, 0, in);
    const int64_t r0[] = {3, 0, -1, 2, 1, 1}, r1[] = {0, 2, -1, -1};
    memcpy(ranks[0].topk_idx, r0, sizeof(r0));
    memcpy(ranks[1].topk_idx, r1, sizeof(r1));
    epref_dispatch_result_t res[2];
    for (int d = 0; d < 2; d++)
        TCHECK_EQ_INT(epref_dispatch(in, 2, 4, d, 1, 0, &res[d]), EPREF_OK);
    /* rank 0 gets (0,0) (0,2) (1,0); rank 1 gets (0,0) (0,1) (1,0) */
    const int want_src[2][3][2] = {{{0, 0}, {0, 2}, {1, 0}}, {{0, 0}, {0, 1}, {1, 0}}};
    for (int d = 0; d < 2; d++) {
        TCHECK_EQ_INT(res[d].num_recv, 3);
        for (int i = 0; i < 3 && res[d].num_recv == 3; i++)
            TCHECK(res[d].src_rank[i] == want_src[d][i][0] && res[d].src_token[i] == want_src[d][i][1],
                   "rank %d row %d from (%d, %d), expected (%d, %d)", d, i, res[d].src_rank[i], res[d].src_token[i],
                   want_src[d][i][0], want_src[d][i][1]);
        check_dispatch(in, 2, 4, d, 1, 0, &res[d], "hand example");
    }
    /* token (0, 2) names expert 1 twice: one row, both entries local, expert 1 counted once */
    TCHECK(res[0].topk_idx[1 * 2 + 0] == 1 && res[0].topk_idx[1 * 2 + 1] == 1, "duplicate expert entries");
    TCHECK(res[0].num_recv_per_expert[0] == 2 && res[0].num_recv_per_expert[1] == 1,
           "rank 0 per-expert counts %d %d, expected 2 1", res[0].num_recv_per_expert[0],
           res[0].num_recv_per_expert[1]);
    /* token (0, 0) went to rank 1 with expert 3 -> local 1 at k 0, and expert 0 elsewhere -> -1, weight 0 */
    TCHECK(res[1].topk_idx[0] == 1 && res[1].topk_idx[1] == -1 && res[1].topk_weights[1] == 0.0f,
           "rank 1 row 0: %lld %lld %g", (long long)res[1].topk_idx[0], (long long)res[1].topk_idx[1],
           (double)res[1].topk_weights[1]);
    for (int d = 0; d < 2; d++)
        epref_dispatch_result_free(&res[d]);
    test_ranks_free(ranks, 2);
}

static void dispatch_sends_tokens_without_experts_nowhere(void) {
    int n[3] = {5, 5, 5};
    epref_rank_input_t in[3];
    test_rank_t *ranks = test_ranks_make(52, 3, n, 256, 4, 24, 1.0f, 0, 0, 0, in); /* mask 1: all -1 */
    for (int d = 0; d < 3; d++) {
        epref_dispatch_result_t res;
        TCHECK_EQ_INT(epref_dispatch(in, 3, 24, d, 1, 0, &res), EPREF_OK);
        TCHECK_EQ_INT(res.num_recv, 0);
        for (int l = 0; l < 8; l++)
            TCHECK_EQ_INT(res.num_recv_per_expert[l], 0);
        epref_dispatch_result_free(&res);
    }
    test_ranks_free(ranks, 3);
}

static void dispatch_with_every_expert_on_one_rank_leaves_others_empty(void) {
    const int R = 4, E = 64, L = 16, K = 8;
    int n[4] = {30, 0, 17, 9};
    epref_rank_input_t in[4];
    test_rank_t *ranks = test_ranks_make(53, R, n, 512, K, E, 0.0f, 16, 0, 0, in);
    for (int s = 0; s < R; s++) /* route everything to rank 2's experts 32..47 */
        for (int i = 0; i < n[s] * K; i++)
            ranks[s].topk_idx[i] = 2 * L + (ranks[s].topk_idx[i] % L);
    for (int d = 0; d < R; d++) {
        epref_dispatch_result_t res;
        TCHECK_EQ_INT(epref_dispatch(in, R, E, d, 1, 0, &res), EPREF_OK);
        TCHECK_EQ_INT(res.num_recv, d == 2 ? 56 : 0);
        check_dispatch(in, R, E, d, 1, 0, &res, "one rank");
        epref_dispatch_result_free(&res);
    }
    test_ranks_free(ranks, R);
}

static void dispatch_accepts_zero_tokens_everywhere(void) {
    epref_rank_input_t in[2];
    memset(in, 0, sizeof(in));
    for (int s = 0; s < 2; s++) {
        in[s].topk = 2;
        in[s].row_bytes = 256;
        in[s].stride_bytes = 256;
    }
    epref_dispatch_result_t res;
    TCHECK_EQ_INT(epref_dispatch(in, 2, 8, 1, 4, 0, &res), EPREF_OK);
    TCHECK_EQ_INT(res.num_recv, 0);
    TCHECK_EQ_INT(res.num_rows, 0);
    TCHECK(res.topk_weights == NULL, "no rank passed weights, so none come back");
    epref_dispatch_result_free(&res);
    TCHECK_EQ_INT(epref_dispatch(in, 2, 8, 1, 1, 3, &res), EPREF_OK); /* worst-token mode pads 3 rows */
    TCHECK_EQ_INT(res.num_rows, 3);
    TCHECK(res.src_rank[2] == -1 && res.topk_idx[5] == -1, "padding rows");
    epref_dispatch_result_free(&res);
}

static void dispatch_matches_definition_for_k1_and_k32(void) {
    const int topks[2] = {1, 32};
    for (int i = 0; i < 2; i++) {
        int R = 4, E = 256, n[4] = {40, 33, 0, 21};
        epref_rank_input_t in[4];
        test_rank_t *ranks = test_ranks_make(54 + (uint64_t)i, R, n, 384, topks[i], E, 0.2f, 6, 0, 0, in);
        for (int d = 0; d < R; d++) {
            epref_dispatch_result_t res;
            TCHECK_EQ_INT(epref_dispatch(in, R, E, d, 1, 0, &res), EPREF_OK);
            check_dispatch(in, R, E, d, 1, 0, &res, topks[i] == 1 ? "K=1" : "K=32");
            epref_dispatch_result_free(&res);
        }
        test_ranks_free(ranks, R);
    }
}

static void dispatch_rounds_per_expert_counts_up_to_alignment(void) {
    int R = 2, E = 16, n[2] = {50, 45};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(55, R, n, 128, 4, E, 0.1f, 0, 0, 0, in);
    const int aligns[] = {1, 2, 4, 32, 128};
    for (int a = 0; a < 5; a++)
        for (int d = 0; d < R; d++) {
            epref_dispatch_result_t res;
            TCHECK_EQ_INT(epref_dispatch(in, R, E, d, aligns[a], 0, &res), EPREF_OK);
            check_dispatch(in, R, E, d, aligns[a], 0, &res, "alignment");
            for (int l = 0; l < E / R; l++)
                TCHECK(res.num_recv_per_expert[l] % aligns[a] == 0, "alignment %d: expert %d count %d", aligns[a], l,
                       res.num_recv_per_expert[l]);
            epref_dispatch_result_free(&res);
        }
    test_ranks_free(ranks, R);
}

static void dispatch_pads_to_num_worst_tokens_and_fails_when_too_small(void) {
    int R = 3, E = 24, n[3] = {20, 20, 20};
    epref_rank_input_t in[3];
    test_rank_t *ranks = test_ranks_make(56, R, n, 256, 3, E, 0.0f, 0, 4, 0, in);
    for (int d = 0; d < R; d++) {
        epref_dispatch_result_t exact, padded, untouched;
        TCHECK_EQ_INT(epref_dispatch(in, R, E, d, 1, 0, &exact), EPREF_OK);
        int worst = R * 20;
        TCHECK_EQ_INT(epref_dispatch(in, R, E, d, 1, worst, &padded), EPREF_OK);
        check_dispatch(in, R, E, d, 1, worst, &padded, "worst tokens");
        /* exactly the real count still fits; one less is an error and leaves the result alone */
        epref_dispatch_result_t fit;
        TCHECK_EQ_INT(epref_dispatch(in, R, E, d, 1, exact.num_recv, &fit), EPREF_OK);
        epref_dispatch_result_free(&fit);
        memset(&untouched, 0x5A, sizeof(untouched));
        TCHECK_EQ_INT(epref_dispatch(in, R, E, d, 1, exact.num_recv - 1, &untouched), EPREF_TOO_MANY);
        TCHECK_STR_CONTAINS(epref_last_error(), "num_worst_tokens");
        TCHECK(untouched.num_recv == 0x5A5A5A5A, "result written on error");
        epref_dispatch_result_free(&exact);
        epref_dispatch_result_free(&padded);
    }
    test_ranks_free(ranks, R);
}

static void dispatch_rejects_bad_expert_ids_naming_rank_token_k_and_value(void) {
    int R = 2, E = 8, n[2] = {4, 6};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(57, R, n, 128, 2, E, 0.0f, 0, 0, 0, in);
    ranks[1].topk_idx[3 * 2 + 1] = 8;
    epref_dispatch_result_t res;
    TCHECK_EQ_INT(epref_dispatch(in, R, E, 0, 1, 0, &res), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "in[1].topk_idx: token 3, k 1: expert id 8 is outside [-1, 8)");
    ranks[1].topk_idx[3 * 2 + 1] = -7;
    TCHECK_EQ_INT(epref_dispatch(in, R, E, 1, 1, 0, &res), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "expert id -7");
    test_ranks_free(ranks, R);
}

static void dispatch_rejects_inputs_that_disagree_across_ranks(void) {
    int R = 2, n[2] = {3, 3};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(58, R, n, 128, 2, 8, 0.0f, 0, 0, 0, in);
    epref_dispatch_result_t res;
    in[1].row_bytes = 128;
    TCHECK_EQ_INT(epref_dispatch(in, R, 8, 0, 1, 0, &res), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "in[1].row_bytes");
    in[1] = ranks[1].in;
    in[1].topk = 3;
    TCHECK_EQ_INT(epref_dispatch(in, R, 8, 0, 1, 0, &res), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "in[1].topk");
    in[1] = ranks[1].in;
    in[1].stride_bytes = 100;
    TCHECK_EQ_INT(epref_dispatch(in, R, 8, 0, 1, 0, &res), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "stride_bytes");
    in[1] = ranks[1].in;
    TCHECK_EQ_INT(epref_dispatch(in, R, 7, 0, 1, 0, &res), EPREF_BAD_ARGUMENT); /* E % R != 0 */
    TCHECK_STR_CONTAINS(epref_last_error(), "num_experts (7)");
    TCHECK_EQ_INT(epref_dispatch(in, R, 8, 2, 1, 0, &res), EPREF_BAD_ARGUMENT); /* rank out of range */
    TCHECK_EQ_INT(epref_dispatch(in, R, 8, 0, 0, 0, &res), EPREF_BAD_ARGUMENT); /* alignment 0 */
    test_ranks_free(ranks, R);
}

static void dispatch_matches_definition_for_random_routing(void) {
    const int experts[] = {8, 64, 256, 288};
    const int hiddens[] = {128, 256, 1024, 7168, 16384};
    int c = 0;
    for (int R = 2; R <= 8; R++) {
        for (int ei = 0; ei < 4; ei++) {
            int E = experts[ei];
            if (E % R)
                continue;
            int H = hiddens[c % 5], K = E >= 16 ? 8 : 2;
            int n[8];
            for (int s = 0; s < R; s++)
                n[s] = H >= 7168 ? 3 + (s * 5 + c) % 6 : (s * 37 + c * 11) % 60; /* some ranks with 0 */
            epref_rank_input_t in[8];
            /* FP8-like rows: H bytes of data (as bf16 H/2), H/128 float scales, padded strides */
            test_rank_t *ranks = test_ranks_make(59 + (uint64_t)c, R, n, H, K, E, 0.05f, 32, H / 128, 0, in);
            int align = 1 << (c % 4), worst = c % 3 == 0 ? 8 * 60 : 0;
            for (int d = 0; d < R; d++) {
                epref_dispatch_result_t res;
                TCHECK_EQ_INT(epref_dispatch(in, R, E, d, align, worst, &res), EPREF_OK);
                char what[64];
                snprintf(what, sizeof(what), "R %d E %d H %d", R, E, H);
                int ok = check_dispatch(in, R, E, d, align, worst, &res, what);
                epref_dispatch_result_free(&res);
                if (!ok) {
                    test_ranks_free(ranks, R);
                    return;
                }
            }
            test_ranks_free(ranks, R);
            c++;
        }
    }
}

int main(void) {
    TRUN(dispatch_orders_rows_by_source_rank_then_token);
    TRUN(dispatch_sends_tokens_without_experts_nowhere);
    TRUN(dispatch_with_every_expert_on_one_rank_leaves_others_empty);
    TRUN(dispatch_accepts_zero_tokens_everywhere);
    TRUN(dispatch_matches_definition_for_k1_and_k32);
    TRUN(dispatch_rounds_per_expert_counts_up_to_alignment);
    TRUN(dispatch_pads_to_num_worst_tokens_and_fails_when_too_small);
    TRUN(dispatch_rejects_bad_expert_ids_naming_rank_token_k_and_value);
    TRUN(dispatch_rejects_inputs_that_disagree_across_ranks);
    TRUN(dispatch_matches_definition_for_random_routing);
    return TDONE();
}
