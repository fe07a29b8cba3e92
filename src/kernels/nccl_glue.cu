/* Everything that touches nccl_device.h lives here, so host C never sees NCCL's C++ device headers. */
#include "nccl_glue.h"

#include <nccl_device.h>

/* One thread per rank asks NCCL where that rank's window is mapped in this process. */
__global__ void fetch_window_bases_kernel(ncclWindow_t window, int num_ranks, char **out) {
    int peer = threadIdx.x;
    if (peer < num_ranks)
        out[peer] = (char *)ncclGetLsaPointer(window, 0, peer);
}

extern "C" cudaError_t ep_launch_fetch_window_bases(ncclWindow_t window, int num_ranks, char **out_bases_dev,
                                                    cudaStream_t stream) {
    fetch_window_bases_kernel<<<1, 32, 0, stream>>>(window, num_ranks, out_bases_dev);
    return cudaGetLastError();
}

extern "C" int ep_nccl_lsa_world_ranks(ncclComm_t comm, int *world_ranks, int capacity) {
    ncclTeam_t lsa = ncclTeamLsa(comm);
    int n = 0;
    for (int i = 0; i < lsa.nRanks && n < capacity; i++)
        world_ranks[n++] = ncclTeamRankToWorld(comm, lsa, i);
    return lsa.nRanks;
}
