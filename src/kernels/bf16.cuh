/* bf16 helpers shared by the kernels, matching the CPU reference bit for bit: round to nearest even, and a
 * NaN stays a quiet NaN with its sign. */
#ifndef EP_BF16_CUH
#define EP_BF16_CUH

#include <stdint.h>

__device__ __forceinline__ uint16_t ep_f32_to_bf16(float f) {
    uint32_t b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((b >> 16) | 0x0040u);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float ep_bf16_lo(uint32_t w) {
    return __uint_as_float(w << 16);
}
__device__ __forceinline__ float ep_bf16_hi(uint32_t w) {
    return __uint_as_float(w & 0xffff0000u);
}

/* Eight floats to eight bf16 in a 16-byte vector. */
__device__ __forceinline__ uint4 ep_pack_bf16x8(const float a[8]) {
    uint4 r;
    r.x = ep_f32_to_bf16(a[0]) | ((uint32_t)ep_f32_to_bf16(a[1]) << 16);
    r.y = ep_f32_to_bf16(a[2]) | ((uint32_t)ep_f32_to_bf16(a[3]) << 16);
    r.z = ep_f32_to_bf16(a[4]) | ((uint32_t)ep_f32_to_bf16(a[5]) << 16);
    r.w = ep_f32_to_bf16(a[6]) | ((uint32_t)ep_f32_to_bf16(a[7]) << 16);
    return r;
}

#endif
