/* Low-latency dispatch: what one destination rank receives. Each local expert gets the (token, expert) pairs
 * naming it packed from row 0, ordered by (source rank, source token); a token that names the same expert
 * twice in its top-k is sent to it once. Rows are bf16 or cast to FP8 per 128 channels (formats.c).
 * O(R*T*K + bytes): one pass over the routing, appending each pair at its expert's running count. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define FP8_GROUP  128 /* channels per scale */
#define UE8M0_PACK 4   /* UE8M0 scale bytes per int32 word */

typedef struct {
    int num_ranks, rank, local, max_tokens, hidden, topk;
    int use_fp8, round_scale, use_ue8m0;
    size_t slots;       /* R * T rows per expert */
    size_t elem_bytes;  /* 1 (e4m3) or 2 (bf16) */
    size_t scale_words; /* per row: H/128 floats or H/512 words, 0 without FP8 */
} ll_shape_t;

static epref_status_t check_ll_shape(int num_ranks, int num_experts, int max_tokens, int hidden, int rank, int use_fp8,
                                     int round_scale, int use_ue8m0) {
    if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks != 0)
        return epref_fail(EPREF_BAD_ARGUMENT,
                          "ll_dispatch: num_experts (%d) must be a positive multiple of num_ranks (%d)", num_experts,
                          num_ranks);
    if (rank < 0 || rank >= num_ranks)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: rank %d is outside [0, %d)", rank, num_ranks);
    if (max_tokens < 1)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: max_tokens (T) is %d, expected >= 1", max_tokens);
    if (hidden < FP8_GROUP || hidden % FP8_GROUP != 0)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: hidden is %d, expected a positive multiple of 128", hidden);
    if (use_fp8 && use_ue8m0 && !round_scale)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: use_ue8m0 needs round_scale");
    if (use_fp8 && use_ue8m0 && hidden % (FP8_GROUP * UE8M0_PACK) != 0)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: use_ue8m0 needs hidden %% 512 == 0, got %d", hidden);
    return EPREF_OK;
}

/* The sizes of one destination's result. round_scale and use_ue8m0 only mean something with FP8. */
static ll_shape_t ll_shape(int num_ranks, int num_experts, int max_tokens, int hidden, int rank, int use_fp8,
                           int round_scale, int use_ue8m0, int topk) {
    ll_shape_t sh;
    sh.num_ranks = num_ranks;
    sh.rank = rank;
    sh.local = num_experts / num_ranks;
    sh.max_tokens = max_tokens;
    sh.hidden = hidden;
    sh.topk = topk;
    sh.use_fp8 = use_fp8;
    sh.round_scale = use_fp8 && round_scale;
    sh.use_ue8m0 = use_fp8 && use_ue8m0;
    sh.slots = (size_t)num_ranks * (size_t)max_tokens;
    sh.elem_bytes = use_fp8 ? 1 : 2;
    sh.scale_words = !use_fp8       ? 0
                     : sh.use_ue8m0 ? (size_t)hidden / (FP8_GROUP * UE8M0_PACK)
                                    : (size_t)hidden / FP8_GROUP;
    return sh;
}

static epref_status_t check_ll_inputs(const epref_rank_input_t *in, int num_experts, const ll_shape_t *sh) {
    epref_status_t st = epref_check_rank_inputs(in, sh->num_ranks, num_experts, "ll_dispatch");
    if (st != EPREF_OK)
        return st;
    for (int s = 0; s < sh->num_ranks; s++) {
        if (in[s].num_tokens > sh->max_tokens)
            return epref_fail(EPREF_TOO_MANY, "ll_dispatch: in[%d] has %d tokens, more than T = %d", s,
                              in[s].num_tokens, sh->max_tokens);
        if (in[s].num_tokens > 0 && in[s].row_bytes != 2 * (size_t)sh->hidden)
            return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: in[%d].row_bytes is %zu, expected %zu (bf16 x H)", s,
                              in[s].row_bytes, 2 * (size_t)sh->hidden);
    }
    return EPREF_OK;
}

static epref_status_t alloc_ll_result(epref_ll_dispatch_result_t *r, const ll_shape_t *sh) {
    size_t L = (size_t)sh->local, R = (size_t)sh->num_ranks, rows = L * sh->slots, x_bytes, scale_bytes;
    int ok = epref_mul3(rows, (size_t)sh->hidden, sh->elem_bytes, &x_bytes) &&
             epref_mul3(rows, sh->scale_words, 4, &scale_bytes);
    r->recv_count = epref_zalloc(L, sizeof(int32_t));
    r->x = ok ? epref_zalloc(x_bytes, 1) : NULL;
    r->scales = ok && sh->use_fp8 ? epref_zalloc(scale_bytes, 1) : NULL;
    r->src_info = epref_zalloc(rows, sizeof(int32_t));
    r->layout_range = epref_zalloc(L * R, sizeof(int64_t));
    if (!r->recv_count || !r->x || (sh->use_fp8 && !r->scales) || !r->src_info || !r->layout_range) {
        epref_ll_dispatch_result_free(r);
        return epref_fail(EPREF_NO_MEMORY, "ll_dispatch: out of memory for %zu rows of hidden %d", rows, sh->hidden);
    }
    for (size_t i = 0; i < rows; i++)
        r->src_info[i] = -1;
    return EPREF_OK;
}

/* Writes one received row (slot `row` of expert l) from the bf16 values v[H]. */
static void store_row(epref_ll_dispatch_result_t *r, int l, int row, const uint16_t *v, const ll_shape_t *sh) {
    size_t slot = (size_t)l * sh->slots + (size_t)row, H = (size_t)sh->hidden;
    if (!sh->use_fp8) {
        memcpy((uint16_t *)r->x + slot * H, v, H * sizeof(uint16_t));
        return;
    }
    uint8_t *q = (uint8_t *)r->x + slot * H;
    for (size_t g = 0; g < H / FP8_GROUP; g++) {
        float scale_inv;
        epref_cast_fp8_group(v + g * FP8_GROUP, FP8_GROUP, sh->round_scale, q + g * FP8_GROUP, &scale_inv);
        if (sh->use_ue8m0) /* group g -> byte g % 4 of word g / 4, byte 0 least significant */
            ((uint32_t *)r->scales)[slot * sh->scale_words + g / UE8M0_PACK] |= (uint32_t)epref_ue8m0_byte(scale_inv)
                                                                                << (8 * (g % UE8M0_PACK));
        else
            ((float *)r->scales)[slot * sh->scale_words + g] = scale_inv;
    }
}

/* Appends every (token, local expert) pair of source s; stamp[l] = t + 1 once token t was sent to l. */
static void receive_from(epref_ll_dispatch_result_t *r, const epref_rank_input_t *src, int s, const ll_shape_t *sh,
                         int *stamp, uint16_t *v) {
    int32_t *count = r->recv_count;
    int *begin = stamp + sh->local; /* second half of the scratch: counts before this source */
    for (int l = 0; l < sh->local; l++) {
        stamp[l] = 0;
        begin[l] = count[l];
    }
    for (int t = 0; t < src->num_tokens; t++) {
        const int64_t *idx = src->topk_idx + (size_t)t * (size_t)sh->topk;
        int loaded = 0;
        for (int k = 0; k < sh->topk; k++) {
            if (idx[k] < 0 || idx[k] / sh->local != sh->rank)
                continue;
            int l = (int)(idx[k] % sh->local);
            if (stamp[l] == t + 1)
                continue; /* the same expert twice in one top-k: one pair */
            stamp[l] = t + 1;
            if (!loaded) { /* the row may be unaligned: copy it out once */
                memcpy(v, src->x + (size_t)t * src->stride_bytes, 2 * (size_t)sh->hidden);
                loaded = 1;
            }
            r->src_info[(size_t)l * sh->slots + (size_t)count[l]] = t;
            store_row(r, l, count[l]++, v, sh);
        }
    }
    for (int l = 0; l < sh->local; l++)
        r->layout_range[(size_t)l * (size_t)sh->num_ranks + (size_t)s] =
            ((int64_t)begin[l] << 32) | (int64_t)(count[l] - begin[l]);
}

epref_status_t epref_ll_dispatch(const epref_rank_input_t *in, int num_ranks, int num_experts, int max_tokens,
                                 int hidden, int rank, int use_fp8, int round_scale, int use_ue8m0,
                                 epref_ll_dispatch_result_t *out) {
    epref_status_t st =
        check_ll_shape(num_ranks, num_experts, max_tokens, hidden, rank, use_fp8, round_scale, use_ue8m0);
    if (st != EPREF_OK)
        return st;
    if (out == NULL)
        return epref_fail(EPREF_BAD_ARGUMENT, "ll_dispatch: out is NULL");
    ll_shape_t sh = ll_shape(num_ranks, num_experts, max_tokens, hidden, rank, use_fp8 != 0, round_scale, use_ue8m0,
                             in ? in[0].topk : 0);
    if ((st = check_ll_inputs(in, num_experts, &sh)) != EPREF_OK)
        return st;
    epref_ll_dispatch_result_t r;
    memset(&r, 0, sizeof(r));
    r.num_local_experts = sh.local;
    r.max_tokens = max_tokens;
    r.num_ranks = num_ranks;
    r.hidden = hidden;
    r.use_fp8 = sh.use_fp8;
    r.round_scale = sh.round_scale;
    r.use_ue8m0 = sh.use_ue8m0;
    int *stamp = epref_zalloc(2 * (size_t)sh.local, sizeof(int));
    uint16_t *v = epref_zalloc((size_t)hidden, sizeof(uint16_t));
    if (!stamp || !v)
        st = epref_fail(EPREF_NO_MEMORY, "ll_dispatch: out of memory");
    else
        st = alloc_ll_result(&r, &sh);
    if (st == EPREF_OK) {
        for (int s = 0; s < num_ranks; s++)
            receive_from(&r, &in[s], s, &sh, stamp, v);
        *out = r;
    }
    free(stamp);
    free(v);
    return st;
}

void epref_ll_dispatch_result_free(epref_ll_dispatch_result_t *r) {
    if (r == NULL)
        return;
    free(r->recv_count);
    free(r->x);
    free(r->scales);
    free(r->src_info);
    free(r->layout_range);
    memset(r, 0, sizeof(*r));
}
