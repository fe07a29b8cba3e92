/* The in-process group registry (src/local_world.c), host only: ranks as threads meet by id, exchange values
 * in rank order over many rounds, and a rank that never arrives makes the others fail with a timeout naming it
 * instead of hanging. */
#define _POSIX_C_SOURCE 200809L
#include "error.h"
#include "kernels/dev_group.h"
#include "local_world.h"
#include "tcheck.h"

#include <pthread.h>
#include <stdint.h>

#define RANKS  4
#define ROUNDS 200

typedef struct {
    const ep_unique_id_t *id;
    int rank, num_ranks, rounds;
    int64_t timeout_ms;
    int bad_rounds;     /* rounds whose gathered values were wrong */
    ep_status_t status; /* of the first failing call */
    char message[256];
    int released; /* times the last rank to leave handed this worker's kept pointer back */
} worker_t;

static void *worker(void *p) {
    worker_t *w = p;
    ep_local_world_t *world = NULL;
    w->status = ep_local_join(w->id, w->num_ranks, w->rank, &world);
    for (int round = 0; w->status == EP_SUCCESS && round < w->rounds; round++) {
        /* Values of varying size per round, so a stale slot would show. */
        uint32_t mine[8], all[RANKS * 8];
        size_t n = 1 + (size_t)round % 8;
        for (size_t i = 0; i < n; i++)
            mine[i] = (uint32_t)(w->rank * 1000000 + round * 10 + (int)i);
        w->status = ep_local_allgather(world, w->rank, mine, n * 4, all, w->timeout_ms, "test exchange");
        for (int r = 0; w->status == EP_SUCCESS && r < w->num_ranks; r++)
            for (size_t i = 0; i < n; i++)
                if (all[(size_t)r * n + i] != (uint32_t)(r * 1000000 + round * 10 + (int)i)) {
                    w->bad_rounds++;
                    break;
                }
    }
    if (w->status != EP_SUCCESS)
        snprintf(w->message, sizeof(w->message), "%s", ep_last_error());
    void *release[EP_MAX_NVL_RANKS];
    int n = ep_local_leave(world, w->rank, w, release);
    for (int i = 0; i < n; i++)
        ((worker_t *)release[i])->released++;
    return NULL;
}

/* Runs `num_ranks` workers, of which `present` take part (the others never join). */
static void run(const ep_unique_id_t *id, int num_ranks, int present, int rounds, int64_t timeout_ms, worker_t *w) {
    pthread_t t[RANKS];
    for (int r = 0; r < present; r++) {
        w[r] = (worker_t){id, r, num_ranks, rounds, timeout_ms, 0, EP_SUCCESS, "", 0};
        pthread_create(&t[r], NULL, worker, &w[r]);
    }
    for (int r = 0; r < present; r++)
        pthread_join(t[r], NULL);
}

static void values_arrive_in_rank_order_every_round(void) {
    ep_unique_id_t id;
    ep_local_id_make(&id);
    TCHECK(ep_local_id_is_local(&id), "a local id is recognized");
    worker_t w[RANKS];
    run(&id, RANKS, RANKS, ROUNDS, 10000, w);
    for (int r = 0; r < RANKS; r++) {
        TCHECK(w[r].status == EP_SUCCESS, "rank %d: %s", r, w[r].message);
        TCHECK_EQ_INT(w[r].bad_rounds, 0);
        TCHECK_EQ_INT(w[r].released, 1); /* kept until the last rank left, then handed back once */
    }
}

static void missing_rank_is_named(void) {
    ep_unique_id_t id;
    ep_local_id_make(&id);
    worker_t w[RANKS];
    run(&id, RANKS, RANKS - 1, 1, 300, w); /* rank 3 never comes */
    int timed_out = 0; /* the first rank to time out reports it; the others then see the group broken */
    for (int r = 0; r < RANKS - 1; r++) {
        TCHECK(w[r].status == EP_ERROR_TIMEOUT || w[r].status == EP_ERROR_GROUP_FAILED, "rank %d: status %d", r,
               (int)w[r].status);
        if (w[r].status == EP_ERROR_TIMEOUT) {
            TCHECK_STR_CONTAINS(w[r].message, "rank(s) 3");
            timed_out++;
        }
    }
    TCHECK(timed_out > 0, "some rank reports the timeout");
}

static void bad_joins_are_refused(void) {
    ep_unique_id_t id;
    ep_local_id_make(&id);
    ep_local_world_t *a = NULL, *b = NULL;
    TCHECK_EQ_INT(ep_local_join(&id, 2, 0, &a), EP_SUCCESS);
    TCHECK_EQ_INT(ep_local_join(&id, 2, 0, &b), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "already joined");
    TCHECK_EQ_INT(ep_local_join(&id, 3, 1, &b), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "num_ranks");
    ep_unique_id_t big;
    ep_local_id_make(&big);
    TCHECK_EQ_INT(ep_local_join(&big, EP_MAX_NVL_RANKS + 1, 0, &b), EP_ERROR_UNSUPPORTED);
    TCHECK_STR_CONTAINS(ep_last_error(), "num_ranks: an in-process group holds at most 8 ranks, got 9");
    void *release[EP_MAX_NVL_RANKS];
    TCHECK_EQ_INT(ep_local_leave(a, 0, NULL, release), 0);
    ep_unique_id_t nccl_like;
    memset(&nccl_like, 7, sizeof(nccl_like));
    TCHECK(!ep_local_id_is_local(&nccl_like), "an NCCL id is not local");
}

static void oversized_and_broken_exchanges_fail(void) {
    ep_unique_id_t id;
    ep_local_id_make(&id);
    ep_local_world_t *w = NULL;
    TCHECK_EQ_INT(ep_local_join(&id, 2, 0, &w), EP_SUCCESS);
    unsigned char big[EP_LOCAL_SLOT_BYTES + 1] = {0}, all[2 * (EP_LOCAL_SLOT_BYTES + 1)];
    TCHECK_EQ_INT(ep_local_allgather(w, 0, big, sizeof(big), all, 1000, "big exchange"), EP_ERROR_INTERNAL);
    TCHECK_STR_CONTAINS(ep_last_error(), "big exchange: 513 bytes exceed the in-process exchange slot (512)");
    /* Rank 1 never joins: the first exchange times out naming it, and every later one fails at once. */
    TCHECK_EQ_INT(ep_local_allgather(w, 0, big, 4, all, 50, "first"), EP_ERROR_TIMEOUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "first: rank 0 waited 50 ms for rank(s) 1");
    TCHECK_EQ_INT(ep_local_allgather(w, 0, big, 4, all, 10000, "second"), EP_ERROR_GROUP_FAILED);
    TCHECK_STR_CONTAINS(ep_last_error(), "second: an earlier exchange of this in-process group timed out");
    void *release[EP_MAX_NVL_RANKS];
    TCHECK_EQ_INT(ep_local_leave(w, 0, NULL, release), 0);
}

int main(void) {
    TRUN(values_arrive_in_rank_order_every_round);
    TRUN(missing_rank_is_named);
    TRUN(bad_joins_are_refused);
    TRUN(oversized_and_broken_exchanges_fail);
    return TDONE();
}
