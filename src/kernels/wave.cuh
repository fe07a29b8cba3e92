/* Whether a grid fits on the GPU at once: a kernel whose blocks wait for other blocks of the same grid (a
 * receive after a send, fused) must have all of them resident, or the waiting ones could hold the slots the
 * others need. */
#ifndef EP_WAVE_CUH
#define EP_WAVE_CUH

#include <cuda_runtime.h>

#define EP_WAVE_MAX_DEVICES 64

/* Blocks of `kernel` (launched with `threads` threads, no dynamic shared memory) the current device holds at
 * once; `per_sm_cache` is the caller's static cache of the occupancy (0 = not asked yet). */
static inline int ep_wave_capacity(const void *kernel, int threads, int *per_sm_cache) {
    static int sms[EP_WAVE_MAX_DEVICES];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= EP_WAVE_MAX_DEVICES)
        return 0;
    if (sms[dev] == 0 && cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 0;
    if (*per_sm_cache == 0 && cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm_cache, kernel, threads, 0) !=
                                  cudaSuccess)
        return 0;
    return sms[dev] * *per_sm_cache;
}

#endif
