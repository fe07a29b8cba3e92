/* The LogFMT arithmetic the kernels use (src/kernels/logfmt_math.h) against the reference (ref/logfmt.c):
 * the division-free index exhaustively over every (t, d) it can meet, also with the reciprocal off by one
 * float step either way; the 32-bit level bits exhaustively over every (index, d) against the reference's 64-bit
 * formula; and whole groups encoded and decoded the way logfmt.cuh does (range, raw or log,
 * sign), bit for bit equal to epref_logfmt_roundtrip. */
#include "epref.h"
#include "kernels/logfmt_math.h"
#include "tcheck.h"

#include <math.h>
#include <string.h>

static void index_is_exact_for_every_t_and_d(void) {
    long bad = 0;
    for (int d = 1; d <= EP_LOGFMT_CLIP_STEPS; d++) {
        /* The kernel's 1 / (2 d) is __fdividef's (within 2 ulp): every estimate within 2 ulp must give the
         * exact index. */
        const float inv = 1.0f / (float)(2 * d), dn = nextafterf(inv, 0.0f), up = nextafterf(inv, 1.0f);
        const float invs[5] = {inv, dn, up, nextafterf(dn, 0.0f), nextafterf(up, 1.0f)};
        for (int t = 0; t <= d; t++) {
            const uint32_t want = 1u + (uint32_t)((2 * EP_LOGFMT_LEVELS * t + d) / (2 * d));
            for (int i = 0; i < 5; i++)
                if (ep_logfmt_index(t, d, invs[i]) != want && bad++ < 5)
                    TCHECK(0, "d=%d t=%d inv #%d: index %u, want %u", d, t, i, ep_logfmt_index(t, d, invs[i]), want);
        }
    }
    TCHECK_EQ_INT(bad, 0);
}

static void level_bits_match_the_64_bit_formula(void) {
    long bad = 0;
    for (uint32_t d = 1; d <= EP_LOGFMT_CLIP_STEPS; d++)
        for (uint32_t index = 1; index <= EP_LOGFMT_LEVELS; index++) {
            const uint32_t lo = 0x3f7f - d; /* any lo: it only adds lo << 16 */
            const uint32_t want = (lo << 16) + (uint32_t)(((uint64_t)(index - 1u) * d * 32768u + 127u) / 255u);
            if (ep_logfmt_level_bits(index, lo, d) != want && bad++ < 5)
                TCHECK(0, "d=%u index=%u: %#x, want %#x", d, index, ep_logfmt_level_bits(index, lo, d), want);
        }
    TCHECK_EQ_INT(bad, 0);
}

/* What logfmt.cuh does for one group of 128, on the host (one loop instead of 32 lanes and shuffles). */
static void kernel_roundtrip(const uint16_t *x, float *out) {
    int hi = 0, lo = 0x8000;
    for (int j = 0; j < 128; j++) {
        int m = x[j] & 0x7fff;
        hi = m > hi ? m : hi;
        if (m != 0 && m < lo)
            lo = m;
    }
    if (lo < hi - EP_LOGFMT_CLIP_STEPS)
        lo = hi - EP_LOGFMT_CLIP_STEPS;
    if (!(hi < EP_LOGFMT_ONE_BITS && lo < hi)) {
        for (int j = 0; j < 128; j++)
            out[j] = epref_bf16_to_float(x[j]);
        return;
    }
    const int d = hi - lo;
    const float inv_2d = 1.0f / (float)(2 * d);
    for (int j = 0; j < 128; j++) {
        const int t = (x[j] & 0x7fff) - lo;
        const uint32_t index = t < 0 ? 0u : ep_logfmt_index(t, d, inv_2d);
        uint32_t bits = index != 0 ? ep_logfmt_level_bits(index, (uint32_t)lo, (uint32_t)d) : 0u;
        bits |= (uint32_t)(x[j] >> 15) << 31;
        memcpy(&out[j], &bits, 4);
    }
}

static void groups_match_the_reference(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 11, 0);
    uint16_t x[128];
    float got[128], want[128];
    int mismatches = 0, log_groups = 0;
    for (int g = 0; g < 20000; g++) {
        const float scale = ldexpf(1.0f, (int)(epref_rng_next(&rng) % 40) - 36); /* raw and log groups */
        const int spread = (int)(epref_rng_next(&rng) % 4);
        for (int j = 0; j < 128; j++) {
            float v = epref_rng_normal(&rng) * scale;
            if (spread == 1 && j % 7 == 0)
                v *= 1e-12f; /* below amax / 2^32: flushed to zero */
            if (spread == 2 && j % 5 == 0)
                v = 0.0f;
            if (spread == 3)
                v = j == 0 ? scale : scale * 0.5f; /* two distinct magnitudes */
            x[j] = epref_float_to_bf16(v);
        }
        kernel_roundtrip(x, got);
        log_groups += epref_logfmt_roundtrip(x, 128, want);
        for (int j = 0; j < 128; j++)
            if (memcmp(&got[j], &want[j], 4) != 0 && mismatches++ < 5)
                TCHECK(0, "group %d element %d: %a, reference %a", g, j, (double)got[j], (double)want[j]);
    }
    TCHECK_EQ_INT(mismatches, 0);
    TCHECK(log_groups > 10000 && log_groups < 20000, "%d of 20000 groups in log format: both kinds must occur",
           log_groups);
}

int main(void) {
    TRUN(index_is_exact_for_every_t_and_d);
    TRUN(level_bits_match_the_64_bit_formula);
    TRUN(groups_match_the_reference);
    return TDONE();
}
