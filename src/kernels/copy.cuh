/* Warp-wide copies with several 16-byte loads in flight per lane: a copy loop that stores each chunk before
 * loading the next waits one memory latency per chunk, which dominates small (latency-bound) transfers. */
#ifndef EP_COPY_CUH
#define EP_COPY_CUH

#include <stdint.h>

#define EP_COPY_UNROLL 8

/* The warp copies `chunks` 16-byte chunks; `lane` is the caller's lane (0..31). No __restrict__: sources may be
 * slots that peers write (a read-only, non-coherent load of them would be wrong). */
__device__ __forceinline__ void ep_warp_copy16(uint4 *dst, const uint4 *src, int64_t chunks, int lane) {
    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * EP_COPY_UNROLL) {
        uint4 v[EP_COPY_UNROLL];
#pragma unroll
        for (int u = 0; u < EP_COPY_UNROLL; u++)
            if (c0 + u * 32 < chunks)
                v[u] = src[c0 + u * 32];
#pragma unroll
        for (int u = 0; u < EP_COPY_UNROLL; u++)
            if (c0 + u * 32 < chunks)
                dst[c0 + u * 32] = v[u];
    }
}

#endif
