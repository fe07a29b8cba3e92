/* The host's reading of the device error record (ep_group_take_device_error), host only: the device claims the
 * record, writes the details, then publishes the status; the host must report the details, never a half-written
 * record (which read as "timed out in stage 'unknown stage' waiting for rank 0"). */
#define _POSIX_C_SOURCE 200809L
#include "error.h"
#include "group.h"
#include "tcheck.h"

#include <pthread.h>
#include <time.h>

static void fill_timeout(volatile ep_dev_error_t *e) {
    e->stage = EP_STAGE_GROUP_BARRIER;
    e->rank = 2;
    e->peer = 3;
    e->detail = 7;
    e->waited_ns = 1500000000ull;
}

/* A group with nothing but its host-mapped record, zeroed. */
static void fake_group(struct ep_group *g, ep_mapped_t *mapped) {
    memset(mapped, 0, sizeof(*mapped));
    memset(g, 0, sizeof(*g));
    g->mapped_host = mapped;
}

static void published_record_is_reported(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_SUCCESS);
    fill_timeout(&mapped.error);
    mapped.error.status = EP_ERROR_TIMEOUT;
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_TIMEOUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'group barrier' waiting for rank 3 (epoch 7)");
    TCHECK_EQ_INT(g.failed, EP_ERROR_TIMEOUT);
}

/* Plays the device: the details and then the status land a few milliseconds after the claim. */
static void *publish_later(void *p) {
    volatile ep_dev_error_t *e = p;
    struct timespec nap = {0, 5000000};
    nanosleep(&nap, NULL);
    fill_timeout(e);
    __atomic_store_n(&e->status, EP_ERROR_TIMEOUT, __ATOMIC_RELEASE);
    return NULL;
}

static void claimed_record_is_read_once_published(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    mapped.error.status = EP_DEV_ERROR_WRITING;
    pthread_t t;
    pthread_create(&t, NULL, publish_later, &mapped.error);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_TIMEOUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "waiting for rank 3");
    pthread_join(t, NULL);
}

static void record_never_published_is_an_internal_error(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    mapped.error.status = EP_DEV_ERROR_WRITING;
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_INTERNAL);
    TCHECK_STR_CONTAINS(ep_last_error(), "did not finish");
}

/* ep_flag_overrun's record: bad input naming the peer that ran ahead, not a timeout. */
static void overrun_record_is_reported_as_such(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    mapped.error.stage = EP_STAGE_LL_DISPATCH_RECV;
    mapped.error.rank = 0;
    mapped.error.peer = 2;
    mapped.error.detail = (9ull << 32) | 8;
    mapped.error.status = EP_ERROR_DEVICE_INPUT;
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_DEVICE_INPUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'low-latency dispatch (receive)': rank 2 had already sent a later "
                                         "call's data (epoch 9, this call's 8)");
    TCHECK(strstr(ep_last_error(), "timed out") == NULL, "not a timeout: %s", ep_last_error());
    TCHECK_EQ_INT(g.failed, EP_ERROR_DEVICE_INPUT); /* unlike bad expert ids, this one fails the group */
    fake_group(&g, &mapped);
    mapped.error.stage = EP_STAGE_LL_COMBINE_RECV;
    mapped.error.peer = 1;
    mapped.error.detail = (5ull << 32) | 4;
    mapped.error.status = EP_ERROR_DEVICE_INPUT;
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_DEVICE_INPUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'low-latency combine (receive)': rank 1 had already sent");
}

int main(void) {
    TRUN(published_record_is_reported);
    TRUN(claimed_record_is_read_once_published);
    TRUN(record_never_published_is_an_internal_error);
    TRUN(overrun_record_is_reported_as_such);
    return TDONE();
}
