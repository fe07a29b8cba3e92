/* High-throughput (normal) dispatch: what one destination rank receives from all R ranks.
 * Every token goes once to each rank that holds at least one of its experts; the received rows are ordered by
 * (source rank, source token). One pass over all (rank, token, k) plus the byte copies: O(R*N*K + bytes). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int num_ranks, num_experts, rank, local; /* local = L = E / R */
    int topk;
    size_t row_bytes;
    int num_scales;
    int has_weights;
} dispatch_shape_t;

static epref_status_t check_dispatch_args(const epref_rank_input_t *in, int num_ranks, int num_experts, int rank,
                                          int expert_alignment, int num_worst_tokens,
                                          const epref_dispatch_result_t *out) {
    if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks != 0)
        return epref_fail(EPREF_BAD_ARGUMENT,
                          "dispatch: num_experts (%d) must be a positive multiple of num_ranks (%d)", num_experts,
                          num_ranks);
    if (rank < 0 || rank >= num_ranks)
        return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: rank %d is outside [0, %d)", rank, num_ranks);
    if (expert_alignment < 1)
        return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: expert_alignment is %d, expected >= 1", expert_alignment);
    if (num_worst_tokens < 0)
        return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: num_worst_tokens is %d, expected >= 0", num_worst_tokens);
    if (out == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: out is NULL");
    return epref_check_rank_inputs(in, num_ranks, num_experts, "dispatch");
}

/* Row size, scales and weights must agree across ranks: the receiver sees one tensor. */
static epref_status_t check_row_formats(const epref_rank_input_t *in, dispatch_shape_t *sh) {
    sh->row_bytes = in[0].row_bytes;
    sh->num_scales = in[0].num_scales;
    sh->has_weights = 0;
    for (int s = 0; s < sh->num_ranks; s++) {
        const epref_rank_input_t *r = &in[s];
        if (r->row_bytes != sh->row_bytes)
            return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: in[%d].row_bytes is %zu, expected %zu as on rank 0", s,
                              r->row_bytes, sh->row_bytes);
        if (r->num_scales != sh->num_scales || r->num_scales < 0)
            return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: in[%d].num_scales is %d, expected %d as on rank 0", s,
                              r->num_scales, sh->num_scales);
        if (r->num_tokens > 0 && r->num_scales > 0 && (r->scales == NULL || r->scales_stride < (size_t)r->num_scales))
            return epref_fail(EPREF_BAD_ARGUMENT,
                              "dispatch: in[%d].scales must be non-NULL with scales_stride >= %d (got %zu)", s,
                              r->num_scales, r->scales_stride);
        sh->has_weights |= r->topk_weights != NULL;
    }
    for (int s = 0; sh->has_weights && s < sh->num_ranks; s++)
        if (in[s].num_tokens > 0 && in[s].topk_weights == NULL)
            return epref_fail(EPREF_BAD_ARGUMENT, "dispatch: in[%d].topk_weights is NULL but other ranks pass weights",
                              s);
    return EPREF_OK;
}

static int count_received(const epref_rank_input_t *in, const dispatch_shape_t *sh) {
    int n = 0;
    for (int s = 0; s < sh->num_ranks; s++)
        for (int t = 0; t < in[s].num_tokens; t++)
            n += epref_token_goes_to(in[s].topk_idx + (size_t)t * (size_t)sh->topk, sh->topk, sh->rank, sh->local);
    return n;
}

static epref_status_t alloc_result(epref_dispatch_result_t *r, const dispatch_shape_t *sh) {
    size_t rows = (size_t)r->num_rows, k = (size_t)sh->topk;
    r->x = epref_zalloc(rows, sh->row_bytes);
    r->scales = sh->num_scales > 0 ? epref_zalloc(rows, (size_t)sh->num_scales * sizeof(uint32_t)) : NULL;
    r->topk_idx = epref_zalloc(rows, k * sizeof(int64_t));
    r->topk_weights = sh->has_weights ? epref_zalloc(rows, k * sizeof(float)) : NULL;
    r->src_rank = epref_zalloc(rows, sizeof(int32_t));
    r->src_token = epref_zalloc(rows, sizeof(int32_t));
    r->num_recv_per_expert = r->per_expert_valid ? epref_zalloc((size_t)sh->local, sizeof(int32_t)) : NULL;
    if (!r->x || (sh->num_scales > 0 && !r->scales) || !r->topk_idx || (sh->has_weights && !r->topk_weights) ||
        !r->src_rank || !r->src_token || (r->per_expert_valid && !r->num_recv_per_expert)) {
        epref_dispatch_result_free(r);
        return epref_fail(EPREF_NO_MEMORY, "dispatch: out of memory for %d rows of %zu bytes", r->num_rows,
                          sh->row_bytes);
    }
    return EPREF_OK;
}

/* Writes received row `row`: token t of source s. `stamp` (L entries) counts each local expert once per token. */
static void fill_row(epref_dispatch_result_t *r, const epref_rank_input_t *src, int s, int t, int row,
                     const dispatch_shape_t *sh, int *stamp) {
    size_t k = (size_t)sh->topk;
    if (sh->row_bytes > 0)
        memcpy(r->x + (size_t)row * sh->row_bytes, src->x + (size_t)t * src->stride_bytes, sh->row_bytes);
    if (sh->num_scales > 0)
        memcpy(r->scales + (size_t)row * (size_t)sh->num_scales, src->scales + (size_t)t * src->scales_stride,
               (size_t)sh->num_scales * sizeof(uint32_t));
    const int64_t *idx = src->topk_idx + (size_t)t * k;
    for (size_t j = 0; j < k; j++) {
        int mine = idx[j] >= 0 && idx[j] / sh->local == sh->rank;
        int64_t l = mine ? idx[j] - (int64_t)sh->rank * sh->local : -1;
        r->topk_idx[(size_t)row * k + j] = l;
        if (r->topk_weights)
            r->topk_weights[(size_t)row * k + j] = mine ? src->topk_weights[(size_t)t * k + j] : 0.0f;
        if (mine && r->num_recv_per_expert && stamp[l] != row + 1) {
            stamp[l] = row + 1;
            r->num_recv_per_expert[l]++;
        }
    }
    r->src_rank[row] = s;
    r->src_token[row] = t;
}

/* Rows past the real count (worst-token mode): no expert, no source. x, scales and weights are already 0. */
static void fill_padding(epref_dispatch_result_t *r, const dispatch_shape_t *sh) {
    for (int row = r->num_recv; row < r->num_rows; row++) {
        for (int j = 0; j < sh->topk; j++)
            r->topk_idx[(size_t)row * (size_t)sh->topk + (size_t)j] = -1;
        r->src_rank[row] = -1;
        r->src_token[row] = -1;
    }
}

epref_status_t epref_dispatch(const epref_rank_input_t *in, int num_ranks, int num_experts, int rank,
                              int expert_alignment, int num_worst_tokens, epref_dispatch_result_t *out) {
    epref_status_t st = check_dispatch_args(in, num_ranks, num_experts, rank, expert_alignment, num_worst_tokens, out);
    if (st != EPREF_OK)
        return st;
    dispatch_shape_t sh = {num_ranks, num_experts, rank, num_experts / num_ranks, in[0].topk, 0, 0, 0};
    if ((st = check_row_formats(in, &sh)) != EPREF_OK)
        return st;
    epref_dispatch_result_t r;
    memset(&r, 0, sizeof(r));
    r.num_recv = count_received(in, &sh);
    if (num_worst_tokens > 0 && r.num_recv > num_worst_tokens)
        return epref_fail(EPREF_TOO_MANY, "dispatch: rank %d receives %d tokens but num_worst_tokens is %d", rank,
                          r.num_recv, num_worst_tokens);
    r.num_rows = num_worst_tokens > 0 ? num_worst_tokens : r.num_recv;
    r.row_bytes = sh.row_bytes;
    r.num_scales = sh.num_scales;
    r.topk = sh.topk;
    r.num_local_experts = sh.local;
    r.per_expert_valid = num_worst_tokens == 0;
    int *stamp = epref_zalloc((size_t)sh.local, sizeof(int));
    if (!stamp)
        return epref_fail(EPREF_NO_MEMORY, "dispatch: out of memory");
    if ((st = alloc_result(&r, &sh)) != EPREF_OK) {
        free(stamp);
        return st;
    }
    int row = 0;
    for (int s = 0; s < num_ranks; s++)
        for (int t = 0; t < in[s].num_tokens; t++)
            if (epref_token_goes_to(in[s].topk_idx + (size_t)t * (size_t)sh.topk, sh.topk, rank, sh.local))
                fill_row(&r, &in[s], s, t, row++, &sh, stamp);
    fill_padding(&r, &sh);
    for (int l = 0; r.per_expert_valid && l < sh.local; l++) {
        int64_t a = expert_alignment, c = r.num_recv_per_expert[l];
        r.num_recv_per_expert[l] = (int32_t)((c + a - 1) / a * a);
    }
    free(stamp);
    *out = r;
    return EPREF_OK;
}

void epref_dispatch_result_free(epref_dispatch_result_t *r) {
    if (r == NULL)
        return;
    free(r->x);
    free(r->scales);
    free(r->topk_idx);
    free(r->topk_weights);
    free(r->src_rank);
    free(r->src_token);
    free(r->num_recv_per_expert);
    memset(r, 0, sizeof(*r));
}
