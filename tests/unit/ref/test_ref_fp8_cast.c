/* The FP8 group cast of low-latency dispatch: scale = 448 / amax (plain) or a power of two (round_scale), amax
 * clamped at 1e-4, UE8M0 bytes, NaN/Inf policy, and the round trip error bound. */
#include "reftest.h"

#include <float.h>

#define G 128

static void fill_group(uint16_t *x, epref_rng_t *rng, float magnitude) {
    for (int i = 0; i < G; i++)
        x[i] = epref_float_to_bf16(epref_rng_normal(rng) * magnitude);
}

static float group_amax(const uint16_t *x) {
    float amax = 0.0f;
    for (int i = 0; i < G; i++)
        amax = fmaxf(amax, fabsf(epref_bf16_to_float(x[i])));
    return amax;
}

static int is_power_of_two(float f) {
    return f > 0.0f && (test_float_bits(f) & 0x7FFFFFu) == 0;
}

static void fp8_cast_plain_scale_is_amax_over_448(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 21, 0);
    uint16_t x[G];
    uint8_t q[G];
    fill_group(x, &rng, 3.0f);
    float amax = group_amax(x), s_inv;
    epref_cast_fp8_group(x, G, 0, q, &s_inv);
    TCHECK(s_inv == amax * (1.0f / 448.0f), "scale_inv %a, expected %a", (double)s_inv,
           (double)(amax * (1.0f / 448.0f)));
    for (int i = 0; i < G; i++) {
        uint8_t want = epref_float_to_e4m3(epref_bf16_to_float(x[i]) * (448.0f / amax));
        TCHECK(q[i] == want, "element %d: q 0x%02X, expected 0x%02X", i, q[i], want);
        /* the largest element lands on +-448 */
        if (fabsf(epref_bf16_to_float(x[i])) == amax)
            TCHECK((q[i] & 0x7F) == 0x7E, "amax element %d casts to 0x%02X, expected +-448", i, q[i]);
    }
}

static void fp8_cast_clamps_amax_at_1e_minus_4(void) {
    uint16_t x[G];
    uint8_t q[G];
    float s_inv;
    memset(x, 0, sizeof(x));
    epref_cast_fp8_group(x, G, 0, q, &s_inv);
    TCHECK(s_inv == 1e-4f * (1.0f / 448.0f), "all-zero group: scale_inv %a", (double)s_inv);
    for (int i = 0; i < G; i++)
        TCHECK(q[i] == 0, "all-zero group: element %d is 0x%02X", i, q[i]);
    /* amax 5e-5 < 1e-4: values scale by 448 / 1e-4, so 5e-5 becomes about 224, not 448 */
    x[3] = epref_float_to_bf16(5e-5f);
    epref_cast_fp8_group(x, G, 0, q, &s_inv);
    TCHECK(s_inv == 1e-4f * (1.0f / 448.0f), "tiny group: scale_inv %a", (double)s_inv);
    float back = epref_e4m3_to_float(q[3]);
    TCHECK(back == 224.0f, "tiny group: 5e-5 cast to %g, expected 224", (double)back);
    /* round_scale on a clamped amax: 2^ceil(log2(1e-4 / 448)) = 2^-22 */
    epref_cast_fp8_group(x, G, 1, q, &s_inv);
    TCHECK(s_inv == 0x1p-22f, "tiny group, round_scale: scale_inv %a, expected 2^-22", (double)s_inv);
}

static void fp8_cast_round_scale_gives_the_next_power_of_two(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 22, 0);
    uint16_t x[G];
    uint8_t q[G];
    for (int trial = 0; trial < 400; trial++) {
        fill_group(x, &rng, ldexpf(1.0f, (int)(epref_rng_next(&rng) % 40) - 20));
        float amax = fmaxf(group_amax(x), 1e-4f), s_inv;
        epref_cast_fp8_group(x, G, 1, q, &s_inv);
        float need = amax * (1.0f / 448.0f);
        TCHECK(is_power_of_two(s_inv) && s_inv >= need && s_inv * 0.5f < need,
               "trial %d: amax %a gives scale_inv %a, expected the power of two in [%a, 2 * %a)", trial, (double)amax,
               (double)s_inv, (double)need, (double)need);
        for (int i = 0; i < G; i++) { /* values use the exact inverse 2^-e */
            uint8_t want = epref_float_to_e4m3(epref_bf16_to_float(x[i]) / s_inv);
            if (q[i] != want) {
                TCHECK(q[i] == want, "trial %d element %d: q 0x%02X, expected 0x%02X", trial, i, q[i], want);
                return;
            }
        }
    }
    /* exact powers of two: amax = 448 * 2^k gives exactly 2^k, not 2^(k+1) */
    memset(x, 0, sizeof(x));
    for (int k = -8; k <= 8; k++) {
        x[0] = epref_float_to_bf16(ldexpf(448.0f, k));
        float s_inv;
        epref_cast_fp8_group(x, G, 1, q, &s_inv);
        TCHECK(s_inv == ldexpf(1.0f, k), "amax 448 * 2^%d: scale_inv %a", k, (double)s_inv);
        TCHECK(q[0] == 0x7E, "amax 448 * 2^%d casts to 0x%02X", k, q[0]);
    }
}

static void ue8m0_byte_is_the_biased_exponent(void) {
    TCHECK_EQ_INT(epref_ue8m0_byte(1.0f), 127);
    TCHECK_EQ_INT(epref_ue8m0_byte(8.0f), 130);
    TCHECK_EQ_INT(epref_ue8m0_byte(0x1p-10f), 117);
    TCHECK_EQ_INT(epref_ue8m0_byte(0x1p-22f), 105);
    TCHECK_EQ_INT(epref_ue8m0_byte(0x1p-126f), 1);
}

/* e4m3's half ulp at magnitude a (the quantum is 2^-9 below 2^-6). */
static double e4m3_half_ulp(double a) {
    if (a < 0x1p-6)
        return 0x1p-10;
    int e;
    frexp(a, &e); /* a in [2^(e-1), 2^e) */
    return ldexp(1.0, e - 1 - 3 - 1);
}

static void fp8_cast_round_trip_is_within_half_an_e4m3_ulp(void) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 23, 0);
    uint16_t x[G];
    uint8_t q[G];
    for (int trial = 0; trial < 600; trial++) {
        int round_scale = trial & 1;
        fill_group(x, &rng, ldexpf(1.0f, (int)(epref_rng_next(&rng) % 30) - 15));
        float s_inv;
        epref_cast_fp8_group(x, G, round_scale, q, &s_inv);
        for (int i = 0; i < G; i++) {
            double v = (double)epref_bf16_to_float(x[i]);
            double scaled = fabs(v) / (double)s_inv; /* where the element sits on the e4m3 grid */
            double err = fabs((double)epref_e4m3_to_float(q[i]) * (double)s_inv - v);
            /* half an ulp at the scaled value, plus the float rounding of x * scale (relative 2^-24) */
            double bound = (e4m3_half_ulp(scaled) + scaled * 0x1p-23) * (double)s_inv;
            if (!(err <= bound)) {
                TCHECK(err <= bound, "trial %d (round_scale %d) element %d: x %a back %a, error %g > bound %g", trial,
                       round_scale, i, v, (double)epref_e4m3_to_float(q[i]) * (double)s_inv, err, bound);
                return;
            }
        }
    }
}

static void fp8_cast_ignores_nan_for_amax_and_casts_nan_to_0x7f(void) {
    uint16_t x[G];
    uint8_t q[G];
    float s_inv;
    for (int i = 0; i < G; i++)
        x[i] = epref_float_to_bf16((float)(i % 7) - 3.0f); /* amax 3 */
    x[5] = 0x7FC0;                                         /* +NaN */
    x[6] = 0xFFC1;                                         /* -NaN: arithmetic NaN signs are not portable */
    epref_cast_fp8_group(x, G, 0, q, &s_inv);
    TCHECK(s_inv == 3.0f * (1.0f / 448.0f), "NaN must not count for amax: scale_inv %a", (double)s_inv);
    TCHECK_EQ_INT(q[5], 0x7F);
    TCHECK_EQ_INT(q[6], 0x7F);
    TCHECK_EQ_INT(q[0], 0xFE); /* -3 -> -448 */
    /* a group of NaN only: amax clamps to 1e-4, every element is the NaN code */
    for (int i = 0; i < G; i++)
        x[i] = 0x7FC0;
    epref_cast_fp8_group(x, G, 1, q, &s_inv);
    TCHECK(s_inv == 0x1p-22f, "all-NaN group: scale_inv %a", (double)s_inv);
    TCHECK_EQ_INT(q[100], 0x7F);
}

static void fp8_cast_inf_zeroes_finite_values_and_gives_nan(void) {
    uint16_t x[G];
    uint8_t q[G];
    for (int round_scale = 0; round_scale < 2; round_scale++) {
        for (int i = 0; i < G; i++)
            x[i] = epref_float_to_bf16((float)(i % 5) - 2.0f);
        x[9] = 0xFF80; /* -Inf */
        float s_inv;
        epref_cast_fp8_group(x, G, round_scale, q, &s_inv);
        TCHECK(isinf(s_inv) && s_inv > 0, "round_scale %d: scale_inv %a, expected +Inf", round_scale, (double)s_inv);
        TCHECK_EQ_INT(q[9], 0x7F); /* -Inf * 0 = NaN */
        TCHECK_EQ_INT(q[0], 0x80); /* -2 * 0 = -0 */
        TCHECK_EQ_INT(q[4], 0x00); /* 2 * 0 = +0 */
    }
}

static void fp8_cast_saturates_values_beyond_448_after_scaling(void) {
    /* bf16 rounding of amax can push x * 448 / amax a hair above 448; it must saturate, never become NaN */
    epref_rng_t rng;
    epref_rng_seed(&rng, 24, 0);
    uint16_t x[G];
    uint8_t q[G];
    for (int trial = 0; trial < 200; trial++) {
        fill_group(x, &rng, 100.0f);
        float s_inv;
        epref_cast_fp8_group(x, G, 0, q, &s_inv);
        for (int i = 0; i < G; i++)
            if ((q[i] & 0x7F) == 0x7F) {
                TCHECK((q[i] & 0x7F) != 0x7F, "trial %d element %d: finite value cast to NaN", trial, i);
                return;
            }
    }
}

int main(void) {
    TRUN(fp8_cast_plain_scale_is_amax_over_448);
    TRUN(fp8_cast_clamps_amax_at_1e_minus_4);
    TRUN(fp8_cast_round_scale_gives_the_next_power_of_two);
    TRUN(ue8m0_byte_is_the_biased_exponent);
    TRUN(fp8_cast_round_trip_is_within_half_an_e4m3_ulp);
    TRUN(fp8_cast_ignores_nan_for_amax_and_casts_nan_to_0x7f);
    TRUN(fp8_cast_inf_zeroes_finite_values_and_gives_nan);
    TRUN(fp8_cast_saturates_values_beyond_448_after_scaling);
    return TDONE();
}
