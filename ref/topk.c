/* Routing checks shared by layout, dispatch and combine (normal and low-latency). */
#include "internal.h"

#include <stdio.h>
#include <string.h>

epref_status_t epref_check_topk_ids(const int64_t *idx, int num_tokens, int topk, int num_experts, const char *owner) {
    for (int t = 0; t < num_tokens; t++) {
        for (int k = 0; k < topk; k++) {
            int64_t e = idx[(size_t)t * (size_t)topk + (size_t)k];
            if (e < -1 || e >= num_experts)
                return epref_fail(EPREF_BAD_EXPERT, "%s: token %d, k %d: expert id %lld is outside [-1, %d)", owner, t,
                                  k, (long long)e, num_experts);
        }
    }
    return EPREF_OK;
}

int epref_token_goes_to(const int64_t *row, int topk, int rank, int num_local_experts) {
    for (int k = 0; k < topk; k++)
        if (row[k] >= 0 && row[k] / num_local_experts == rank)
            return 1;
    return 0;
}

uint16_t epref_load_bf16(const uint8_t *row, size_t i) {
    uint16_t v;
    memcpy(&v, row + 2 * i, sizeof(v));
    return v;
}

epref_status_t epref_check_rank_inputs(const epref_rank_input_t *in, int num_ranks, int num_experts, const char *op) {
    if (in == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "%s: in is NULL", op);
    for (int s = 0; s < num_ranks; s++) {
        const epref_rank_input_t *r = &in[s];
        if (r->num_tokens < 0)
            return epref_fail(EPREF_BAD_ARGUMENT, "%s: in[%d].num_tokens is %d, expected >= 0", op, s, r->num_tokens);
        if (r->topk < 1 || r->topk != in[0].topk)
            return epref_fail(EPREF_BAD_ARGUMENT, "%s: in[%d].topk is %d, expected %d (>= 1, same on every rank)", op,
                              s, r->topk, in[0].topk < 1 ? 1 : in[0].topk);
        if (r->num_tokens == 0)
            continue;
        if (r->topk_idx == NULL)
            return epref_fail(EPREF_BAD_ARGUMENT, "%s: in[%d].topk_idx is NULL with %d tokens", op, s, r->num_tokens);
        if (r->row_bytes > 0 && r->x == NULL)
            return epref_fail(EPREF_BAD_ARGUMENT, "%s: in[%d].x is NULL with %d tokens", op, s, r->num_tokens);
        if (r->stride_bytes < r->row_bytes)
            return epref_fail(EPREF_BAD_ARGUMENT, "%s: in[%d].stride_bytes is %zu, expected >= row_bytes %zu", op, s,
                              r->stride_bytes, r->row_bytes);
        char owner[64];
        snprintf(owner, sizeof(owner), "%s: in[%d].topk_idx", op, s);
        epref_status_t st = epref_check_topk_ids(r->topk_idx, r->num_tokens, r->topk, num_experts, owner);
        if (st != EPREF_OK)
            return st;
    }
    return EPREF_OK;
}
