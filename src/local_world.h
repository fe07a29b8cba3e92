/* In-process groups: every rank is a thread of this process (ranks may share a GPU). Ranks meet in a
 * process-wide registry keyed by the unique id, and exchange small host values there instead of through NCCL;
 * every wait has the group's timeout and names the ranks that did not arrive. */
#ifndef EP_LOCAL_WORLD_H
#define EP_LOCAL_WORLD_H

#include "epcomm.h"

#include <stddef.h>
#include <stdint.h>

/* Bytes one rank may contribute to one all-gather. */
#define EP_LOCAL_SLOT_BYTES 512

typedef struct ep_local_world ep_local_world_t;

/* Whether an id came from ep_get_local_unique_id. */
int ep_local_id_is_local(const ep_unique_id_t *id);
void ep_local_id_make(ep_unique_id_t *id);

/* Joins (creating on first arrival) the world of `id` as `rank`; the world lives until every joined rank left. */
ep_status_t ep_local_join(const ep_unique_id_t *id, int num_ranks, int rank, ep_local_world_t **world);
/* Leaves the world. `keep` (may be NULL) stays alive until every rank has left: the last rank to leave gets every
 * kept pointer in `release` (room for EP_MAX_NVL_RANKS) and frees them; the return value is their count (0 for
 * the others). For memory that peers may still write, e.g. a window, while they time out and tear down. */
int ep_local_leave(ep_local_world_t *world, int rank, void *keep, void **release);

/* Every rank contributes `bytes` (the same on every rank, at most EP_LOCAL_SLOT_BYTES) and receives all of them
 * in rank order in `all`. A rank that does not arrive within timeout_ms fails the call (EP_ERROR_TIMEOUT, naming
 * it) on every rank that waited, and every later call on the world fails at once. */
ep_status_t ep_local_allgather(ep_local_world_t *world, int rank, const void *mine, size_t bytes, void *all,
                               int64_t timeout_ms, const char *what);

#endif
