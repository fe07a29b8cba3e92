/* A dispatch's routing, owned by its handle: what combine and cached dispatch reuse. */
#ifndef EP_HANDLE_H
#define EP_HANDLE_H

#include "group.h"

struct ep_handle {
    ep_group_t group;
    int num_tokens; /* N at this rank */
    int num_recv;   /* Nr, or -1 when the host does not know it */
    int num_rows;   /* rows of the dispatch outputs (Nr or num_worst_tokens) */
    int num_worst_tokens;
    int num_experts;
    int topk;
    int32_t counts[EP_MAX_NVL_RANKS * EP_MAX_NVL_RANKS]; /* host copy, valid when num_recv >= 0 */
    void *device_mem; /* counts, num_recv, send_pos: cudaMallocAsync'd on the group's stream, or cudaMalloc'd
                         when made during a CUDA-graph capture (replays need it to outlive each launch) */
    int captured;
    ep_ht_routing_t routing;
};

/* Allocates a handle and its device memory (stream-ordered on the group's stream). */
ep_status_t ep_handle_create(ep_group_t g, int num_tokens, ep_handle_t *out);
/* Frees a handle without touching the thread's error message (for failure paths). */
ep_status_t ep_handle_release(ep_handle_t h);
/* Frees what released handles of an in-process group left for the group's end (see group.h). */
void ep_group_free_deferred(ep_group_t g);

#endif
