/* Where the low-latency mode keeps things in the symmetric data buffer (host and device agree through this
 * header). Two halves by parity, so that two dispatch results can be alive at once. Each half holds:
 *  - the dispatch staging: [R sources][T slots], one slot per source token that has an expert here: a 64-byte
 *    header (tag, token, the token's local expert ids by k) then the row (bf16, or e4m3 + float scales);
 *  - the combine staging: [T tokens][K] rows, one per (token, k), written by the expert's rank: 2H bytes of
 *    payload (bf16, or per 128-channel group the LogFMT bytes), then one 32-bit LogFMT word per group.
 *    Combines take turns between the halves on their own count, not their dispatch's half, so that two
 *    combines of one handle can be alive at once;
 *  - local bookkeeping of the receive (never read by peers): per local expert the count, the (source token,
 *    k) of each row and the per-source ranges, which the combine reuses; and, for the per-rank combine
 *    (EPCOMM_LL_COMBINE_PER_RANK), per (source, token, k) the row of the local expert the token names at k (set
 *    for the first k naming each expert) and per (source, token) a copy of the slot's header (the token's local
 *    experts by k; copied because a peer's later dispatch may rewrite the slot while a hooked combine runs);
 *  - the per-rank combine's weights: [R sources][T][K] float, written by each source at the start of its
 *    combine (combine half, like the staging rows). */
#ifndef EP_LL_LAYOUT_H
#define EP_LL_LAYOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define EP_LL_HD __host__ __device__ __forceinline__
#else
#define EP_LL_HD static inline
#endif

#define EP_LL_MAX_TOPK     16
#define EP_LL_HEADER_BYTES 64

/* A slot counts as written in this call only if its tag is ep_ll_tag(epoch, signature). Slots not written in
 * this call hold whatever an earlier call left there, possibly under another layout (other T, H, K, E), where
 * this position held row data or the receiver's bookkeeping (small non-negative integers). The signature has
 * its top bit set, so no such integer matches it, and 64 bits make a match by row data negligible. */
typedef struct {
    uint64_t tag;
    int32_t token;
    int16_t local_ids[EP_LL_MAX_TOPK]; /* by k: the local expert id here, or -1 */
    uint8_t pad[EP_LL_HEADER_BYTES - 12 - 2 * EP_LL_MAX_TOPK];
} ep_ll_header_t;

EP_LL_HD uint64_t ep_ll_tag(uint32_t epoch, int num_ranks, int max_tokens, int hidden, int topk, int num_experts) {
    uint64_t h = 0x9e3779b97f4a7c15ull;
    const uint64_t v[5] = {(uint64_t)num_ranks, (uint64_t)max_tokens, (uint64_t)hidden, (uint64_t)topk,
                           (uint64_t)num_experts};
    for (int i = 0; i < 5; i++) {
        h ^= v[i] + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
        h *= 0xbf58476d1ce4e5b9ull;
    }
    return ((uint64_t)epoch << 32) | (uint32_t)(h >> 32) | 0x80000000u;
}

/* A low-latency call's (T, H, K, E) and row format in one word, which each source sends with its dispatch so that
 * a receiver can tell a peer that called otherwise (its rows would sit at other offsets, or in another format):
 * T - 1 in bits 0-15, H / 128 - 1 in 16-24, K in 25-29, E in 30-42 (T <= 65536, H <= 65536 and a multiple of 128,
 * K <= 31, E <= 8191), then the format: bit 43 FP8, 44 round_scale, 45 UE8M0 (the last two only with FP8). */
#define EP_LL_FMT_FP8         1
#define EP_LL_FMT_ROUND_SCALE 2
#define EP_LL_FMT_UE8M0       4
EP_LL_HD uint64_t ep_ll_pack_layout(int max_tokens, int hidden, int topk, int num_experts, int format) {
    return (uint64_t)(max_tokens - 1) | (uint64_t)(hidden / 128 - 1) << 16 | (uint64_t)topk << 25 |
           (uint64_t)num_experts << 30 | (uint64_t)(format & 7) << 43;
}

/* The format bits of a dispatch: FP8, and its scale options only with FP8. */
EP_LL_HD int ep_ll_format(int use_fp8, int round_scale, int use_ue8m0) {
    return use_fp8 ? EP_LL_FMT_FP8 | (round_scale ? EP_LL_FMT_ROUND_SCALE : 0) | (use_ue8m0 ? EP_LL_FMT_UE8M0 : 0) : 0;
}

EP_LL_HD void ep_ll_unpack_layout(uint64_t w, int *max_tokens, int *hidden, int *topk, int *num_experts,
                                  int *format) {
    *max_tokens = (int)(w & 0xffff) + 1;
    *hidden = ((int)(w >> 16 & 0x1ff) + 1) * 128;
    *topk = (int)(w >> 25 & 0x1f);
    *num_experts = (int)(w >> 30 & 0x1fff);
    *format = (int)(w >> 43 & 7);
}

typedef struct {
    uint64_t slot_bytes, data_off, scales_off;                          /* within a slot */
    uint64_t comb_row_bytes;                                            /* a combine staging row */
    uint64_t dispatch_off, combine_off, count_off, srck_off, range_off; /* within a half */
    uint64_t rowk_off, heads_off, weights_off;                          /* within a half (per-rank combine) */
    uint64_t half_bytes;
} ep_ll_layout_t;

EP_LL_HD uint64_t ep_ll_align(uint64_t v, uint64_t a) {
    return (v + a - 1) / a * a;
}

/* A slot holds a bf16 row, or an e4m3 row followed by its float scales (H + H/32 <= 2H bytes). */
EP_LL_HD ep_ll_layout_t ep_ll_layout(int num_ranks, int max_tokens, int hidden, int topk, int num_local_experts) {
    ep_ll_layout_t l;
    uint64_t R = (uint64_t)num_ranks, T = (uint64_t)max_tokens, H = (uint64_t)hidden, L = (uint64_t)num_local_experts;
    l.data_off = EP_LL_HEADER_BYTES;
    l.scales_off = l.data_off + H;
    l.slot_bytes = ep_ll_align(l.data_off + 2 * H, 16);
    l.comb_row_bytes = ep_ll_align(2 * H + 4 * (H / 128), 16);
    l.dispatch_off = 0;
    l.combine_off = ep_ll_align(R * T * l.slot_bytes, 4096);
    l.count_off = ep_ll_align(l.combine_off + T * (uint64_t)topk * l.comb_row_bytes, 4096);
    l.srck_off = ep_ll_align(l.count_off + L * 4, 16);
    l.range_off = ep_ll_align(l.srck_off + L * R * T * 4, 16);
    l.rowk_off = ep_ll_align(l.range_off + L * R * 8, 16);
    l.heads_off = ep_ll_align(l.rowk_off + R * T * (uint64_t)topk * 4, 16);
    l.weights_off = ep_ll_align(l.heads_off + R * T * EP_LL_HEADER_BYTES, 16);
    l.half_bytes = ep_ll_align(l.weights_off + R * T * (uint64_t)topk * 4, 4096);
    return l;
}

#endif
