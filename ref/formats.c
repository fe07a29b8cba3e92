/* Number formats: bf16, float8_e4m3fn, the FP8 group cast of low-latency dispatch, and UE8M0 bytes.
 * Everything works on bit patterns with integer arithmetic, so the result never depends on the FPU's
 * rounding mode or on the C library, and a CUDA kernel can reproduce it exactly. */
#include "internal.h"

#include <math.h>
#include <string.h>

#define E4M3_MAX_CODE 0x7Eu /* 448 */
#define E4M3_NAN_CODE 0x7Fu

static uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

float epref_bf16_to_float(uint16_t v) {
    return bits_float((uint32_t)v << 16);
}

uint16_t epref_float_to_bf16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) /* NaN: truncating could give Inf, so force the quiet bit */
        return (uint16_t)((u >> 16) | 0x0040u);
    /* Round half to even on the 16 dropped bits; a carry into the exponent is the correct result,
     * including overflow to Inf (Inf itself has zero low bits and stays Inf). */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float epref_e4m3_to_float(uint8_t v) {
    unsigned exp = (v >> 3) & 0xFu, man = v & 0x7u;
    float mag;
    if (exp == 0xF && man == 0x7)
        mag = NAN; /* e4m3fn has no Inf, only this NaN code per sign */
    else if (exp == 0)
        mag = ldexpf((float)man, -9); /* subnormal: man * 2^-9 */
    else
        mag = ldexpf((float)(8 + man), (int)exp - 10); /* (1 + man/8) * 2^(exp-7) */
    return (v & 0x80u) ? -mag : mag;
}

/* Rounds the positive integer m (the significand) right by `shift` bits, half to even. shift in [1, 31]. */
static uint32_t shift_round_even(uint32_t m, int shift) {
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return q;
}

uint8_t epref_float_to_e4m3(float f) {
    uint32_t u = float_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t mag = u & 0x7FFFFFFFu;
    if (mag > 0x7F800000u)
        return (uint8_t)(sign | E4M3_NAN_CODE);
    if (mag >= 0x43E00000u) /* |f| >= 448, Inf included: saturate (satfinite) */
        return (uint8_t)(sign | E4M3_MAX_CODE);
    int exp = (int)(mag >> 23) - 127;
    if (exp < -10) /* |f| < 2^-10 = half the smallest subnormal 2^-9: rounds to zero (float subnormals too) */
        return sign;
    uint32_t sig = (mag & 0x7FFFFFu) | 0x800000u; /* |f| = sig * 2^(exp-23) */
    /* The e4m3 quantum at this magnitude: 2^(exp-3) for normals, 2^-9 below 2^-6. */
    int q_exp = (exp < -6 ? -6 : exp) - 3;
    uint32_t q = shift_round_even(sig, q_exp - (exp - 23)); /* |f| / quantum, rounded */
    /* Normals: code = (exp+7)*8 + (q-8); subnormals: code = q. Both are (max(exp,-6)+6)*8 + q, and a
     * mantissa carry (q == 16, or q == 8 from a subnormal) lands on the next exponent's code by itself. */
    uint32_t code = (uint32_t)((exp < -6 ? -6 : exp) + 6) * 8u + q;
    if (code > E4M3_MAX_CODE)
        code = E4M3_MAX_CODE;
    return (uint8_t)(sign | code);
}

/* ceil(log2(s)) for a positive finite normal float, read from its bits: the exponent, plus one unless the
 * mantissa is zero (s is a power of two). */
static int ceil_log2_bits(float s) {
    uint32_t u = float_bits(s);
    int exp = (int)((u >> 23) & 0xFFu) - 127;
    return exp + ((u & 0x7FFFFFu) != 0);
}

/* amax over the group, NaN ignored (comparisons with NaN are false), clamped to >= 1e-4. */
static float group_amax(const uint16_t *x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(epref_bf16_to_float(x[i]));
        if (a > amax)
            amax = a;
    }
    return amax < 1e-4f ? 1e-4f : amax;
}

void epref_cast_fp8_group(const uint16_t *x, int n, int round_scale, uint8_t *q, float *scale_inv) {
    float amax = group_amax(x, n);
    float s_inv, scale;
    if (isinf(amax)) {
        s_inv = INFINITY; /* documented policy: an Inf in the group zeroes every finite value */
        scale = 0.0f;
    } else if (round_scale) {
        int e = ceil_log2_bits(amax * (1.0f / 448.0f)); /* amax >= 1e-4, so the quotient is normal */
        s_inv = ldexpf(1.0f, e);
        scale = ldexpf(1.0f, -e);
    } else {
        s_inv = amax * (1.0f / 448.0f);
        scale = 448.0f / amax;
    }
    for (int i = 0; i < n; i++) {
        float v = epref_bf16_to_float(x[i]) * scale;
        /* A NaN made by arithmetic has no portable sign (a GPU's is always positive, x86's default NaN is
         * negative), so every NaN product becomes the positive NaN code. */
        q[i] = isnan(v) ? (uint8_t)E4M3_NAN_CODE : epref_float_to_e4m3(v);
    }
    *scale_inv = s_inv;
}

uint8_t epref_ue8m0_byte(float scale_inv) {
    return (uint8_t)((float_bits(scale_inv) >> 23) & 0xFFu);
}
