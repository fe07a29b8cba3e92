/* The thin layer over NCCL's C++ device API (nccl_device.h), callable from plain C. */
#ifndef EP_NCCL_GLUE_H
#define EP_NCCL_GLUE_H

#include <cuda_runtime_api.h>
#include <nccl.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Asks NCCL's device API for the base of every LSA peer's window and writes them to
 * out_bases_dev[0..num_ranks-1] (device memory). */
cudaError_t ep_launch_fetch_window_bases(ncclWindow_t window, int num_ranks, char **out_bases_dev, cudaStream_t stream);

/* The world ranks this rank can reach by load/store (NCCL's LSA team), at most `capacity` of them. */
int ep_nccl_lsa_world_ranks(ncclComm_t comm, int *world_ranks, int capacity);

#ifdef __cplusplus
}
#endif
#endif
