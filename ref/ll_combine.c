/* Low-latency combine: what one source rank gets back. out[t] = bf16(sum over k of w[t,k] * row), with the
 * sum in float32 by fmaf in k order (-1 entries skipped), where `row` is what expert topk_idx[t,k] produced
 * for token t (raw bf16, or bf16 through the LogFMT round trip per 128 channels).
 *
 * The row of (token t, expert e) on destination d lies in expert e's block from this rank, which
 * layout_range[e % L, rank] gives; src_info is ascending inside a block, so a binary search finds t.
 * A first pass finds every row (and fails on a handle that does not match the routing) before anything is
 * written. O(N*K*(log T + H)). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LOGFMT_GROUP 128

typedef struct {
    int num_ranks, rank, local, hidden, num_tokens, topk;
    size_t slots; /* R * T rows per expert */
} ll_combine_shape_t;

static epref_status_t check_ll_recv(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                    const ll_combine_shape_t *sh, int max_tokens) {
    for (int d = 0; d < sh->num_ranks; d++) {
        const epref_ll_dispatch_result_t *r = &recv[d];
        if (r->num_local_experts != sh->local || r->num_ranks != sh->num_ranks || r->hidden != sh->hidden ||
            r->max_tokens != max_tokens)
            return epref_fail(EPREF_BAD_ARGUMENT,
                              "ll_combine: recv[%d] is for L=%d R=%d H=%d T=%d, expected L=%d R=%d H=%d T=%d", d,
                              r->num_local_experts, r->num_ranks, r->hidden, r->max_tokens, sh->local, sh->num_ranks,
                              sh->hidden, max_tokens);
        if (!r->layout_range || !r->src_info || !expert_out[d])
            return epref_fail(EPREF_BAD_ARGUMENT, "ll_combine: recv[%d] or expert_out[%d] is incomplete", d, d);
    }
    return EPREF_OK;
}

static epref_status_t check_ll_combine_args(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                            int num_experts, const ll_combine_shape_t *sh, const int64_t *topk_idx,
                                            const float *topk_weights, const uint16_t *out) {
    if (expert_out == NULL || recv == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_combine: expert_out and recv must be non-NULL");
    if (sh->num_ranks < 1 || num_experts < 1 || num_experts % sh->num_ranks != 0)
        return epref_fail(EPREF_BAD_ARGUMENT,
                          "ll_combine: num_experts (%d) must be a positive multiple of num_ranks (%d)", num_experts,
                          sh->num_ranks);
    if (sh->rank < 0 || sh->rank >= sh->num_ranks)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_combine: rank %d is outside [0, %d)", sh->rank, sh->num_ranks);
    if (sh->num_tokens < 0 || sh->topk < 1)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_combine: num_tokens is %d and topk %d, expected >= 0 and >= 1",
                          sh->num_tokens, sh->topk);
    if (sh->num_tokens > 0 && (!topk_idx || !topk_weights || !out))
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_combine: topk_idx, topk_weights and out must be non-NULL");
    int max_tokens = recv[0].max_tokens;
    if (sh->num_tokens > max_tokens)
        return epref_fail(EPREF_TOO_MANY, "ll_combine: num_tokens %d is more than T = %d", sh->num_tokens, max_tokens);
    epref_status_t st = check_ll_recv(expert_out, recv, sh, max_tokens);
    if (st != EPREF_OK)
        return st;
    if (sh->hidden < LOGFMT_GROUP || sh->hidden % LOGFMT_GROUP != 0)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_combine: recv[0].hidden is %d, expected a positive multiple of 128",
                          sh->hidden);
    return epref_check_topk_ids(topk_idx, sh->num_tokens, sh->topk, num_experts, "ll_combine: topk_idx");
}

/* Index (within [0, R*T)) of token t's row in expert l's block from `rank` on destination r, or -1. */
static int find_row(const epref_ll_dispatch_result_t *r, int l, const ll_combine_shape_t *sh, int t) {
    int64_t range = r->layout_range[(size_t)l * (size_t)sh->num_ranks + (size_t)sh->rank];
    int64_t begin = range >> 32, end = begin + (range & 0xFFFFFFFF);
    if (begin < 0 || end > (int64_t)sh->slots)
        return -1;
    const int32_t *info = r->src_info + (size_t)l * sh->slots;
    int64_t lo = begin, hi = end;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (info[mid] < t)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < end && info[lo] == t ? (int)lo : -1;
}

static epref_status_t map_ll_rows(const epref_ll_dispatch_result_t *recv, const ll_combine_shape_t *sh,
                                  const int64_t *topk_idx, int32_t *rows) {
    for (int t = 0; t < sh->num_tokens; t++) {
        for (int k = 0; k < sh->topk; k++) {
            size_t i = (size_t)t * (size_t)sh->topk + (size_t)k;
            rows[i] = -1;
            if (topk_idx[i] < 0)
                continue;
            int d = (int)(topk_idx[i] / sh->local), l = (int)(topk_idx[i] % sh->local);
            rows[i] = find_row(&recv[d], l, sh, t);
            if (rows[i] < 0)
                return epref_fail(EPREF_BAD_ARGUMENT,
                                  "ll_combine: recv[%d] has no row for token %d of rank %d at expert %lld", d, t,
                                  sh->rank, (long long)topk_idx[i]);
        }
    }
    return EPREF_OK;
}

/* The row's values as the combine sees them: float(bf16), or the LogFMT round trip per 128 channels. */
static void load_row(const uint16_t *row, int hidden, int use_logfmt, float *v) {
    if (!use_logfmt) {
        for (int h = 0; h < hidden; h++)
            v[h] = epref_bf16_to_float(row[h]);
        return;
    }
    for (int g = 0; g < hidden; g += LOGFMT_GROUP)
        epref_logfmt_roundtrip(row + g, LOGFMT_GROUP, v + g);
}

static void combine_ll_token(int t, const uint16_t *const *expert_out, const int64_t *topk_idx,
                             const float *topk_weights, const int32_t *rows, const ll_combine_shape_t *sh,
                             int use_logfmt, float *acc, float *v, uint16_t *out) {
    size_t H = (size_t)sh->hidden;
    for (size_t h = 0; h < H; h++)
        acc[h] = 0.0f;
    for (int k = 0; k < sh->topk; k++) {
        size_t i = (size_t)t * (size_t)sh->topk + (size_t)k;
        if (topk_idx[i] < 0)
            continue;
        int d = (int)(topk_idx[i] / sh->local), l = (int)(topk_idx[i] % sh->local);
        const uint16_t *row = expert_out[d] + ((size_t)l * sh->slots + (size_t)rows[i]) * H;
        load_row(row, sh->hidden, use_logfmt, v);
        for (size_t h = 0; h < H; h++)
            acc[h] = fmaf(topk_weights[i], v[h], acc[h]);
    }
    for (size_t h = 0; h < H; h++)
        out[(size_t)t * H + h] = epref_float_to_bf16(acc[h]);
}

/* Per-rank sums: for each rank d the token reached, in the order of the first k naming d, a float32 fmaf chain
 * from 0 over the k naming d (in k order) is rounded to bf16 and added to acc. */
static void combine_ll_token_per_rank(int t, const uint16_t *const *expert_out, const int64_t *topk_idx,
                                      const float *topk_weights, const int32_t *rows, const ll_combine_shape_t *sh,
                                      float *acc, float *part, float *v, uint16_t *out) {
    size_t H = (size_t)sh->hidden, K = (size_t)sh->topk;
    const int64_t *ids = topk_idx + (size_t)t * K;
    for (size_t h = 0; h < H; h++)
        acc[h] = 0.0f;
    for (size_t k = 0; k < K; k++) {
        if (ids[k] < 0)
            continue;
        int d = (int)(ids[k] / sh->local), seen = 0;
        for (size_t j = 0; j < k; j++)
            seen |= ids[j] >= 0 && (int)(ids[j] / sh->local) == d;
        if (seen)
            continue; /* d's sum was added at its first k */
        for (size_t h = 0; h < H; h++)
            part[h] = 0.0f;
        for (size_t j = k; j < K; j++) {
            if (ids[j] < 0 || (int)(ids[j] / sh->local) != d)
                continue;
            int l = (int)(ids[j] % sh->local);
            const uint16_t *row = expert_out[d] + ((size_t)l * sh->slots + (size_t)rows[(size_t)t * K + j]) * H;
            load_row(row, sh->hidden, 0, v);
            for (size_t h = 0; h < H; h++)
                part[h] = fmaf(topk_weights[(size_t)t * K + j], v[h], part[h]);
        }
        for (size_t h = 0; h < H; h++)
            acc[h] += epref_bf16_to_float(epref_float_to_bf16(part[h]));
    }
    for (size_t h = 0; h < H; h++)
        out[(size_t)t * H + h] = epref_float_to_bf16(acc[h]);
}

/* The low-latency combine, with one row per (token, k) (per_rank = 0) or one sum per (token, rank). */
static epref_status_t ll_combine(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                 int num_ranks, int num_experts, int rank, int num_tokens, int topk,
                                 const int64_t *topk_idx, const float *topk_weights, int use_logfmt, int per_rank,
                                 uint16_t *out) {
    ll_combine_shape_t sh = {num_ranks, rank, 0, 0, num_tokens, topk, 0};
    if (recv != NULL && num_ranks >= 1 && num_experts >= 1) {
        sh.local = num_experts / num_ranks;
        sh.hidden = recv[0].hidden;
        sh.slots = (size_t)num_ranks * (size_t)(recv[0].max_tokens > 0 ? recv[0].max_tokens : 0);
    }
    epref_status_t st = check_ll_combine_args(expert_out, recv, num_experts, &sh, topk_idx, topk_weights, out);
    if (st != EPREF_OK)
        return st;
    int32_t *rows = epref_zalloc((size_t)num_tokens * (size_t)topk, sizeof(int32_t));
    float *acc = epref_zalloc((size_t)sh.hidden, sizeof(float));
    float *part = epref_zalloc((size_t)sh.hidden, sizeof(float));
    float *v = epref_zalloc((size_t)sh.hidden, sizeof(float));
    if (!rows || !acc || !part || !v)
        st = epref_fail(EPREF_NO_MEMORY, "ll_combine: out of memory");
    else if ((st = map_ll_rows(recv, &sh, topk_idx, rows)) == EPREF_OK)
        for (int t = 0; t < num_tokens; t++) {
            if (per_rank)
                combine_ll_token_per_rank(t, expert_out, topk_idx, topk_weights, rows, &sh, acc, part, v, out);
            else
                combine_ll_token(t, expert_out, topk_idx, topk_weights, rows, &sh, use_logfmt != 0, acc, v, out);
        }
    free(rows);
    free(acc);
    free(part);
    free(v);
    return st;
}

epref_status_t epref_ll_combine(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                int num_ranks, int num_experts, int rank, int num_tokens, int topk,
                                const int64_t *topk_idx, const float *topk_weights, int use_logfmt, uint16_t *out) {
    return ll_combine(expert_out, recv, num_ranks, num_experts, rank, num_tokens, topk, topk_idx, topk_weights,
                      use_logfmt, 0, out);
}

epref_status_t epref_ll_combine_per_rank(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                         int num_ranks, int num_experts, int rank, int num_tokens, int topk,
                                         const int64_t *topk_idx, const float *topk_weights, uint16_t *out) {
    return ll_combine(expert_out, recv, num_ranks, num_experts, rank, num_tokens, topk, topk_idx, topk_weights, 0, 1,
                      out);
}
