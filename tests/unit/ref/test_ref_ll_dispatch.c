/* Low-latency dispatch on the reference: per-expert packing in (source rank, source token) order, src_info,
 * layout_range, recv_count, a duplicated expert counts once, BF16 / FP8 / UE8M0 rows and scales, and the
 * errors (N > T, UE8M0 rules, bad ids). Random cases are checked against a brute-force reading of SPEC.md. */
#include "reftest.h"

static uint16_t recv_bf16(const epref_ll_dispatch_result_t *r, int l, int row, int h) {
    return ((const uint16_t *)r->x)[((size_t)l * r->num_ranks * r->max_tokens + row) * r->hidden + h];
}

static int64_t range_of(int begin, int count) {
    return ((int64_t)begin << 32) | count;
}

static void ll_dispatch_packs_each_expert_by_source_rank_then_token(void) {
    /* R = 2, E = 4 (L = 2), T = 4, K = 2, H = 128 */
    int n[2] = {3, 2};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(71, 2, n, 128, 2, 4, 0.0f, 6, 0, 0, in);
    const int64_t r0[] = {1, 2, 3, -1, 1, 1}, r1[] = {0, 1, 2, 3};
    memcpy(ranks[0].topk_idx, r0, sizeof(r0));
    memcpy(ranks[1].topk_idx, r1, sizeof(r1));
    epref_ll_dispatch_result_t res[2];
    for (int d = 0; d < 2; d++)
        TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 4, 4, 128, d, 0, 0, 0, &res[d]), EPREF_OK);
    /* rank 0: expert 0 <- (1,0); expert 1 <- (0,0) (0,2) (1,0), token (0,2) names expert 1 twice: once */
    const int want_count[2][2] = {{1, 3}, {2, 2}};
    const int want_src[2][2][3] = {{{0}, {0, 2, 0}}, {{0, 1}, {1, 1}}};
    const int want_src_rank[2][2][3] = {{{1}, {0, 0, 1}}, {{0, 1}, {0, 1}}};
    const int64_t want_range[2][2][2] = {{{range_of(0, 0), range_of(0, 1)}, {range_of(0, 2), range_of(2, 1)}},
                                         {{range_of(0, 1), range_of(1, 1)}, {range_of(0, 1), range_of(1, 1)}}};
    for (int d = 0; d < 2; d++)
        for (int l = 0; l < 2; l++) {
            TCHECK(res[d].recv_count[l] == want_count[d][l], "rank %d expert %d: count %d, expected %d", d, l,
                   res[d].recv_count[l], want_count[d][l]);
            for (int s = 0; s < 2; s++)
                TCHECK(res[d].layout_range[l * 2 + s] == want_range[d][l][s],
                       "rank %d expert %d source %d: range 0x%llx, expected 0x%llx", d, l, s,
                       (unsigned long long)res[d].layout_range[l * 2 + s], (unsigned long long)want_range[d][l][s]);
            for (int i = 0; i < want_count[d][l]; i++) {
                int t = want_src[d][l][i], s = want_src_rank[d][l][i];
                TCHECK(res[d].src_info[l * 8 + i] == t, "rank %d expert %d row %d: src_info %d, expected %d", d, l, i,
                       res[d].src_info[l * 8 + i], t);
                for (int h = 0; h < 128; h++)
                    if (recv_bf16(&res[d], l, i, h) != test_x(&in[s], t, h)) {
                        TCHECK(0, "rank %d expert %d row %d h %d: 0x%04X, expected 0x%04X", d, l, i, h,
                               recv_bf16(&res[d], l, i, h), test_x(&in[s], t, h));
                        break;
                    }
            }
            for (int i = want_count[d][l]; i < 8; i++)
                TCHECK(res[d].src_info[l * 8 + i] == -1, "rank %d expert %d row %d past the count: src_info %d", d, l,
                       i, res[d].src_info[l * 8 + i]);
        }
    for (int d = 0; d < 2; d++)
        epref_ll_dispatch_result_free(&res[d]);
    test_ranks_free(ranks, 2);
}

static void ll_dispatch_fails_when_a_rank_has_more_than_t_tokens(void) {
    int n[3] = {4, 5, 2};
    epref_rank_input_t in[3];
    test_rank_t *ranks = test_ranks_make(72, 3, n, 128, 2, 6, 0.0f, 0, 0, 0, in);
    epref_ll_dispatch_result_t res;
    TCHECK_EQ_INT(epref_ll_dispatch(in, 3, 6, 4, 128, 0, 1, 0, 0, &res), EPREF_TOO_MANY);
    TCHECK_STR_CONTAINS(epref_last_error(), "in[1] has 5 tokens, more than T = 4");
    TCHECK_EQ_INT(epref_ll_dispatch(in, 3, 6, 5, 128, 0, 1, 0, 0, &res), EPREF_OK);
    epref_ll_dispatch_result_free(&res);
    test_ranks_free(ranks, 3);
}

static void ll_dispatch_checks_ue8m0_round_scale_and_hidden(void) {
    int n[2] = {2, 2};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(73, 2, n, 640, 2, 4, 0.0f, 0, 0, 0, in);
    epref_ll_dispatch_result_t res;
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 4, 2, 640, 0, 1, 0, 1, &res), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "use_ue8m0 needs round_scale");
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 4, 2, 640, 0, 1, 1, 1, &res), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "hidden % 512 == 0, got 640");
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 4, 2, 640, 0, 1, 1, 0, &res), EPREF_OK); /* plain FP8 is fine */
    epref_ll_dispatch_result_free(&res);
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 4, 2, 100, 0, 0, 0, 0, &res), EPREF_BAD_ARGUMENT);
    TCHECK_STR_CONTAINS(epref_last_error(), "multiple of 128");
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 4, 2, 512, 0, 0, 0, 0, &res), EPREF_BAD_ARGUMENT); /* row_bytes */
    TCHECK_STR_CONTAINS(epref_last_error(), "row_bytes");
    test_ranks_free(ranks, 2);
}

static void ll_dispatch_rejects_bad_expert_ids_naming_token_k_and_value(void) {
    int n[2] = {3, 3};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(74, 2, n, 128, 4, 16, 0.0f, 0, 0, 0, in);
    ranks[0].topk_idx[2 * 4 + 3] = 99;
    epref_ll_dispatch_result_t res;
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 16, 3, 128, 1, 0, 0, 0, &res), EPREF_BAD_EXPERT);
    TCHECK_STR_CONTAINS(epref_last_error(), "in[0].topk_idx: token 2, k 3: expert id 99 is outside [-1, 16)");
    test_ranks_free(ranks, 2);
}

static void ll_dispatch_packs_ue8m0_group_g_into_byte_g_mod_4_of_word_g_div_4(void) {
    /* one token, H = 1024 (8 groups); group g has amax 448 * 2^(g-2): scale_inv 2^(g-2), byte 125 + g */
    int n[2] = {1, 0};
    epref_rank_input_t in[2];
    test_rank_t *ranks = test_ranks_make(75, 2, n, 1024, 1, 2, 0.0f, 0, 0, 0, in);
    ranks[0].topk_idx[0] = 1;
    for (int g = 0; g < 8; g++)
        for (int i = 0; i < 128; i++) {
            float v = i == 5 ? ldexpf(-448.0f, g - 2) : ldexpf((float)(i % 9), g - 4);
            uint16_t b = epref_float_to_bf16(v);
            memcpy(ranks[0].x + 2 * (size_t)(g * 128 + i), &b, 2);
        }
    epref_ll_dispatch_result_t res;
    TCHECK_EQ_INT(epref_ll_dispatch(in, 2, 2, 1, 1024, 1, 1, 1, 1, &res), EPREF_OK);
    TCHECK_EQ_INT(res.recv_count[0], 1);
    const uint32_t *words = res.scales;
    TCHECK(words[0] == 0x807F7E7Du, "word 0 is 0x%08X, expected 0x807F7E7D", words[0]);
    TCHECK(words[1] == 0x84838281u, "word 1 is 0x%08X, expected 0x84838281", words[1]);
    const uint8_t *q = res.x;
    TCHECK(q[3 * 128 + 5] == 0xFE, "the amax element of group 3 is 0x%02X, expected -448", q[3 * 128 + 5]);
    epref_ll_dispatch_result_free(&res);
    test_ranks_free(ranks, 2);
}

/* Checks one destination's result against SPEC.md, evaluated the slow way. */
static int check_ll(const epref_rank_input_t *in, int R, int E, int T, int H, int rank, int fp8, int rs, int ue,
                    const epref_ll_dispatch_result_t *res, const char *what) {
    int L = E / R, K = in[0].topk, groups = H / 128, words = ue ? H / 512 : groups;
    size_t slots = (size_t)R * T;
    uint8_t *q = malloc((size_t)H);
    uint16_t *v = malloc((size_t)H * 2);
    int ok = 1;
    for (int l = 0; l < L && ok; l++) {
        int64_t e = (int64_t)rank * L + l;
        int row = 0;
        for (int s = 0; s < R && ok; s++) {
            int begin = row;
            for (int t = 0; t < in[s].num_tokens && ok; t++) {
                int hit = 0;
                for (int k = 0; k < K; k++)
                    hit |= in[s].topk_idx[(size_t)t * K + k] == e;
                if (!hit)
                    continue;
                size_t slot = (size_t)l * slots + (size_t)row;
                ok &= res->src_info[slot] == t;
                TCHECK(ok, "%s: rank %d expert %d row %d: src_info %d, expected %d", what, rank, l, row,
                       res->src_info[slot], t);
                for (int h = 0; h < H; h++)
                    v[h] = test_x(&in[s], t, h);
                for (int g = 0; ok && g < groups; g++) {
                    if (!fp8) {
                        ok &= memcmp((const uint16_t *)res->x + slot * H + g * 128, v + g * 128, 256) == 0;
                        TCHECK(ok, "%s: rank %d expert %d row %d group %d: bf16 row differs", what, rank, l, row, g);
                        continue;
                    }
                    float s_inv;
                    epref_cast_fp8_group(v + g * 128, 128, rs, q, &s_inv);
                    ok &= memcmp((const uint8_t *)res->x + slot * H + g * 128, q, 128) == 0;
                    TCHECK(ok, "%s: rank %d expert %d row %d group %d: e4m3 values differ", what, rank, l, row, g);
                    if (ue) {
                        uint32_t word = ((const uint32_t *)res->scales)[slot * words + g / 4];
                        ok &= ((word >> (8 * (g % 4))) & 0xFF) == epref_ue8m0_byte(s_inv);
                        TCHECK(ok, "%s: rank %d expert %d row %d group %d: UE8M0 word 0x%08X", what, rank, l, row, g,
                               word);
                    } else {
                        float got = ((const float *)res->scales)[slot * words + g];
                        ok &= got == s_inv;
                        TCHECK(ok, "%s: rank %d expert %d row %d group %d: scale %a, expected %a", what, rank, l, row,
                               g, (double)got, (double)s_inv);
                    }
                }
                row++;
            }
            int64_t want = range_of(begin, row - begin);
            ok &= res->layout_range[(size_t)l * R + s] == want;
            TCHECK(ok, "%s: rank %d expert %d source %d: range 0x%llx, expected 0x%llx", what, rank, l, s,
                   (unsigned long long)res->layout_range[(size_t)l * R + s], (unsigned long long)want);
        }
        ok &= res->recv_count[l] == row;
        TCHECK(ok, "%s: rank %d expert %d: count %d, expected %d", what, rank, l, res->recv_count[l], row);
        for (size_t i = (size_t)row; ok && i < slots; i++) { /* past the count: src -1, zero rows */
            ok &= res->src_info[(size_t)l * slots + i] == -1;
            const uint8_t *bytes = (const uint8_t *)res->x + ((size_t)l * slots + i) * H * (fp8 ? 1 : 2);
            for (int b = 0; b < H * (fp8 ? 1 : 2); b++)
                ok &= bytes[b] == 0;
            TCHECK(ok, "%s: rank %d expert %d slot %zu past the count is not empty", what, rank, l, i);
        }
    }
    free(q), free(v);
    return ok;
}

static void ll_dispatch_matches_definition_for_random_routing(void) {
    const int experts[] = {8, 64, 256, 288};
    int c = 0;
    for (int R = 2; R <= 8; R++) {
        for (int ei = 0; ei < 4; ei++) {
            int E = experts[ei];
            if (E % R)
                continue;
            int mode = c % 4; /* bf16, fp8, fp8 round_scale, fp8 ue8m0 */
            int fp8 = mode > 0, rs = mode >= 2, ue = mode == 3;
            int H = c % 5 == 4 ? 7168 : (ue ? 512 : 128 * (1 + c % 3)), T = H > 1024 ? 4 : 12;
            int K = E >= 64 ? 8 : 4, n[8];
            for (int s = 0; s < R; s++)
                n[s] = (s + c) % 5 == 0 ? 0 : 1 + (s * 3 + c) % T;
            epref_rank_input_t in[8];
            test_rank_t *ranks = test_ranks_make(76 + (uint64_t)c, R, n, H, K, E, 0.1f, 2, 0, 0, in);
            if (c % 3 == 0) /* a duplicate expert in some tokens' top-k */
                for (int s = 0; s < R; s++)
                    for (int t = 0; t < n[s]; t += 2)
                        ranks[s].topk_idx[(size_t)t * K + 1] = ranks[s].topk_idx[(size_t)t * K];
            int ok = 1;
            for (int d = 0; d < R && ok; d++) {
                epref_ll_dispatch_result_t res;
                TCHECK_EQ_INT(epref_ll_dispatch(in, R, E, T, H, d, fp8, rs, ue, &res), EPREF_OK);
                char what[80];
                snprintf(what, sizeof(what), "R %d E %d H %d mode %d", R, E, H, mode);
                ok = check_ll(in, R, E, T, H, d, fp8, rs, ue, &res, what);
                epref_ll_dispatch_result_free(&res);
            }
            test_ranks_free(ranks, R);
            if (!ok)
                return;
            c++;
        }
    }
}

static void ll_dispatch_leaves_ranks_without_experts_empty(void) {
    int R = 4, E = 32, L = 8, T = 6, n[4] = {6, 0, 3, 5};
    epref_rank_input_t in[4];
    test_rank_t *ranks = test_ranks_make(77, R, n, 256, 4, E, 0.0f, 0, 0, 0, in);
    for (int s = 0; s < R; s++) /* everything to rank 3's experts */
        for (int i = 0; i < n[s] * 4; i++)
            ranks[s].topk_idx[i] = 3 * L + ranks[s].topk_idx[i] % L;
    for (int d = 0; d < R; d++) {
        epref_ll_dispatch_result_t res;
        TCHECK_EQ_INT(epref_ll_dispatch(in, R, E, T, 256, d, 1, 0, 0, &res), EPREF_OK);
        check_ll(in, R, E, T, 256, d, 1, 0, 0, &res, "one rank");
        int total = 0;
        for (int l = 0; l < L; l++)
            total += res.recv_count[l];
        TCHECK(d == 3 ? total > 0 : total == 0, "rank %d received %d pairs", d, total);
        epref_ll_dispatch_result_free(&res);
    }
    test_ranks_free(ranks, R);
}

int main(void) {
    TRUN(ll_dispatch_packs_each_expert_by_source_rank_then_token);
    TRUN(ll_dispatch_fails_when_a_rank_has_more_than_t_tokens);
    TRUN(ll_dispatch_checks_ue8m0_round_scale_and_hidden);
    TRUN(ll_dispatch_rejects_bad_expert_ids_naming_token_k_and_value);
    TRUN(ll_dispatch_packs_ue8m0_group_g_into_byte_g_mod_4_of_word_g_div_4);
    TRUN(ll_dispatch_matches_definition_for_random_routing);
    TRUN(ll_dispatch_leaves_ranks_without_experts_empty);
    return TDONE();
}
