/* Small host-value all-gathers among a group's ranks (settings checked at creation, autotune's times): over the
 * NCCL communicator, or through the process-wide registry for an in-process group; and leaving that registry. */
#include "error.h"
#include "group.h"
#include "local_world.h"

#include <stdlib.h>

static ep_status_t allgather_nccl(ep_group_t g, const void *mine, size_t bytes, void *all, const char *what) {
    size_t total = bytes * (size_t)g->num_ranks;
    char *dev = NULL;
    if (cudaMalloc((void **)&dev, total + bytes) != cudaSuccess)
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "%s: cudaMalloc of %zu bytes failed", what, total + bytes);
    ep_status_t st = EP_SUCCESS;
    if (cudaMemcpy(dev + total, mine, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
        st = ep_fail(EP_ERROR_CUDA, "%s: cudaMemcpy failed", what);
    if (st == EP_SUCCESS)
        st = ep_nccl_complete(g->comm, ncclAllGather(dev + total, dev, bytes, ncclUint8, g->comm, g->stream),
                              g->timeout_ms, what);
    if (st == EP_SUCCESS)
        st = ep_group_wait_stream(g, g->stream, what);
    if (st == EP_SUCCESS && cudaMemcpy(all, dev, total, cudaMemcpyDeviceToHost) != cudaSuccess)
        st = ep_fail(EP_ERROR_CUDA, "%s: cudaMemcpy failed", what);
    cudaFree(dev);
    return st;
}

ep_status_t ep_group_allgather(ep_group_t g, const void *mine, size_t bytes, void *all, const char *what) {
    if (g->local != NULL)
        return ep_local_allgather(g->local, g->rank, mine, bytes, all, g->timeout_ms, what);
    return allgather_nccl(g, mine, bytes, all, what);
}

void ep_group_leave_local(ep_group_t g) {
    void *release[EP_MAX_NVL_RANKS];
    int n = ep_local_leave(g->local, g->rank, g->window_mem, release);
    for (int i = 0; i < n; i++)
        cudaFree(release[i]); /* every rank has left: no kernel of the group can touch a window any more */
    g->window_mem = NULL;
    g->local = NULL;
}
