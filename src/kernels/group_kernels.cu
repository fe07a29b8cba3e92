/* The group's own kernels: the cross-rank barrier and the destroy handshake. Thread p talks to rank p. */
#include "group_kernels.h"
#include "sync.cuh"

__global__ void barrier_kernel(const __grid_constant__ ep_dev_group_t g, int stage, uint64_t word) {
    ep_cta_barrier(g, stage, word);
}

extern "C" cudaError_t ep_launch_barrier(const ep_dev_group_t *group, int stage, uint64_t word, cudaStream_t stream) {
    barrier_kernel<<<1, 32, 0, stream>>>(*group, stage, word);
    return cudaGetLastError();
}

/* Destroy flags are written once per group lifetime, so a non-zero slot is that peer's vote. */
__global__ void destroy_vote_kernel(const __grid_constant__ ep_dev_group_t g, uint64_t vote, int wait,
                                    int32_t *votes_out) {
    int peer = threadIdx.x;
    if (peer >= g.num_ranks)
        return;
    __threadfence_system();
    ep_store_release_sys((uint64_t *)(g.window[peer] + EP_CTRL_DESTROY_FLAGS) + g.rank, vote);
    if (!wait)
        return;
    const uint64_t *local = (const uint64_t *)(g.window[g.rank] + EP_CTRL_DESTROY_FLAGS) + peer;
    ep_wait_flag_geq(g, local, 1, EP_STAGE_DESTROY_BARRIER, peer);
    votes_out[peer] = (int32_t)ep_load_acquire_sys(local);
    __threadfence_system();
}

extern "C" cudaError_t ep_launch_destroy_vote(const ep_dev_group_t *group, int vote, int wait, int32_t *votes_out,
                                              cudaStream_t stream) {
    destroy_vote_kernel<<<1, 32, 0, stream>>>(*group, (uint64_t)vote, wait, votes_out);
    return cudaGetLastError();
}
