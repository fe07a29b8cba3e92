/* get_dispatch_layout for one rank's tokens: per-rank and per-expert counts and the token-to-rank map.
 * A token counts once per rank and once per expert however often its top-k names them, so duplicates are
 * removed with "last token that touched it" stamps (O(N*K), no per-token clearing). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static epref_status_t check_layout_args(const int64_t *topk_idx, int num_tokens, int topk, int num_ranks,
                                        int num_experts) {
    if (num_tokens < 0 || topk < 1)
        return epref_fail(EPREF_BAD_ARGUMENT, "layout: need num_tokens >= 0 and topk >= 1, got %d and %d", num_tokens,
                          topk);
    if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks != 0)
        return epref_fail(EPREF_BAD_ARGUMENT, "layout: num_experts (%d) must be a positive multiple of num_ranks (%d)",
                          num_experts, num_ranks);
    if (num_tokens > 0 && topk_idx == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "layout: topk_idx is NULL with %d tokens", num_tokens);
    return epref_check_topk_ids(topk_idx, num_tokens, topk, num_experts, "layout: topk_idx");
}

epref_status_t epref_dispatch_layout(const int64_t *topk_idx, int num_tokens, int topk, int num_ranks, int num_experts,
                                     int32_t *tokens_per_rank, int32_t *tokens_per_expert, uint8_t *is_token_in_rank) {
    epref_status_t st = check_layout_args(topk_idx, num_tokens, topk, num_ranks, num_experts);
    if (st != EPREF_OK)
        return st;
    int local = num_experts / num_ranks;
    /* Stamps hold token + 1 of the last token that counted this rank / expert (0 = none yet). */
    int32_t *rank_stamp = epref_zalloc((size_t)num_ranks, sizeof(int32_t));
    int32_t *expert_stamp = epref_zalloc((size_t)num_experts, sizeof(int32_t));
    int32_t *per_rank = epref_zalloc((size_t)num_ranks, sizeof(int32_t));
    int32_t *per_expert = epref_zalloc((size_t)num_experts, sizeof(int32_t));
    if (!rank_stamp || !expert_stamp || !per_rank || !per_expert) {
        free(rank_stamp), free(expert_stamp), free(per_rank), free(per_expert);
        return epref_fail(EPREF_NO_MEMORY, "layout: out of memory");
    }
    if (is_token_in_rank)
        memset(is_token_in_rank, 0, (size_t)num_tokens * (size_t)num_ranks);
    for (int t = 0; t < num_tokens; t++) {
        const int64_t *row = topk_idx + (size_t)t * (size_t)topk;
        for (int k = 0; k < topk; k++) {
            if (row[k] < 0)
                continue;
            int e = (int)row[k], r = e / local;
            if (expert_stamp[e] != t + 1) {
                expert_stamp[e] = t + 1;
                per_expert[e]++;
            }
            if (rank_stamp[r] != t + 1) {
                rank_stamp[r] = t + 1;
                per_rank[r]++;
                if (is_token_in_rank)
                    is_token_in_rank[(size_t)t * (size_t)num_ranks + (size_t)r] = 1;
            }
        }
    }
    if (tokens_per_rank)
        memcpy(tokens_per_rank, per_rank, (size_t)num_ranks * sizeof(int32_t));
    if (tokens_per_expert)
        memcpy(tokens_per_expert, per_expert, (size_t)num_experts * sizeof(int32_t));
    free(rank_stamp), free(expert_stamp), free(per_rank), free(per_expert);
    return EPREF_OK;
}
