/* Combine's transfer on copy engines (see ht_combine_ce.c). */
#ifndef EP_HT_COMBINE_CE_H
#define EP_HT_COMBINE_CE_H

#include "handle.h"

/* Whether this combine should (and can) move its rows with copy engines. */
int ep_ht_combine_ce_wanted(ep_group_t g, const ep_combine_args_t *a);
/* Enqueues the peer copies, forked from and joined back into the group's stream. */
cudaError_t ep_ht_combine_send_ce(ep_group_t g, const ep_combine_args_t *a);

#endif
