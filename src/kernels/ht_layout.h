/* Where the high-throughput mode keeps things in the symmetric data buffer. Plain C, used by host code and
 * kernels alike so both compute the same offsets.
 *
 * The data buffer (after the control region) is split in four equal quarters: dispatch receive regions for
 * even and odd dispatches, and combine receive regions for even and odd combines. Alternating lets a fast
 * rank start the next op while a slow one still reads the previous op's data: a rank can be at most one op
 * ahead, because every op ends with a barrier.
 *
 * A dispatch region holds, for up to `rows` received tokens: x rows, scale rows, local topk ids (int64),
 * topk weights (float) and source token indices (int32), each array 16-byte aligned. A combine region holds
 * rows of bf16 and topk weights. */
#ifndef EP_HT_LAYOUT_H
#define EP_HT_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define EP_HD __host__ __device__ __forceinline__
#else
#define EP_HD static inline
#endif

typedef struct {
    uint64_t quarter_bytes; /* bytes of one region */
    uint64_t x_row_bytes, scale_row_bytes, topk;
    uint64_t rows;                                             /* capacity in rows */
    uint64_t x_off, scales_off, idx_off, weights_off, src_off; /* from the region start */
} ep_ht_dispatch_region_t;

typedef struct {
    uint64_t quarter_bytes;
    uint64_t row_bytes, topk;
    uint64_t rows;
    uint64_t x_off, weights_off;
} ep_ht_combine_region_t;

EP_HD uint64_t ep_align16(uint64_t v) {
    return (v + 15) & ~(uint64_t)15;
}

EP_HD uint64_t ep_ht_quarter_bytes(uint64_t data_bytes) {
    return (data_bytes / 4) & ~(uint64_t)4095;
}

EP_HD ep_ht_dispatch_region_t ep_ht_dispatch_region(uint64_t data_bytes, uint64_t x_row_bytes, uint64_t scale_row_bytes,
                                                    uint64_t topk) {
    ep_ht_dispatch_region_t r;
    r.quarter_bytes = ep_ht_quarter_bytes(data_bytes);
    r.x_row_bytes = x_row_bytes;
    r.scale_row_bytes = scale_row_bytes;
    r.topk = topk;
    uint64_t per_row = x_row_bytes + scale_row_bytes + topk * 12 + 4;
    /* 80 bytes of slack for the five 16-byte alignments. */
    r.rows = r.quarter_bytes > 80 ? (r.quarter_bytes - 80) / per_row : 0;
    r.x_off = 0;
    r.scales_off = ep_align16(r.x_off + r.rows * x_row_bytes);
    r.idx_off = ep_align16(r.scales_off + r.rows * scale_row_bytes);
    r.weights_off = ep_align16(r.idx_off + r.rows * topk * 8);
    r.src_off = ep_align16(r.weights_off + r.rows * topk * 4);
    return r;
}

/* Offset of dispatch region `parity` (0/1) from the data buffer start. */
EP_HD uint64_t ep_ht_dispatch_base(uint64_t data_bytes, int parity) {
    return (uint64_t)parity * ep_ht_quarter_bytes(data_bytes);
}

EP_HD ep_ht_combine_region_t ep_ht_combine_region(uint64_t data_bytes, uint64_t row_bytes, uint64_t topk) {
    ep_ht_combine_region_t r;
    r.quarter_bytes = ep_ht_quarter_bytes(data_bytes);
    r.row_bytes = row_bytes;
    r.topk = topk;
    uint64_t per_row = row_bytes + topk * 4;
    r.rows = r.quarter_bytes > 32 ? (r.quarter_bytes - 32) / per_row : 0;
    r.x_off = 0;
    r.weights_off = ep_align16(r.rows * row_bytes);
    return r;
}

EP_HD uint64_t ep_ht_combine_base(uint64_t data_bytes, int parity) {
    return (uint64_t)(2 + parity) * ep_ht_quarter_bytes(data_bytes);
}

#define EP_HT_MAX_HIDDEN (1 << 24) /* hidden sizes below it: the call word holds 24 bits of it */

/* What a dispatch must agree on across ranks (a rank that called with other sizes would write its rows at other
 * offsets, or with other fields). */
typedef struct {
    int64_t hidden;
    int fp8;         /* x is float8_e4m3fn (else bfloat16) */
    int num_scales;  /* FP8 scales per token */
    int int_scales;  /* the scales are int32 words (packed UE8M0), else float32 */
    int topk;        /* 0: no topk_idx sent */
    int weights;     /* topk_weights sent */
    int num_experts;
} ep_ht_call_t;

/* A dispatch's call in one word, which the count exchange compares across ranks: hidden in bits 0-23, FP8 in
 * 24, scales per token in 25-37, topk in 38-43, experts in 44-56, weights in 57, int32 scales in 58 (62 and 63
 * are the EP_HT_SEND_* tags). */
EP_HD uint64_t ep_ht_pack_call(const ep_ht_call_t *c) {
    return ((uint64_t)c->hidden & 0xffffff) | (uint64_t)(c->fp8 != 0) << 24 |
           ((uint64_t)c->num_scales & 0x1fff) << 25 | ((uint64_t)c->topk & 0x3f) << 38 |
           ((uint64_t)c->num_experts & 0x1fff) << 44 | (uint64_t)(c->weights != 0) << 57 |
           (uint64_t)(c->int_scales != 0) << 58;
}

EP_HD ep_ht_call_t ep_ht_unpack_call(uint64_t w) {
    ep_ht_call_t c;
    c.hidden = (int64_t)(w & 0xffffff);
    c.fp8 = (int)(w >> 24 & 1);
    c.num_scales = (int)(w >> 25 & 0x1fff);
    c.topk = (int)(w >> 38 & 0x3f);
    c.num_experts = (int)(w >> 44 & 0x1fff);
    c.weights = (int)(w >> 57 & 1);
    c.int_scales = (int)(w >> 58 & 1);
    return c;
}

/* The word the closing barrier of a cached dispatch or a combine compares across ranks (neither has a count
 * exchange before its send): a tag for the op in bit 63 (dispatch) or 62 (combine), then for a cached
 * dispatch its ep_ht_pack_call word, for a combine the hidden size in bits 0-23 and in bit 24 whether topk
 * weights are combined. 0: a barrier that compares nothing (those of a dispatch with a count exchange, which
 * compared the call already). The rows already went out when a difference is seen; it is reported, and the call's results are
 * not valid. */
#define EP_HT_SEND_DISPATCH (1ull << 63)
#define EP_HT_SEND_COMBINE  (1ull << 62)
/* A barrier that belongs to no op's send (the group barrier, the mode switch) leaves its stage under bit 61, so
 * that ranks at different barriers (out of step: one made a call the others did not) are told so. */
#define EP_BARRIER_PLAIN (1ull << 61)
EP_HD uint64_t ep_plain_barrier_word(int stage) {
    return EP_BARRIER_PLAIN | (uint64_t)stage;
}
EP_HD uint64_t ep_ht_combine_word(int64_t hidden, int weights) {
    return EP_HT_SEND_COMBINE | ((uint64_t)hidden & 0xffffff) | (uint64_t)(weights != 0) << 24;
}

#endif
