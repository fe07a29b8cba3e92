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
 * of (index - 1) * d * 2^16 / 510 float steps. */
EP_LOGFMT_HD uint32_t ep_logfmt_level_bits(uint32_t index, uint32_t lo, uint32_t d) {
    return (lo << 16) + (uint32_t)(((uint64_t)(index - 1u) * d * 32768u + 127u) / 255u);
}

#endif
