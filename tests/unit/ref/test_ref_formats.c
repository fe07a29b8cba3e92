/* bf16 and e4m3 conversions of the reference: rounding (half to even), NaN, Inf, overflow, saturation,
 * subnormals; exhaustive round trips and a brute-force nearest-value check on many random floats. */
#include "reftest.h"

#include <float.h>

static void bf16_rounds_half_to_even_on_ties(void) {
    /* 1 + 2^-8 lies halfway between 1 (0x3F80, even) and 1 + 2^-7 (0x3F81). */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x3F808000u)), 0x3F80);
    /* halfway between 0x3F81 (odd) and 0x3F82: rounds up to even */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x3F818000u)), 0x3F82);
    /* just above / below a tie */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x3F808001u)), 0x3F81);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x3F817FFFu)), 0x3F81);
    /* negative ties and a carry into the exponent */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0xBF808000u)), 0xBF80);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x3FFF8000u)), 0x4000);
    /* subnormal tie: 0x00018000 -> 0x0002 (even) */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x00018000u)), 0x0002);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x00008000u)), 0x0000);
}

static void bf16_keeps_nan_quiet_with_sign(void) {
    /* A signalling NaN whose payload sits in the dropped bits would truncate to Inf: it must stay NaN. */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x7F800001u)), 0x7FC0);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0xFF800001u)), 0xFFC0);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x7FC00000u)), 0x7FC0);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x7FFFFFFFu)), 0x7FFF);
    TCHECK(isnan(epref_bf16_to_float(0x7FC0)), "bf16 0x7FC0 decodes to %g", (double)epref_bf16_to_float(0x7FC0));
}

static void bf16_keeps_inf_and_overflows_to_inf(void) {
    TCHECK_EQ_INT(epref_float_to_bf16(INFINITY), 0x7F80);
    TCHECK_EQ_INT(epref_float_to_bf16(-INFINITY), 0xFF80);
    /* FLT_MAX is above the largest bf16 (0x7F7F) by more than half its ulp: rounds to Inf (IEEE overflow). */
    TCHECK_EQ_INT(epref_float_to_bf16(FLT_MAX), 0x7F80);
    TCHECK_EQ_INT(epref_float_to_bf16(-FLT_MAX), 0xFF80);
    /* The largest bf16 and the largest float that still rounds down to it. */
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x7F7F0000u)), 0x7F7F);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x7F7F7FFFu)), 0x7F7F);
    TCHECK_EQ_INT(epref_float_to_bf16(test_bits_float(0x7F7F8000u)), 0x7F80);
    TCHECK_EQ_INT(epref_float_to_bf16(-0.0f), 0x8000);
}

static void bf16_round_trip_is_identity_for_every_pattern(void) {
    for (uint32_t b = 0; b < 0x10000u; b++) {
        uint16_t back = epref_float_to_bf16(epref_bf16_to_float((uint16_t)b));
        int nan = (b & 0x7FFF) > 0x7F80;
        /* a signalling NaN comes back quiet (bit 6 set); everything else bit for bit */
        uint16_t want = (uint16_t)(nan ? (b | 0x40) : b);
        if (back != want) {
            TCHECK(back == want, "pattern 0x%04X came back 0x%04X, expected 0x%04X", b, back, want);
            break;
        }
    }
}

/* The nearest bf16 by brute force over the two neighbours, ties to even; Inf counts as 2^128 (IEEE). */
static uint16_t bf16_brute(float f) {
    uint32_t u = test_float_bits(f);
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
    double vlo = fabs((double)epref_bf16_to_float(lo));
    double vhi = (hi & 0x7FFF) == 0x7F80 ? ldexp(1.0, 128) : fabs((double)epref_bf16_to_float(hi));
    double a = fabs((double)f);
    if (a - vlo < vhi - a)
        return lo;
    if (a - vlo > vhi - a)
        return hi;
    return (lo & 1) ? hi : lo;
}

static void bf16_is_nearest_for_random_floats(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 11, 0);
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)epref_rng_next(&rng);
        if ((u & 0x7F800000u) == 0x7F800000u)
            continue; /* Inf/NaN tested above */
        float f = test_bits_float(u);
        uint16_t got = epref_float_to_bf16(f), want = bf16_brute(f);
        if (got != want) {
            TCHECK(got == want, "float 0x%08X (%g): got 0x%04X, expected 0x%04X", u, (double)f, got, want);
            break;
        }
    }
}

static void e4m3_decodes_known_codes(void) {
    TCHECK(epref_e4m3_to_float(0x7E) == 448.0f, "0x7E -> %g", (double)epref_e4m3_to_float(0x7E));
    TCHECK(epref_e4m3_to_float(0xFE) == -448.0f, "0xFE -> %g", (double)epref_e4m3_to_float(0xFE));
    TCHECK(epref_e4m3_to_float(0x38) == 1.0f, "0x38 -> %g", (double)epref_e4m3_to_float(0x38));
    TCHECK(epref_e4m3_to_float(0x08) == 0x1p-6f, "0x08 -> %g", (double)epref_e4m3_to_float(0x08));
    TCHECK(epref_e4m3_to_float(0x07) == 7 * 0x1p-9f, "0x07 -> %g", (double)epref_e4m3_to_float(0x07));
    TCHECK(epref_e4m3_to_float(0x01) == 0x1p-9f, "0x01 -> %g", (double)epref_e4m3_to_float(0x01));
    TCHECK(epref_e4m3_to_float(0x00) == 0.0f && !signbit(epref_e4m3_to_float(0x00)), "0x00 is +0");
    TCHECK(epref_e4m3_to_float(0x80) == 0.0f && signbit(epref_e4m3_to_float(0x80)), "0x80 is -0");
    TCHECK(isnan(epref_e4m3_to_float(0x7F)) && isnan(epref_e4m3_to_float(0xFF)), "0x7F and 0xFF are NaN");
    TCHECK(epref_e4m3_to_float(0x77) == 240.0f, "0x77 -> %g (e=14, no Inf code)", (double)epref_e4m3_to_float(0x77));
}

static void e4m3_decode_then_encode_is_identity_for_every_code(void) {
    /* NaN codes too: the encoder keeps a NaN's sign, so 0x7F and 0xFF come back as themselves. */
    for (int c = 0; c < 256; c++) {
        uint8_t back = epref_float_to_e4m3(epref_e4m3_to_float((uint8_t)c));
        TCHECK(back == c, "code 0x%02X (%g) came back 0x%02X", c, (double)epref_e4m3_to_float((uint8_t)c), back);
    }
}

static void e4m3_saturates_at_448(void) {
    const float sat[] = {448.0f, 448.5f, 463.9f, 464.0f, 479.0f, 480.0f, 500.0f, 1e6f, FLT_MAX, INFINITY};
    for (size_t i = 0; i < sizeof(sat) / sizeof(sat[0]); i++) {
        TCHECK(epref_float_to_e4m3(sat[i]) == 0x7E, "%g -> 0x%02X, expected 0x7E", (double)sat[i],
               epref_float_to_e4m3(sat[i]));
        TCHECK(epref_float_to_e4m3(-sat[i]) == 0xFE, "%g -> 0x%02X, expected 0xFE", (double)-sat[i],
               epref_float_to_e4m3(-sat[i]));
    }
    /* just below 448: 416 + 16 = 432 is the tie between 416 (0x7D) and 448 (0x7E, even) */
    TCHECK_EQ_INT(epref_float_to_e4m3(432.0f), 0x7E);
    TCHECK_EQ_INT(epref_float_to_e4m3(431.0f), 0x7D);
}

static void e4m3_rounds_half_to_even(void) {
    TCHECK_EQ_INT(epref_float_to_e4m3(1.0625f), 0x38); /* between 1 (0x38) and 1.125 (0x39) */
    TCHECK_EQ_INT(epref_float_to_e4m3(1.1875f), 0x3A); /* between 1.125 (0x39) and 1.25 (0x3A) */
    TCHECK_EQ_INT(epref_float_to_e4m3(-1.0625f), 0xB8);
    TCHECK_EQ_INT(epref_float_to_e4m3(15.5f * 0x1p-10f), 0x08); /* 7.75 subnormal steps carry into 2^-6 */
    TCHECK_EQ_INT(epref_float_to_e4m3(15.0f * 0x1p-10f), 0x08); /* 7.5 steps: tie, 8 is even */
    TCHECK_EQ_INT(epref_float_to_e4m3(0x1p-10f), 0x00);         /* half the smallest subnormal: to 0 (even) */
    TCHECK_EQ_INT(epref_float_to_e4m3(3 * 0x1p-10f), 0x02);     /* 1.5 subnormal steps -> 2 */
    TCHECK_EQ_INT(epref_float_to_e4m3(5 * 0x1p-10f), 0x02);     /* 2.5 -> 2 */
}

static void e4m3_keeps_tiny_values_and_subnormals(void) {
    TCHECK_EQ_INT(epref_float_to_e4m3(0x1p-9f), 0x01);
    TCHECK_EQ_INT(epref_float_to_e4m3(test_bits_float(0x3A800001u)), 0x01); /* just above 2^-10 */
    TCHECK_EQ_INT(epref_float_to_e4m3(0x1p-11f), 0x00);
    TCHECK_EQ_INT(epref_float_to_e4m3(-0x1p-11f), 0x80);                    /* underflow keeps the sign */
    TCHECK_EQ_INT(epref_float_to_e4m3(test_bits_float(0x00000001u)), 0x00); /* float subnormals */
    TCHECK_EQ_INT(epref_float_to_e4m3(test_bits_float(0x80400000u)), 0x80);
    TCHECK_EQ_INT(epref_float_to_e4m3(0.0f), 0x00);
    TCHECK_EQ_INT(epref_float_to_e4m3(-0.0f), 0x80);
    TCHECK_EQ_INT(epref_float_to_e4m3(7 * 0x1p-9f), 0x07); /* largest subnormal */
}

static void e4m3_nan_gives_nan_code_with_sign(void) {
    TCHECK_EQ_INT(epref_float_to_e4m3(NAN), 0x7F);
    TCHECK_EQ_INT(epref_float_to_e4m3(test_bits_float(0xFFC00000u)), 0xFF);
    TCHECK_EQ_INT(epref_float_to_e4m3(test_bits_float(0x7F800001u)), 0x7F);
}

/* Nearest finite e4m3 of the same sign by brute force over all codes, ties to the even code. */
static uint8_t e4m3_brute(float f) {
    int neg = signbit(f) != 0;
    double a = (double)f;
    int best = -1;
    double best_d = 0;
    for (int c = 0; c < 256; c++) {
        if ((c & 0x7F) == 0x7F || ((c & 0x80) != 0) != neg)
            continue;
        double d = fabs((double)epref_e4m3_to_float((uint8_t)c) - a);
        if (best < 0 || d < best_d || (d == best_d && (c & 1) == 0 && (best & 1) == 1)) {
            best = c;
            best_d = d;
        }
    }
    return (uint8_t)best;
}

static void e4m3_is_nearest_for_random_floats(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 12, 0);
    int bad = 0;
    /* random magnitudes from 2^-14 to 2^10 (subnormal, normal and saturating ranges) */
    for (int i = 0; i < 60000 && !bad; i++) {
        uint32_t u = (uint32_t)epref_rng_next(&rng);
        uint32_t exp = 113u + (u >> 8) % 24u;
        float f = test_bits_float((u & 0x80000000u) | (exp << 23) | (u & 0x7FFFFFu));
        uint8_t got = epref_float_to_e4m3(f), want = e4m3_brute(f);
        if (got != want) {
            TCHECK(got == want, "float %a: got 0x%02X, expected 0x%02X", (double)f, got, want);
            bad = 1;
        }
    }
    /* every midpoint between neighbouring codes, and one float step either side of it */
    for (int c = 0; c < 0x7E && !bad; c++) {
        float mid = (epref_e4m3_to_float((uint8_t)c) + epref_e4m3_to_float((uint8_t)(c + 1))) * 0.5f;
        float probes[3] = {mid, nextafterf(mid, 0.0f), nextafterf(mid, 1e9f)};
        for (int p = 0; p < 3; p++) {
            for (int sgn = 0; sgn < 2; sgn++) {
                float f = sgn ? -probes[p] : probes[p];
                uint8_t got = epref_float_to_e4m3(f), want = e4m3_brute(f);
                if (got != want) {
                    TCHECK(got == want, "float %a (near the midpoint of code 0x%02X): got 0x%02X, expected 0x%02X",
                           (double)f, c, got, want);
                    bad = 1;
                }
            }
        }
    }
}

int main(void) {
    TRUN(bf16_rounds_half_to_even_on_ties);
    TRUN(bf16_keeps_nan_quiet_with_sign);
    TRUN(bf16_keeps_inf_and_overflows_to_inf);
    TRUN(bf16_round_trip_is_identity_for_every_pattern);
    TRUN(bf16_is_nearest_for_random_floats);
    TRUN(e4m3_decodes_known_codes);
    TRUN(e4m3_decode_then_encode_is_identity_for_every_code);
    TRUN(e4m3_saturates_at_448);
    TRUN(e4m3_rounds_half_to_even);
    TRUN(e4m3_keeps_tiny_values_and_subnormals);
    TRUN(e4m3_nan_gives_nan_code_with_sign);
    TRUN(e4m3_is_nearest_for_random_floats);
    return TDONE();
}
