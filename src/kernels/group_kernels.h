/* Launchers for the group's own kernels (plain C interface to group_kernels.cu). */
#ifndef EP_GROUP_KERNELS_H
#define EP_GROUP_KERNELS_H

#include "dev_group.h"

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Every rank signals every peer and waits for all of them (with the group's timeout, recording a timeout
 * in the error record under `stage`). A non-zero `word` (ht_layout.h: EP_HT_SEND_*, ep_plain_barrier_word) must be
 * every rank's: a difference is recorded as bad input (EP_INPUT_SEND_MISMATCH). */
cudaError_t ep_launch_barrier(const ep_dev_group_t *group, int stage, uint64_t word, cudaStream_t stream);

/* Destroy handshake: writes `vote` (EP_VOTE_OK or EP_VOTE_ABORT) into this rank's slot of every peer's
 * destroy flags; with `wait`, then waits (group timeout) for every peer's vote and writes what it saw to
 * votes_out[peer] (host-mapped): the vote, or 0 if the peer never voted. */
#define EP_VOTE_OK    1
#define EP_VOTE_ABORT 2
cudaError_t ep_launch_destroy_vote(const ep_dev_group_t *group, int vote, int wait, int32_t *votes_out,
                                   cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
