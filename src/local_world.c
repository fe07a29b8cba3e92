/* The registry of in-process groups and their host all-gather (see local_world.h). One mutex guards the
 * registry and every world; the all-gather is a generation barrier: a round completes when its last rank posts,
 * and the next round may only post once every rank has copied the previous one out. */
#define _POSIX_C_SOURCE 200809L
#include "local_world.h"

#include "error.h"
#include "kernels/dev_group.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LOCAL_MAGIC "epcomm-local-id"

struct ep_local_world {
    ep_unique_id_t id;
    int num_ranks;
    int joined[EP_MAX_NVL_RANKS]; /* 1 while the rank is in */
    void *kept[EP_MAX_NVL_RANKS]; /* what ranks that left asked to keep until the last one leaves */
    int members;
    int broken;                   /* a round timed out: every later call fails */
    uint64_t generation;          /* rounds completed */
    int posted[EP_MAX_NVL_RANKS]; /* posted in the current round */
    int num_posted;
    int readers;                  /* ranks still copying out the last completed round */
    unsigned char data[EP_MAX_NVL_RANKS][EP_LOCAL_SLOT_BYTES];
    pthread_cond_t changed;
    struct ep_local_world *next;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static ep_local_world_t *registry;
static uint64_t next_serial;

int ep_local_id_is_local(const ep_unique_id_t *id) {
    return memcmp(id->internal, LOCAL_MAGIC, sizeof(LOCAL_MAGIC)) == 0;
}

void ep_local_id_make(ep_unique_id_t *id) {
    memset(id, 0, sizeof(*id));
    memcpy(id->internal, LOCAL_MAGIC, sizeof(LOCAL_MAGIC));
    pthread_mutex_lock(&registry_lock);
    uint64_t serial = ++next_serial;
    pthread_mutex_unlock(&registry_lock);
    int64_t pid = (int64_t)getpid();
    memcpy(id->internal + 16, &serial, sizeof(serial));
    memcpy(id->internal + 24, &pid, sizeof(pid));
}

static ep_local_world_t *find_world(const ep_unique_id_t *id) {
    for (ep_local_world_t *w = registry; w != NULL; w = w->next)
        if (memcmp(&w->id, id, sizeof(*id)) == 0)
            return w;
    return NULL;
}

static ep_local_world_t *new_world(const ep_unique_id_t *id, int num_ranks) {
    ep_local_world_t *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return NULL;
    w->id = *id;
    w->num_ranks = num_ranks;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->changed, &attr);
    pthread_condattr_destroy(&attr);
    w->next = registry;
    registry = w;
    return w;
}

static ep_status_t join_locked(const ep_unique_id_t *id, int num_ranks, int rank, ep_local_world_t **world) {
    if (num_ranks > EP_MAX_NVL_RANKS)
        return ep_fail(EP_ERROR_UNSUPPORTED, "num_ranks: an in-process group holds at most %d ranks, got %d",
                       EP_MAX_NVL_RANKS, num_ranks);
    ep_local_world_t *w = find_world(id);
    if (w == NULL && (w = new_world(id, num_ranks)) == NULL)
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "in-process group: out of host memory");
    if (w->num_ranks != num_ranks)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "num_ranks: every rank of an in-process group must pass the same value; the group was "
                       "created with %d, got %d",
                       w->num_ranks, num_ranks);
    if (w->joined[rank])
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "rank: rank %d already joined this in-process group", rank);
    w->joined[rank] = 1;
    w->members++;
    *world = w;
    return EP_SUCCESS;
}

ep_status_t ep_local_join(const ep_unique_id_t *id, int num_ranks, int rank, ep_local_world_t **world) {
    pthread_mutex_lock(&registry_lock);
    ep_status_t st = join_locked(id, num_ranks, rank, world);
    pthread_mutex_unlock(&registry_lock);
    return st;
}

int ep_local_leave(ep_local_world_t *w, int rank, void *keep, void **release) {
    if (w == NULL)
        return 0;
    int n = 0;
    pthread_mutex_lock(&registry_lock);
    w->joined[rank] = 0;
    w->kept[rank] = keep;
    if (--w->members == 0) {
        for (int r = 0; r < w->num_ranks; r++)
            if (w->kept[r] != NULL)
                release[n++] = w->kept[r];
        for (ep_local_world_t **p = &registry; *p != NULL; p = &(*p)->next) {
            if (*p == w) {
                *p = w->next;
                break;
            }
        }
        pthread_cond_destroy(&w->changed);
        free(w);
    }
    pthread_mutex_unlock(&registry_lock);
    return n;
}

static struct timespec deadline_after(int64_t timeout_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(timeout_ms / 1000);
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* Marks the world broken and names the ranks that had not posted this round. */
static ep_status_t fail_missing(ep_local_world_t *w, int rank, int64_t timeout_ms, const char *what) {
    char missing[64] = "";
    size_t used = 0;
    for (int r = 0; r < w->num_ranks && used + 4 < sizeof(missing); r++)
        if (!w->posted[r])
            used += (size_t)snprintf(missing + used, sizeof(missing) - used, "%s%d", used ? ", " : "", r);
    w->broken = 1;
    pthread_cond_broadcast(&w->changed);
    return ep_fail(EP_ERROR_TIMEOUT, "%s: rank %d waited %lld ms for rank(s) %s of the in-process group", what, rank,
                   (long long)timeout_ms, missing);
}

static ep_status_t allgather_locked(ep_local_world_t *w, int rank, const void *mine, size_t bytes, void *all,
                                    int64_t timeout_ms, const char *what) {
    struct timespec deadline = deadline_after(timeout_ms);
    while (w->readers > 0 && !w->broken) /* the previous round is still being copied out */
        if (pthread_cond_timedwait(&w->changed, &registry_lock, &deadline) == ETIMEDOUT)
            return fail_missing(w, rank, timeout_ms, what);
    if (w->broken)
        return ep_fail(EP_ERROR_GROUP_FAILED, "%s: an earlier exchange of this in-process group timed out", what);
    memcpy(w->data[rank], mine, bytes);
    w->posted[rank] = 1;
    uint64_t round = w->generation;
    if (++w->num_posted == w->num_ranks) {
        w->generation++;
        w->num_posted = 0;
        memset(w->posted, 0, sizeof(w->posted));
        w->readers = w->num_ranks;
        pthread_cond_broadcast(&w->changed);
    }
    while (w->generation == round && !w->broken)
        if (pthread_cond_timedwait(&w->changed, &registry_lock, &deadline) == ETIMEDOUT && w->generation == round)
            return fail_missing(w, rank, timeout_ms, what);
    if (w->generation == round)
        return ep_fail(EP_ERROR_GROUP_FAILED, "%s: another rank of this in-process group timed out", what);
    for (int r = 0; r < w->num_ranks; r++)
        memcpy((unsigned char *)all + (size_t)r * bytes, w->data[r], bytes);
    if (--w->readers == 0)
        pthread_cond_broadcast(&w->changed);
    return EP_SUCCESS;
}

ep_status_t ep_local_allgather(ep_local_world_t *w, int rank, const void *mine, size_t bytes, void *all,
                               int64_t timeout_ms, const char *what) {
    if (bytes > EP_LOCAL_SLOT_BYTES)
        return ep_fail(EP_ERROR_INTERNAL, "%s: %zu bytes exceed the in-process exchange slot (%d)", what, bytes,
                       EP_LOCAL_SLOT_BYTES);
    pthread_mutex_lock(&registry_lock);
    ep_status_t st = allgather_locked(w, rank, mine, bytes, all, timeout_ms, what);
    pthread_mutex_unlock(&registry_lock);
    return st;
}
