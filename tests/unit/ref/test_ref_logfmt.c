/* LogFMT (ref/logfmt.c): when a group is encoded or kept raw, exact endpoints, zeros and signs, what is
 * flushed, bit-exact agreement with the documented formulas, monotonicity, and the error bound. */
#include "reftest.h"

#define G 128

static int roundtrip(const uint16_t *x, float *out) {
    return epref_logfmt_roundtrip(x, G, out);
}

static void fill_const(uint16_t *x, float v) {
    for (int i = 0; i < G; i++)
        x[i] = epref_float_to_bf16(v);
}

static void check_raw(const uint16_t *x, const char *what) {
    float out[G];
    TCHECK(roundtrip(x, out) == 0, "%s: the group should stay raw bf16", what);
    for (int i = 0; i < G; i++) {
        float want = epref_bf16_to_float(x[i]);
        int same = isnan(want) ? isnan(out[i]) : test_float_bits(out[i]) == test_float_bits(want);
        if (!same) {
            TCHECK(same, "%s: element %d is %a, expected %a", what, i, (double)out[i], (double)want);
            return;
        }
    }
}

static void logfmt_keeps_groups_with_amax_at_least_1_raw(void) {
    uint16_t x[G];
    fill_const(x, 0.25f);
    x[7] = epref_float_to_bf16(1.0f);
    check_raw(x, "amax = 1");
    x[7] = epref_float_to_bf16(-3.0f);
    check_raw(x, "amax = 3 (negative)");
    x[7] = 0x3F7F; /* the largest bf16 below 1: log format */
    float out[G];
    TCHECK(roundtrip(x, out) == 1, "amax just below 1 should use log format");
}

static void logfmt_keeps_zero_and_single_magnitude_groups_raw(void) {
    uint16_t x[G];
    fill_const(x, 0.0f);
    check_raw(x, "all zero");
    x[3] = epref_float_to_bf16(0.5f);
    check_raw(x, "one nonzero magnitude (amin == amax)");
    x[9] = epref_float_to_bf16(-0.5f);
    check_raw(x, "+-0.5 only (amin == amax)");
    x[10] = epref_float_to_bf16(0.25f);
    float out[G];
    TCHECK(roundtrip(x, out) == 1, "two magnitudes should use log format");
}

static void logfmt_keeps_groups_with_nan_or_inf_raw(void) {
    uint16_t x[G];
    for (int i = 0; i < G; i++)
        x[i] = epref_float_to_bf16(0.01f * (float)(i + 1) / G);
    x[4] = 0x7FC0;
    check_raw(x, "a NaN");
    x[4] = 0xFF80;
    check_raw(x, "a -Inf");
}

static void logfmt_decodes_amax_and_amin_exactly_and_keeps_zeros_and_signs(void) {
    uint16_t x[G];
    float out[G];
    epref_rng_t rng;
    epref_rng_seed(&rng, 31, 0);
    for (int i = 0; i < G; i++)
        x[i] = epref_float_to_bf16(epref_rng_normal(&rng) * 0.05f);
    x[0] = epref_float_to_bf16(-0.75f); /* amax, negative */
    x[1] = epref_float_to_bf16(1e-4f);  /* amin */
    x[2] = 0x0000;
    x[3] = 0x8000; /* -0 */
    TCHECK(roundtrip(x, out) == 1, "group should use log format");
    TCHECK(out[0] == epref_bf16_to_float(x[0]), "amax decodes to %a, expected %a", (double)out[0],
           (double)epref_bf16_to_float(x[0]));
    TCHECK(out[1] == epref_bf16_to_float(x[1]), "amin decodes to %a, expected %a", (double)out[1],
           (double)epref_bf16_to_float(x[1]));
    TCHECK(out[2] == 0.0f && !signbit(out[2]), "+0 decodes to %a", (double)out[2]);
    TCHECK(out[3] == 0.0f && signbit(out[3]), "-0 decodes to %a", (double)out[3]);
    for (int i = 0; i < G; i++)
        TCHECK(signbit(out[i]) == signbit(epref_bf16_to_float(x[i])), "element %d: sign of %a vs %a", i, (double)out[i],
               (double)epref_bf16_to_float(x[i]));
}

static void logfmt_flushes_only_values_below_amax_over_2_pow_32(void) {
    uint16_t x[G];
    float out[G];
    fill_const(x, 0.0f);
    x[0] = epref_float_to_bf16(0.5f);
    x[1] = epref_float_to_bf16(0x1p-33f);                 /* exactly amax / 2^32: the clipped amin, kept */
    x[2] = epref_float_to_bf16(-0x1p-34f);                /* below: flushed to -0 */
    x[3] = (uint16_t)(epref_float_to_bf16(0x1p-33f) - 1); /* one bf16 step below amax / 2^32: flushed */
    x[4] = 0x0001;                                        /* the smallest subnormal: flushed */
    TCHECK(roundtrip(x, out) == 1, "group should use log format");
    TCHECK(out[1] == 0x1p-33f, "amax / 2^32 decodes to %a", (double)out[1]);
    TCHECK(out[2] == 0.0f && signbit(out[2]), "-2^-34 decodes to %a, expected -0", (double)out[2]);
    TCHECK(out[3] == 0.0f, "just below amax / 2^32 decodes to %a, expected 0", (double)out[3]);
    TCHECK(out[4] == 0.0f, "subnormal decodes to %a, expected 0", (double)out[4]);
    /* without clipping (amin >= amax / 2^32) a subnormal amin is kept exactly */
    fill_const(x, 0.0f);
    x[0] = 0x0080; /* 2^-126 */
    x[1] = 0x0001; /* 2^-133 */
    x[2] = 0x0040;
    TCHECK(roundtrip(x, out) == 1, "subnormal group should use log format");
    TCHECK(out[1] == epref_bf16_to_float(0x0001) && out[0] == 0x1p-126f, "subnormal endpoints: %a %a", (double)out[1],
           (double)out[0]);
}

/* The documented algorithm, evaluated independently in double precision (exact for these sizes). */
static int expected_bits(const uint16_t *x, uint32_t *bits) {
    int hi = 0, lo = 0x8000;
    for (int i = 0; i < G; i++) {
        int m = x[i] & 0x7FFF;
        hi = m > hi ? m : hi;
        lo = (m != 0 && m < lo) ? m : lo;
    }
    lo = lo > hi - 4096 ? lo : hi - 4096;
    if (!(hi < 0x3F80 && lo < hi))
        return 0;
    int d = hi - lo;
    for (int i = 0; i < G; i++) {
        int t = (x[i] & 0x7FFF) - lo;
        uint32_t mag = 0;
        if (t >= 0) {
            double index = 1.0 + floor(510.0 * t / d + 0.5);
            mag = ((uint32_t)lo << 16) + (uint32_t)llround((index - 1.0) * d * 65536.0 / 510.0);
        }
        bits[i] = mag | ((uint32_t)(x[i] >> 15) << 31);
    }
    return 1;
}

/* Random groups of four kinds: normal values, a wide log-uniform spread (clipping, flushing), values near
 * the subnormal range, and a narrow spread. */
static void random_group(uint16_t *x, epref_rng_t *rng, int kind) {
    for (int i = 0; i < G; i++) {
        float v;
        uint64_t u = epref_rng_next(rng);
        float sign = (u & 1) ? -1.0f : 1.0f;
        switch (kind) {
        case 0: v = epref_rng_normal(rng) * 0.02f; break;
        case 1: v = sign * ldexpf(1.0f + epref_rng_uniform(rng), -(int)((u >> 8) % 48) - 1); break;
        case 2: v = sign * ldexpf(1.0f + epref_rng_uniform(rng), -(int)((u >> 8) % 20) - 118); break;
        default: v = sign * (0.5f + 0.1f * epref_rng_uniform(rng)); break;
        }
        x[i] = (u >> 20) % 16 == 0 ? 0 : epref_float_to_bf16(v); /* some zeros */
    }
}

static void logfmt_matches_the_documented_formulas_bit_for_bit(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 32, 0);
    uint16_t x[G];
    float out[G];
    uint32_t want[G];
    for (int trial = 0; trial < 4000; trial++) {
        random_group(x, &rng, trial % 4);
        int enc = expected_bits(x, want);
        TCHECK(roundtrip(x, out) == enc, "trial %d: encoded %d, expected %d", trial, !enc, enc);
        for (int i = 0; enc && i < G; i++)
            if (test_float_bits(out[i]) != want[i]) {
                TCHECK(test_float_bits(out[i]) == want[i], "trial %d element %d (x %a): got %a, expected %a", trial, i,
                       (double)epref_bf16_to_float(x[i]), (double)out[i], (double)test_bits_float(want[i]));
                return;
            }
    }
}

static void logfmt_round_trip_is_within_its_error_bound(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 33, 0);
    uint16_t x[G];
    float out[G];
    double worst = 0.0;
    for (int trial = 0; trial < 8000; trial++) {
        random_group(x, &rng, trial % 4);
        double eps = epref_logfmt_error_bound(x, G);
        TCHECK(eps <= EPREF_LOGFMT_MAX_REL_ERROR, "trial %d: group bound %g above the global %g", trial, eps,
               EPREF_LOGFMT_MAX_REL_ERROR);
        if (!roundtrip(x, out))
            continue;
        int amax_bits = 0;
        for (int i = 0; i < G; i++)
            amax_bits = (x[i] & 0x7FFF) > amax_bits ? (x[i] & 0x7FFF) : amax_bits;
        double delta = eps / (1.0 + eps);
        for (int i = 0; i < G; i++) {
            double v = (double)epref_bf16_to_float(x[i]), q = (double)out[i], err = fabs(q - v);
            int ok;
            if (v != 0.0 && q == 0.0) /* flushed: only below amax / 2^32 */
                ok = (x[i] & 0x7FFF) < amax_bits - 4096;
            else if (fabs(v) >= 0x1p-126)
                ok = err <= eps * fabs(v);
            else
                ok = err <= delta * 0x1p-126;
            if (!ok) {
                TCHECK(ok, "trial %d element %d: x %a decodes to %a (error %g, bound %g)", trial, i, v, q,
                       v ? err / fabs(v) : err, eps);
                return;
            }
            if (fabs(v) >= 0x1p-126 && q != 0.0)
                worst = fmax(worst, err / fabs(v));
        }
    }
    /* the bound is not vacuous: wide groups come close to it */
    TCHECK(worst > 0.9 * 0.03137 && worst <= EPREF_LOGFMT_MAX_REL_ERROR, "worst relative error %g", worst);
    printf("     worst relative error seen: %.5f (bound %.4f)\n", worst, EPREF_LOGFMT_MAX_REL_ERROR);
}

static void logfmt_is_monotonic_in_magnitude(void) {
    /* groups of ascending magnitudes under a fixed amax, covering every bf16 from amax / 2^32 to amax:
     * inside a group, decoding never reverses the order */
    uint16_t x[G];
    float out[G];
    const int hi = 0x3F00; /* 0.5 */
    for (int start = hi - 4096; start < hi; start += G - 1) {
        x[0] = 0;
        for (int i = 1; i < G; i++)
            x[i] = (uint16_t)(start + i - 1 < hi ? start + i - 1 : hi);
        x[G - 1] = (uint16_t)hi;
        TCHECK(roundtrip(x, out) == 1, "start 0x%04X: not encoded", start);
        for (int i = 1; i < G; i++)
            if (out[i] < out[i - 1]) {
                TCHECK(out[i] >= out[i - 1], "magnitude 0x%04X decodes to %a, below 0x%04X's %a", x[i], (double)out[i],
                       x[i - 1], (double)out[i - 1]);
                return;
            }
    }
}

int main(void) {
    TRUN(logfmt_keeps_groups_with_amax_at_least_1_raw);
    TRUN(logfmt_keeps_zero_and_single_magnitude_groups_raw);
    TRUN(logfmt_keeps_groups_with_nan_or_inf_raw);
    TRUN(logfmt_decodes_amax_and_amin_exactly_and_keeps_zeros_and_signs);
    TRUN(logfmt_flushes_only_values_below_amax_over_2_pow_32);
    TRUN(logfmt_matches_the_documented_formulas_bit_for_bit);
    TRUN(logfmt_round_trip_is_within_its_error_bound);
    TRUN(logfmt_is_monotonic_in_magnitude);
    return TDONE();
}
