/* High-throughput (normal) combine: what one source rank gets back. For each of its tokens, the rows that the
 * destination ranks send back are summed in float32 in ascending rank order, then the biases; bf16 at the end.
 *
 * Finding a token's row on each destination uses prefix counts, not searches: on destination d the rows from
 * source `rank` form one block (rows are ordered by (source rank, source token)), found by a binary search
 * on src_rank, and within it they appear in token order, so a cursor per destination walks them. A first
 * pass maps every (token, destination) to its row and checks it against src_rank / src_token, so a result
 * that does not belong to these inputs fails before anything is written. O(N*R*K + N*R*H). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const epref_rank_input_t *me; /* in[rank] */
    int num_ranks, rank, local, hidden, topk;
    int use_weights;
} combine_shape_t;

static epref_status_t check_recv(const epref_dispatch_result_t *recv, const uint16_t *const *x, const size_t *x_stride,
                                 const float *const *weights, const combine_shape_t *sh) {
    for (int d = 0; d < sh->num_ranks; d++) {
        const epref_dispatch_result_t *r = &recv[d];
        if (r->num_local_experts != sh->local || r->num_recv < 0 || r->num_recv > r->num_rows)
            return epref_fail(EPREF_BAD_ARGUMENT,
                              "combine: recv[%d] has %d local experts and %d of %d rows, expected %d local experts", d,
                              r->num_local_experts, r->num_recv, r->num_rows, sh->local);
        if (r->num_recv == 0)
            continue;
        if (!r->src_rank || !r->src_token)
            return epref_fail(EPREF_BAD_ARGUMENT, "combine: recv[%d] has no src_rank / src_token", d);
        if (x[d] == NULL || x_stride[d] < (size_t)sh->hidden)
            return epref_fail(EPREF_BAD_ARGUMENT, "combine: x[%d] must be non-NULL with stride >= %d (got %zu)", d,
                              sh->hidden, x_stride[d]);
        if (sh->use_weights && (weights[d] == NULL || r->topk != sh->topk))
            return epref_fail(EPREF_BAD_ARGUMENT, "combine: weights[%d] must be non-NULL with topk %d (recv has %d)", d,
                              sh->topk, r->topk);
    }
    return EPREF_OK;
}

static epref_status_t check_combine_args(const epref_rank_input_t *in, const epref_dispatch_result_t *recv,
                                         const uint16_t *const *x, const size_t *x_stride, int num_ranks,
                                         int num_experts, int rank, int hidden, const uint16_t *out) {
    if (in == NULL || recv == NULL || x == NULL || x_stride == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "combine: in, recv, x and x_stride must be non-NULL");
    if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks != 0)
        return epref_fail(EPREF_BAD_ARGUMENT, "combine: num_experts (%d) must be a positive multiple of num_ranks (%d)",
                          num_experts, num_ranks);
    if (rank < 0 || rank >= num_ranks)
        return epref_fail(EPREF_BAD_ARGUMENT, "combine: rank %d is outside [0, %d)", rank, num_ranks);
    if (hidden < 1)
        return epref_fail(EPREF_BAD_ARGUMENT, "combine: hidden is %d, expected >= 1", hidden);
    const epref_rank_input_t *me = &in[rank];
    if (me->num_tokens < 0 || me->topk < 1)
        return epref_fail(EPREF_BAD_ARGUMENT, "combine: in[%d] has %d tokens and topk %d", rank, me->num_tokens,
                          me->topk);
    if (me->num_tokens > 0 && (me->topk_idx == NULL || out == NULL))
        return epref_fail(EPREF_BAD_ARGUMENT, "combine: topk_idx and out must be non-NULL with %d tokens",
                          me->num_tokens);
    return epref_check_topk_ids(me->topk_idx, me->num_tokens, me->topk, num_experts, "combine: topk_idx");
}

/* First row on destination r whose source rank is >= rank (src_rank is ascending over the real rows). */
static int first_row_of(const epref_dispatch_result_t *r, int rank) {
    int lo = 0, hi = r->num_recv;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (r->src_rank[mid] < rank)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* rows[t * R + d] = the row of token t on destination d, or -1 if t did not go there. */
static epref_status_t map_rows(const epref_dispatch_result_t *recv, const combine_shape_t *sh, int *cursor,
                               int32_t *rows) {
    int n = sh->me->num_tokens, R = sh->num_ranks;
    for (int d = 0; d < R; d++)
        cursor[d] = first_row_of(&recv[d], sh->rank);
    for (int t = 0; t < n; t++) {
        const int64_t *idx = sh->me->topk_idx + (size_t)t * (size_t)sh->topk;
        for (int d = 0; d < R; d++) {
            int32_t row = -1;
            if (epref_token_goes_to(idx, sh->topk, d, sh->local)) {
                row = cursor[d]++;
                const epref_dispatch_result_t *r = &recv[d];
                if (row >= r->num_recv || r->src_rank[row] != sh->rank || r->src_token[row] != t)
                    return epref_fail(EPREF_BAD_ARGUMENT,
                                      "combine: recv[%d] does not match in[%d]: token %d should be at row %d", d,
                                      sh->rank, t, row);
            }
            rows[(size_t)t * (size_t)R + (size_t)d] = row;
        }
    }
    for (int d = 0; d < R; d++) /* no rows left over from this rank either */
        if (cursor[d] < recv[d].num_recv && recv[d].src_rank[cursor[d]] == sh->rank)
            return epref_fail(EPREF_BAD_ARGUMENT, "combine: recv[%d] has more rows from rank %d than its tokens", d,
                              sh->rank);
    return EPREF_OK;
}

static void add_bf16_row(float *acc, const uint16_t *row, int hidden) {
    for (int h = 0; h < hidden; h++)
        acc[h] += epref_bf16_to_float(row[h]);
}

static void combine_token(int t, const int32_t *rows, const uint16_t *const *x, const size_t *x_stride,
                          const uint16_t *bias0, const uint16_t *bias1, const combine_shape_t *sh, float *acc,
                          uint16_t *out) {
    size_t H = (size_t)sh->hidden;
    for (size_t h = 0; h < H; h++)
        acc[h] = 0.0f;
    for (int d = 0; d < sh->num_ranks; d++) {
        int32_t row = rows[(size_t)t * (size_t)sh->num_ranks + (size_t)d];
        if (row >= 0)
            add_bf16_row(acc, x[d] + (size_t)row * x_stride[d], sh->hidden);
    }
    if (bias0)
        add_bf16_row(acc, bias0 + (size_t)t * H, sh->hidden);
    if (bias1)
        add_bf16_row(acc, bias1 + (size_t)t * H, sh->hidden);
    for (size_t h = 0; h < H; h++)
        out[(size_t)t * H + h] = epref_float_to_bf16(acc[h]);
}

/* Weights come back the same way: the sum over destinations, ascending, of each row's k-th weight (0 where the
 * destination did not hold that expert), so each weight returns unchanged. */
static void combine_weights(int t, const int32_t *rows, const float *const *weights, const combine_shape_t *sh,
                            float *out_weights) {
    size_t K = (size_t)sh->topk;
    for (size_t k = 0; k < K; k++) {
        float w = 0.0f;
        for (int d = 0; d < sh->num_ranks; d++) {
            int32_t row = rows[(size_t)t * (size_t)sh->num_ranks + (size_t)d];
            if (row >= 0)
                w += weights[d][(size_t)row * K + k];
        }
        out_weights[(size_t)t * K + k] = w;
    }
}

epref_status_t epref_combine(const epref_rank_input_t *in, const epref_dispatch_result_t *recv,
                             const uint16_t *const *x, const size_t *x_stride, const float *const *weights,
                             int num_ranks, int num_experts, int rank, int hidden, const uint16_t *bias0,
                             const uint16_t *bias1, uint16_t *out, float *out_weights) {
    epref_status_t st = check_combine_args(in, recv, x, x_stride, num_ranks, num_experts, rank, hidden, out);
    if (st != EPREF_OK)
        return st;
    combine_shape_t sh = {.me = &in[rank],
                          .num_ranks = num_ranks,
                          .rank = rank,
                          .local = num_experts / num_ranks,
                          .hidden = hidden,
                          .topk = in[rank].topk};
    sh.use_weights = weights != NULL && out_weights != NULL;
    if ((st = check_recv(recv, x, x_stride, weights, &sh)) != EPREF_OK)
        return st;
    int n = sh.me->num_tokens;
    int32_t *rows = epref_zalloc((size_t)n * (size_t)num_ranks, sizeof(int32_t));
    int *cursor = epref_zalloc((size_t)num_ranks, sizeof(int));
    float *acc = epref_zalloc((size_t)hidden, sizeof(float));
    if (!rows || !cursor || !acc) {
        st = epref_fail(EPREF_NO_MEMORY, "combine: out of memory");
    } else if ((st = map_rows(recv, &sh, cursor, rows)) == EPREF_OK) {
        for (int t = 0; t < n; t++) {
            combine_token(t, rows, x, x_stride, bias0, bias1, &sh, acc, out);
            if (sh.use_weights)
                combine_weights(t, rows, weights, &sh, out_weights);
        }
    }
    free(rows);
    free(cursor);
    free(acc);
    return st;
}
