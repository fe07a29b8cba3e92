/* LogFMT: the lossy 10-bit format that low-latency combine may use on the wire (use_logfmt).
 *
 * The format works on the bf16 bit patterns with integer arithmetic only (no log2f/exp2f), so a CUDA kernel
 * reproduces every decoded value bit for bit. The "log" is the piecewise-linear log2 that a float's bits
 * already hold: for a positive finite bf16 with magnitude bits m = bits & 0x7FFF, m / 128 - 127 equals
 * exponent + mantissa fraction, which is log2|x| at powers of two and within 0.086 of it in between
 * (Mitchell's approximation). Equal steps in m are equal steps in this log.
 *
 * One group of n bf16 values (n = 128 in the kernels):
 *   m_j = bits(x_j) & 0x7FFF                   magnitude (sign is bit 15); NaN/Inf have the largest m
 *   hi  = max_j m_j                            amax
 *   lo  = min_j { m_j : m_j != 0 }             amin = the smallest nonzero magnitude
 *   lo  = max(lo, hi - 4096)                   amin clipped at amax / 2^32 (4096 = 32 binades * 128)
 *   Log format iff hi < 0x3F80 (amax < 1, which also excludes Inf and NaN) and lo < hi (two distinct
 *   nonzero magnitudes); otherwise the group travels as raw bf16 and decodes to float(x) exactly.
 *   D = hi - lo, 1 <= D <= 4096.
 * Encode (per element: 1 sign bit + 9-bit index):
 *   t = m - lo
 *   index = 0                                    if t < 0 (x is zero, or |x| < the clipped amin)
 *   index = 1 + floor((1020 * t + D) / (2 * D))  otherwise: 1 + round-half-up(510 * t / D), in 1..511
 *   (all in 32-bit integers: 1020 * 4096 + 4096 < 2^23).
 * Decode:
 *   index 0 -> +-0.0f (the sign bit is kept)
 *   index i -> the float whose bits are (lo << 16) + floor(((i - 1) * D * 32768 + 127) / 255), sign or-ed in.
 *   The offset is round-to-nearest of (i - 1) * D * 65536 / 510 in float32 bit units (no ties: 255 is odd);
 *   it needs 64-bit integers ((i-1) * D * 32768 < 2^37). Index 1 decodes to amin (clipped) and index 511
 *   to amax exactly; the 511 levels are equally spaced in the piecewise-linear log between them.
 * The kernel sends hi and lo (two bf16 patterns) with each group so the receiver can decode.
 *
 * Rounding happens in the log domain; within one binade the piecewise-linear log is linear, so there it is
 * round-to-nearest in value too.
 *
 * Error bound. The index rounding moves t by at most D/1020 bf16 steps and the decode offset by at most half
 * a float32 step, so in binade units (2^23 float32 steps) |log(q) - log(x)| <= delta with
 *     delta = (D / 1020 + 2^-17) / 128         (<= 0.031373 at the widest range, D = 4096).
 * Since the value's slope against this log is 2^exponent <= |value|, for every normal x (|x| >= 2^-126)
 * that is not flushed to zero:  |q - x| <= eps * |x|  with  eps = delta / (1 - delta)  (<= 0.03239).
 * For subnormal x: |q - x| <= delta * 2^-126. Flushed to zero: exactly the zeros and the elements with
 * t < 0, i.e. m < hi - 4096, which is |x| < amax / 2^32 whenever amax / 2^32 is a normal float (a group with
 * amax < 2^-94 never clips). Raw groups are exact. epref_logfmt_error_bound() returns eps(D) for a group
 * (0 for a raw one); EPREF_LOGFMT_MAX_REL_ERROR is the bound over all groups.
 *
 * For the kernel: the encode division is by the per-group D (integer division, or a reciprocal that is
 * checked and corrected by one step); the decode division is by the constant 255, which compilers turn into
 * a multiply-high. Nothing depends on float rounding, so the decoded floats match this file bit for bit.
 */
#include "internal.h"

#include <string.h>

#define LOGFMT_CLIP_STEPS 4096   /* 32 binades of 128 bf16 steps: amin >= amax / 2^32 */
#define LOGFMT_ONE_BITS   0x3F80 /* bf16 1.0: groups with amax >= 1 stay raw */
#define LOGFMT_LEVELS     510    /* index 1..511 spans 510 steps between amin and amax */

typedef struct {
    int lo, hi; /* magnitude bits of the clipped amin and of amax */
} logfmt_range_t;

/* Returns 1 and the range if the group qualifies for log format, 0 if it stays raw bf16. */
static int logfmt_range(const uint16_t *x, int n, logfmt_range_t *r) {
    int hi = 0, lo = 0x7FFF + 1; /* lo stays above any magnitude if every element is zero */
    for (int j = 0; j < n; j++) {
        int m = x[j] & 0x7FFF;
        if (m > hi)
            hi = m;
        if (m != 0 && m < lo)
            lo = m;
    }
    if (lo < hi - LOGFMT_CLIP_STEPS)
        lo = hi - LOGFMT_CLIP_STEPS;
    r->lo = lo;
    r->hi = hi;
    return hi < LOGFMT_ONE_BITS && lo < hi;
}

/* The 9-bit index of one magnitude (0 = zero). */
static unsigned logfmt_index(int m, const logfmt_range_t *r) {
    int t = m - r->lo, d = r->hi - r->lo;
    if (t < 0)
        return 0;
    return 1u + (unsigned)((2 * LOGFMT_LEVELS * t + d) / (2 * d));
}

/* The float32 bits of a nonzero index's magnitude. */
static uint32_t logfmt_level_bits(unsigned index, const logfmt_range_t *r) {
    uint64_t d = (uint64_t)(r->hi - r->lo);
    uint64_t offset = ((uint64_t)(index - 1u) * d * 32768u + 127u) / 255u;
    return ((uint32_t)r->lo << 16) + (uint32_t)offset;
}

static float logfmt_decode(unsigned index, unsigned sign, const logfmt_range_t *r) {
    uint32_t bits = index == 0 ? 0u : logfmt_level_bits(index, r);
    bits |= sign << 31;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

int epref_logfmt_roundtrip(const uint16_t *x, int n, float *out) {
    logfmt_range_t r;
    if (n <= 0)
        return 0;
    if (!logfmt_range(x, n, &r)) {
        for (int j = 0; j < n; j++)
            out[j] = epref_bf16_to_float(x[j]);
        return 0;
    }
    for (int j = 0; j < n; j++) {
        unsigned index = logfmt_index(x[j] & 0x7FFF, &r);
        out[j] = logfmt_decode(index, (unsigned)(x[j] >> 15), &r);
    }
    return 1;
}

double epref_logfmt_error_bound(const uint16_t *x, int n) {
    logfmt_range_t r;
    if (n <= 0 || !logfmt_range(x, n, &r))
        return 0.0;
    double delta = ((double)(r.hi - r.lo) / (2.0 * LOGFMT_LEVELS) + 1.0 / 131072.0) / 128.0;
    return delta / (1.0 - delta);
}
