/* The buffer layouts that host code and kernels share (dev_group.h's control region, ht_layout.h, ll_layout.h)
 * and the public size hints: a buffer of the hinted size holds what it promises, and no two arrays of a region
 * overlap. */
#include "epcomm.h"
#include "kernels/dev_group.h"
#include "kernels/ht_layout.h"
#include "kernels/ll_layout.h"
#include "tcheck.h"

typedef struct {
    uint64_t begin, end;
} span_t;

static int spans_disjoint_and_inside(const span_t *s, int n, uint64_t limit) {
    for (int i = 0; i < n; i++) {
        if (s[i].end > limit || s[i].begin > s[i].end)
            return 0;
        for (int j = i + 1; j < n; j++)
            if (s[i].begin < s[j].end && s[j].begin < s[i].end && s[i].begin != s[i].end && s[j].begin != s[j].end)
                return 0;
    }
    return 1;
}

static void normal_hint_holds_every_row(void) {
    const int ranks[] = {2, 3, 4, 5, 8}, tokens[] = {1, 777, 4096}, hiddens[] = {128, 7168, 16384},
              topks[] = {1, 8, 32};
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 3; c++)
                for (int d = 0; d < 3; d++)
                    for (int fp8 = 0; fp8 < 2; fp8++) {
                        int R = ranks[a], N = tokens[b], H = hiddens[c], K = topks[d], S = fp8 ? H / 128 : 0;
                        size_t bytes = ep_normal_buffer_bytes(R, N, H, fp8 ? 1 : 2, S, K);
                        ep_ht_dispatch_region_t dr =
                            ep_ht_dispatch_region(bytes, (uint64_t)H * (fp8 ? 1 : 2), (uint64_t)S * 4, (uint64_t)K);
                        ep_ht_combine_region_t cr = ep_ht_combine_region(bytes, (uint64_t)H * 2, (uint64_t)K);
                        TCHECK(dr.rows >= (uint64_t)R * N, "R=%d N=%d H=%d K=%d: dispatch holds %llu rows", R, N, H, K,
                               (unsigned long long)dr.rows);
                        TCHECK(cr.rows >= (uint64_t)R * N, "R=%d N=%d H=%d K=%d: combine holds %llu rows", R, N, H, K,
                               (unsigned long long)cr.rows);
                        span_t s[5] = {{dr.x_off, dr.x_off + dr.rows * dr.x_row_bytes},
                                       {dr.scales_off, dr.scales_off + dr.rows * dr.scale_row_bytes},
                                       {dr.idx_off, dr.idx_off + dr.rows * K * 8},
                                       {dr.weights_off, dr.weights_off + dr.rows * K * 4},
                                       {dr.src_off, dr.src_off + dr.rows * 4}};
                        TCHECK(spans_disjoint_and_inside(s, 5, dr.quarter_bytes), "dispatch arrays overlap (R=%d)", R);
                        TCHECK(dr.idx_off % 16 == 0 && dr.weights_off % 16 == 0 && dr.src_off % 16 == 0,
                               "dispatch arrays not 16-byte aligned");
                        TCHECK(ep_ht_combine_base(bytes, 1) + cr.quarter_bytes <= bytes, "combine half past the end");
                    }
}

static void low_latency_hint_holds_every_slot(void) {
    const int ranks[] = {2, 4, 8}, tokens[] = {1, 128, 1024}, hiddens[] = {128, 7168}, topks[] = {1, 8, 16};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 2; c++)
                for (int d = 0; d < 3; d++) {
                    int R = ranks[a], T = tokens[b], H = hiddens[c], K = topks[d], E = 32 * R, L = E / R;
                    size_t bytes = ep_low_latency_buffer_bytes(R, T, H, K, E);
                    ep_ll_layout_t l = ep_ll_layout(R, T, H, K, L);
                    TCHECK(bytes == 2 * l.half_bytes, "hint %zu != two halves %llu", bytes,
                           (unsigned long long)(2 * l.half_bytes));
                    TCHECK(l.scales_off + (uint64_t)H / 128 * 4 <= l.slot_bytes, "FP8 scales overflow the slot");
                    TCHECK(l.data_off + 2 * (uint64_t)H <= l.slot_bytes, "bf16 row overflows the slot");
                    TCHECK(2 * (uint64_t)H + 4 * (uint64_t)(H / 128) <= l.comb_row_bytes && l.comb_row_bytes % 16 == 0,
                           "combine row (payload + LogFMT words) overflows or is unaligned");
                    span_t s[8] = {{l.dispatch_off, l.dispatch_off + (uint64_t)R * T * l.slot_bytes},
                                   {l.combine_off, l.combine_off + (uint64_t)T * K * l.comb_row_bytes},
                                   {l.count_off, l.count_off + (uint64_t)L * 4},
                                   {l.srck_off, l.srck_off + (uint64_t)L * R * T * 4},
                                   {l.range_off, l.range_off + (uint64_t)L * R * 8},
                                   {l.rowk_off, l.rowk_off + (uint64_t)R * T * K * 4},
                                   {l.heads_off, l.heads_off + (uint64_t)R * T * EP_LL_HEADER_BYTES},
                                   {l.weights_off, l.weights_off + (uint64_t)R * T * K * 4}};
                    TCHECK(spans_disjoint_and_inside(s, 8, l.half_bytes), "low-latency arrays overlap (R=%d T=%d)", R,
                           T);
                    TCHECK(l.rowk_off % 16 == 0 && l.heads_off % 16 == 0 && l.weights_off % 16 == 0,
                           "per-rank combine arrays not aligned");
                    TCHECK(l.slot_bytes % 16 == 0 && l.combine_off % 16 == 0, "low-latency arrays not aligned");
                }
}

/* A stale slot must never pass for one written in this call: the receiver's bookkeeping left there under
 * another layout is small non-negative integers, and another layout's tag differs. */
static void low_latency_tags_are_distinct(void) {
    TCHECK_EQ_INT((int)sizeof(ep_ll_header_t), EP_LL_HEADER_BYTES);
    const int shapes[][5] = {{4, 128, 7168, 8, 256}, {4, 32, 2048, 6, 64}, {8, 128, 7168, 8, 256}, {4, 1, 7168, 8, 32}};
    for (int i = 0; i < 4; i++) {
        const int *a = shapes[i];
        for (uint32_t epoch = 1; epoch < 64; epoch++) {
            uint64_t tag = ep_ll_tag(epoch, a[0], a[1], a[2], a[3], a[4]);
            TCHECK((uint32_t)tag & 0x80000000u, "tag's low word must have its top bit set");
            TCHECK((uint32_t)(tag >> 32) == epoch, "tag must carry the epoch");
            for (int j = 0; j < i; j++) {
                const int *b = shapes[j];
                TCHECK(tag != ep_ll_tag(epoch, b[0], b[1], b[2], b[3], b[4]), "shapes %d and %d share a tag", i, j);
            }
        }
    }
}

/* Every array of the control region at its largest (8 ranks, EP_MAX_EXPERTS experts, both parities) stays
 * inside the region and apart from the others. */
static void control_region_arrays_are_disjoint(void) {
    const uint64_t R = EP_MAX_NVL_RANKS;
    span_t s[] = {
        {EP_CTRL_BARRIER_FLAGS, EP_CTRL_BARRIER_FLAGS + R * 8},
        {EP_CTRL_DESTROY_FLAGS, EP_CTRL_DESTROY_FLAGS + R * 8},
        {EP_CTRL_HT_COUNTS, EP_CTRL_HT_COUNTS + 2 * R * R * 4},
        {EP_CTRL_HT_EXPERTS, EP_CTRL_HT_EXPERTS + 2 * EP_CTRL_HT_EXPERT_WORDS * 4},
        {EP_CTRL_LL_DISPATCH_FLAGS, EP_CTRL_LL_DISPATCH_FLAGS + 2 * R * 8},
        {EP_CTRL_LL_COMBINE_FLAGS, EP_CTRL_LL_COMBINE_FLAGS + 2 * R * 8},
        {EP_CTRL_HT_COMBINE_CHUNKS, EP_CTRL_HT_COMBINE_CHUNKS + 2 * R * EP_HT_COMBINE_MAX_CHUNKS * 4},
    };
    TCHECK(EP_CTRL_HT_EXPERT_WORDS >= EP_MAX_EXPERTS, "expert counts: %d words per parity for %d experts",
           EP_CTRL_HT_EXPERT_WORDS, EP_MAX_EXPERTS);
    TCHECK(spans_disjoint_and_inside(s, (int)(sizeof(s) / sizeof(s[0])), EP_CTRL_BYTES),
           "control region arrays overlap or leave the %d bytes", EP_CTRL_BYTES);
}

static void size_hints_reject_nonsense(void) {
    TCHECK_EQ_INT(ep_normal_buffer_bytes(0, 10, 128, 2, 0, 8), 0);
    TCHECK_EQ_INT(ep_normal_buffer_bytes(4, -1, 128, 2, 0, 8), 0);
    TCHECK_EQ_INT(ep_low_latency_buffer_bytes(4, 0, 7168, 8, 256), 0);
    TCHECK_EQ_INT(ep_low_latency_buffer_bytes(4, 128, 7168, 8, 2), 0);
}

/* The low-latency flag waits compare 32-bit epochs in wrap-around order. */
static void epochs_compare_across_the_wrap(void) {
    TCHECK(ep_epoch_reached(5, 5), "equal");
    TCHECK(ep_epoch_reached(6, 5), "later");
    TCHECK(!ep_epoch_reached(4, 5), "earlier");
    TCHECK(ep_epoch_reached(0, 0xffffffffu), "the epoch after 2^32 - 1 is 0");
    TCHECK(ep_epoch_reached(1, 0xffffffffu), "two after the wrap");
    TCHECK(!ep_epoch_reached(0xffffffffu, 0), "the last epoch before the wrap has not reached 0");
    TCHECK(!ep_epoch_reached(0xfffffffeu, 1), "three before");
}

int main(void) {
    TRUN(epochs_compare_across_the_wrap);
    TRUN(normal_hint_holds_every_row);
    TRUN(low_latency_hint_holds_every_slot);
    TRUN(low_latency_tags_are_distinct);
    TRUN(control_region_arrays_are_disjoint);
    TRUN(size_hints_reject_nonsense);
    return TDONE();
}
