/* The group's own kernels: the cross-rank barrier and the destroy handshake. Thread p talks to rank p. */
#include "group_kernels.h"
#include "sync.cuh"

/* Barrier by epochs: each rank counts completed barriers; barrier n writes n into this rank's slot of every
 * peer's flag array and waits until every slot of its own array reaches n. Flags only grow, so nothing is
 * ever reset and no two barriers can be confused. */
__global__ void barrier_kernel(ep_dev_group_t g, int stage) {
    __shared__ uint64_t epoch;
    int peer = threadIdx.x;
    if (peer == 0)
        epoch = *g.barrier_epoch + 1;
    __syncthreads();
    if (peer < g.num_ranks) {
        /* Everything this GPU wrote to peers before the barrier must land before the flag does. */
        __threadfence_system();
        uint64_t *remote = (uint64_t *)(g.window[peer] + EP_CTRL_BARRIER_FLAGS) + g.rank;
        ep_store_release_sys(remote, epoch);
        const uint64_t *local = (const uint64_t *)(g.window[g.rank] + EP_CTRL_BARRIER_FLAGS) + peer;
        ep_wait_flag_geq(g, local, epoch, stage, peer);
    }
    __syncthreads();
    if (peer == 0)
        *g.barrier_epoch = epoch;
}

extern "C" cudaError_t ep_launch_barrier(const ep_dev_group_t *group, int stage, cudaStream_t stream) {
    barrier_kernel<<<1, 32, 0, stream>>>(*group, stage);
    return cudaGetLastError();
}

/* Destroy flags are written once per group lifetime, so a non-zero slot is that peer's vote. */
__global__ void destroy_vote_kernel(ep_dev_group_t g, uint64_t vote, int wait, int32_t *votes_out) {
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
