/* Low-latency (decode) mode, host side: the handle behind ep_ll_handle_t. */
#ifndef EP_LL_H
#define EP_LL_H

#include "group.h"
#include "kernels/ll_kernels.h"

/* What a dispatch leaves for its hook, its combine and the combine's hook. */
struct ep_ll_handle {
    ep_group_t group;
    uint64_t seq;         /* the group's ll_seq at this dispatch */
    uint64_t window_gen;  /* the group's ll_window_gen at this dispatch */
    uint64_t combine_seq; /* the group's ll_combine_seq at this handle's last combine */
    int dispatch_recv_pending;
    int combine_recv_pending;
    ep_ll_dispatch_kargs_t dispatch; /* its parity: the buffer half of this dispatch */
    ep_ll_combine_kargs_t combine;
};

#endif
