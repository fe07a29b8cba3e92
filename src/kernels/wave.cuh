/* Whether a grid fits on the GPU at once: a kernel whose blocks wait for other blocks of the same grid (a
 * receive after a send, fused) must have all of them resident, or the waiting ones could hold the slots the
 * others need. */
#ifndef EP_WAVE_CUH
#define EP_WAVE_CUH

#include <cuda_runtime.h>

/* Blocks of `kernel` (launched with `threads` threads, no dynamic shared memory) that `sms` multiprocessors
 * hold at once; `per_sm_cache` is the caller's static cache of the occupancy (0 = not asked yet). */
static inline int ep_wave_capacity(const void *kernel, int threads, int sms, int *per_sm_cache) {
    if (*per_sm_cache == 0 && cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm_cache, kernel, threads, 0) !=
                                  cudaSuccess)
        return 0;
    return sms * *per_sm_cache;
}

/* Launches `kernel` with its blocks all resident at once: by a cooperative launch when `cooperative` (the
 * driver starts no block before all of them can run, so blocks of other kernels cannot leave part of the grid
 * waiting behind blocks that spin; a grid that can never fit is refused with
 * cudaErrorCooperativeLaunchTooLarge, cleared here so the caller can fall back), else by an ordinary launch
 * that relies on the caller's ep_wave_capacity check alone. */
template <typename... Params, typename... Args>
static inline cudaError_t ep_launch_resident(void (*kernel)(Params...), int blocks, int threads, int cooperative,
                                             cudaStream_t s, Args... args) {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)blocks);
    cfg.blockDim = dim3((unsigned)threads);
    cfg.stream = s;
    cfg.attrs = &attr;
    cfg.numAttrs = cooperative ? 1 : 0;
    cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (err == cudaErrorCooperativeLaunchTooLarge)
        (void)cudaGetLastError();
    return err;
}

#endif
