/* The integer arithmetic of LogFMT (ref/logfmt.c), shared by the kernels and a host test that checks it
 * against the reference exhaustively: the 9-bit index of a magnitude and the float bits of an index. */
#ifndef EP_LOGFMT_MATH_H
#define EP_LOGFMT_MATH_H

#include <stdint.h>

#ifdef __CUDACC__
#define EP_LOGFMT_HD __host__ __device__ __forceinline__
#else
#define EP_LOGFMT_HD static inline
#endif

#define EP_LOGFMT_CLIP_STEPS 4096   /* amin is clipped at amax / 2^32: 32 binades of 128 bf16 steps */
#define EP_LOGFMT_ONE_BITS   0x3F80 /* bf16 1.0: groups with amax >= 1 travel raw */
#define EP_LOGFMT_LEVELS     510

/* 1 + floor((1020 t + d) / (2 d)) for 0 <= t <= d, 1 <= d <= 4096, with no integer division: the numerator
 * is below 2^23, so the float estimate num * inv_2d (inv_2d = 1 / (2 d) rounded) is within far less than one
 * of the quotient, and one correction step either way makes it exact. */
EP_LOGFMT_HD uint32_t ep_logfmt_index(int t, int d, float inv_2d) {
    const int num = 2 * EP_LOGFMT_LEVELS * t + d, den = 2 * d;
    int q = (int)((float)num * inv_2d);
    if ((q + 1) * den <= num)
        q++;
    else if (q * den > num)
        q--;
    return 1u + (uint32_t)q;
}

/* The float32 bits of a nonzero index's magnitude: lo's bf16 bits in float position plus round-to-nearest
 * of (index - 1) * d * 2^16 / 510 float steps, i.e. floor((n * 32768 + 127) / 255) with n = (index - 1) * d
 * < 2^21. In 32-bit arithmetic: with n = 255 a + b, that is a * 32768 + floor((b * 32768 + 127) / 255), and
 * b * 32768 + 127 < 2^23 (the decoder runs this per value; a 64-bit division by a constant costs more). */
EP_LOGFMT_HD uint32_t ep_logfmt_level_bits(uint32_t index, uint32_t lo, uint32_t d) {
    const uint32_t n = (index - 1u) * d, a = n / 255u, b = n - 255u * a;
    return (lo << 16) + a * 32768u + (b * 32768u + 127u) / 255u;
}

#endif
