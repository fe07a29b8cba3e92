/* The host's checks of a low-latency handle before anything is launched, host only (a group with nothing but
 * its host-mapped error record): a handle whose routing was overwritten (two later dispatches, a normal-mode
 * call or clean_low_latency_buffer) is refused as stale by its hooks and by combine; a combine hook two
 * combines late is refused; a second combine while the first waits for its hook is refused. */
#include "error.h"
#include "group.h"
#include "ll.h"
#include "tcheck.h"

typedef struct {
    ep_mapped_t mapped;
    struct ep_group g;
    struct ep_ll_handle h;
} fake_t;

/* A healthy group that has made `dispatches` low-latency dispatches, and a handle of the first of them. */
static void fake(fake_t *f, uint64_t dispatches) {
    memset(f, 0, sizeof(*f));
    f->g.mapped_host = &f->mapped;
    f->g.num_ranks = 2;
    f->g.ll_seq = dispatches;
    f->h.group = &f->g;
    f->h.dispatch.num_experts = 2;
}

static void stale_after_two_later_dispatches(void) {
    fake_t f;
    ep_low_latency_combine_args_t args = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
    fake(&f, 3); /* the handle's dispatch and two more: its half was reused */
    TCHECK_EQ_INT(ep_low_latency_combine(&f.g, &args, &f.h, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stale: 2 later low-latency dispatches have reused its buffer half");
    f.h.dispatch_recv_pending = 1;
    TCHECK_EQ_INT(ep_low_latency_dispatch_hook(&f.g, &f.h, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stale");
}

static void current_after_one_later_dispatch(void) {
    fake_t f;
    fake(&f, 2); /* one later dispatch: the other half, so the handle is still good */
    TCHECK_EQ_INT(ep_low_latency_combine(&f.g, NULL, &f.h, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "args"); /* got past the handle checks to the arguments */
}

static void stale_after_the_window_was_reused(void) {
    fake_t f;
    ep_low_latency_combine_args_t args = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
    fake(&f, 1);
    f.g.ll_window_gen = 1; /* a normal-mode call or clean_low_latency_buffer since the dispatch */
    TCHECK_EQ_INT(ep_low_latency_combine(&f.g, &args, &f.h, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "clean_low_latency_buffer has reused the buffer");
}

static void second_combine_while_the_first_waits_for_its_hook(void) {
    fake_t f;
    ep_low_latency_combine_args_t args = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
    fake(&f, 1);
    f.h.combine_recv_pending = 1;
    TCHECK_EQ_INT(ep_low_latency_combine(&f.g, &args, &f.h, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "previous combine's receive hook has not run yet");
}

static void combine_hook_two_combines_late(void) {
    fake_t f;
    fake(&f, 1);
    f.h.combine_recv_pending = 1;
    f.h.combine_seq = 0;
    f.g.ll_combine_seq = 3; /* this combine and two more: its staging half was reused */
    TCHECK_EQ_INT(ep_low_latency_combine_hook(&f.g, &f.h, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stale: 2 later low-latency combines have reused its staging half");
}

int main(void) {
    TRUN(stale_after_two_later_dispatches);
    TRUN(current_after_one_later_dispatch);
    TRUN(stale_after_the_window_was_reused);
    TRUN(second_combine_while_the_first_waits_for_its_hook);
    TRUN(combine_hook_two_combines_late);
    return TDONE();
}
