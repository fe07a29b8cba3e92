/* LogFMT on the GPU: the integer-only format of ref/logfmt.c (read its header comment first), so the values
 * decoded here equal the reference's bit for bit. Wire layout of one 128-channel group inside a combine row:
 * the group's 256 payload bytes hold, for a log group, 128 bytes of index low bytes (element e at byte e)
 * and 32 bytes of 2-bit pairs (element e at byte 128 + e / 4, bits 2 * (e % 4): index bit 8, then the
 * sign); for a raw group the 128 bf16 values. The group's 32-bit word after the payload is lo | hi << 16
 * for a log group and 0 for a raw one (a log group has lo >= 1). */
#ifndef EP_LOGFMT_CUH
#define EP_LOGFMT_CUH

#include "logfmt_math.h"

#include <stdint.h>

/* One warp encodes one group; lane holds elements 4*lane .. 4*lane+3 as `raw` (4 bf16). Writes the payload
 * into `group` (the group's 256 bytes) and returns the group's word (the same on every lane). The whole warp
 * must call it together (the group's amax and amin are warp reductions). */
__device__ __forceinline__ uint32_t ep_logfmt_encode_group(uint2 raw, char *group, int lane) {
    const uint32_t v[4] = {raw.x & 0xffffu, raw.x >> 16, raw.y & 0xffffu, raw.y >> 16};
    uint32_t amax = 0, amin = 0x8000u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t m = v[i] & 0x7fffu;
        amax = max(amax, m);
        amin = min(amin, m != 0 ? m : 0x8000u);
    }
    const int hi = (int)__reduce_max_sync(0xffffffffu, amax); /* one instruction each (sm_80+) */
    int lo = (int)__reduce_min_sync(0xffffffffu, amin);
    lo = max(lo, hi - EP_LOGFMT_CLIP_STEPS);
    if (!(hi < EP_LOGFMT_ONE_BITS && lo < hi)) {
        ((uint2 *)group)[lane] = raw;
        return 0;
    }
    const int d = hi - lo;
    const float inv_2d = __fdividef(1.0f, (float)(2 * d)); /* approximate: ep_logfmt_index corrects its estimate */
    uint32_t low = 0, pairs = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int t = (int)(v[i] & 0x7fffu) - lo; /* below lo (clipped, or zero): index 0 */
        const uint32_t index = ep_logfmt_index(max(t, 0), d, inv_2d) & (t < 0 ? 0u : ~0u); /* no branch */
        low |= (index & 0xffu) << (8 * i);
        pairs |= (((index >> 8) & 1u) | ((v[i] >> 15) << 1)) << (2 * i);
    }
    ((uint32_t *)group)[lane] = low;
    ((uint8_t *)group)[128 + lane] = (uint8_t)pairs;
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

/* The bytes of elements e0 .. e0+7 (e0 % 8 == 0) of a group, fetched with independent loads (both layouts:
 * which one applies is known only from the word) so that the fetches of several rows can be in flight
 * together before any is decoded. */
typedef struct {
    uint4 raw;      /* a raw group's 8 bf16 */
    uint2 low;      /* a log group's 8 index low bytes */
    uint32_t pairs; /* a log group's 8 2-bit pairs */
    uint32_t word;  /* the group's word: 0 for a raw group */
} ep_logfmt_piece_t;

__device__ __forceinline__ ep_logfmt_piece_t ep_logfmt_fetch8(const char *group, uint32_t word, int e0) {
    ep_logfmt_piece_t p;
    p.raw = *(const uint4 *)(group + 2 * e0);
    p.low = *(const uint2 *)(group + e0);
    p.pairs = *(const uint16_t *)(group + 128 + e0 / 4);
    p.word = word;
    return p;
}

/* Decodes a fetched piece to 8 floats. */
__device__ __forceinline__ void ep_logfmt_decode8(const ep_logfmt_piece_t &p, float out[8]) {
    if (p.word == 0) {
        const uint32_t w[4] = {p.raw.x, p.raw.y, p.raw.z, p.raw.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            out[2 * j] = __uint_as_float(w[j] << 16);
            out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
        return;
    }
    const uint32_t lo = p.word & 0xffffu, d = (p.word >> 16) - lo;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const uint32_t b = ((j < 4 ? p.low.x : p.low.y) >> (8 * (j % 4))) & 0xffu;
        const uint32_t pr = (p.pairs >> (2 * j)) & 3u;
        const uint32_t index = b | ((pr & 1u) << 8);
        const uint32_t bits = index != 0 ? ep_logfmt_level_bits(index, lo, d) : 0u;
        out[j] = __uint_as_float(bits | ((pr >> 1) << 31));
    }
}

#endif
