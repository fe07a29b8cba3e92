/* Multi-process GPU tests: one process per GPU, forked before any CUDA call, with the NCCL unique id made
 * in the parent and inherited by the children. The parent kills every child if one case overruns its time
 * limit, so a hang is reported as a failure naming the ranks that did not finish.
 *
 * With EPCOMM_TEST_LOCAL=1 the ranks are threads of one process in an in-process group instead
 * (ep_get_local_unique_id), rank r on device r % (devices): several ranks share a GPU, each in its own green
 * context (an equal share of the SMs), so a one-GPU machine runs the multi-rank logic at any R. Rows then move
 * through one GPU's memory, not NVLink: this checks correctness, not speed. A hang ends the whole program. */
#ifndef EP_TEST_MP_H
#define EP_TEST_MP_H

#include "epcomm.h"

#include <stddef.h>

typedef int (*mp_rank_fn)(int rank, int num_ranks, const ep_unique_id_t *id, void *arg);

/* Runs fn on num_ranks processes (rank r uses CUDA device r). Returns 0 when every rank returned 0, or when
 * EPCOMM_TEST_ONLY leaves the case out. */
int mp_run(const char *case_name, int num_ranks, mp_rank_fn fn, void *arg, int timeout_s);

/* The value after `flag` on the command line (e.g. "--ranks 4"), or `fallback`. */
int mp_arg_int(int argc, char **argv, const char *flag, int fallback);

/* A case's expert count rounded up to a multiple of the rank count (unchanged at R = 2, 4, 8 for the counts
 * the tests use), so that every case also runs at R = 3, 5, 6, 7. */
int mp_experts(int experts, int num_ranks);

/* Whether ranks are threads (EPCOMM_TEST_LOCAL=1). */
int mp_local(void);
/* The CUDA device rank `rank` drives, and making it (and the rank's green context) current on this thread:
 * call before any CUDA work of the rank. */
int mp_device(int rank);
void mp_enter_device(int rank);
/* Device allocations for tests. With ranks as threads they are stream-ordered on the thread's stream, since a
 * plain cudaFree waits for the whole GPU, the other ranks' kernels included (which may be waiting for this
 * rank); the caller has synchronized the work that used the memory. */
int mp_malloc(void **ptr, size_t bytes);
void mp_free(void *ptr);

/* Whether the last error is a timeout naming rank `peer` and containing `stage` (rank 0 prints it): 0, or 1
 * after reporting the message. */
int mp_check_timeout_message(int rank, int peer, const char *stage);

/* Per-process failure reporting: prints "[rank r] case: message" and counts it. */
#define MP_FAIL(rank, ...)                                                                                             \
    do {                                                                                                               \
        fprintf(stderr, "[rank %d] %s:%d: ", (rank), __FILE__, __LINE__);                                              \
        fprintf(stderr, __VA_ARGS__);                                                                                  \
        fprintf(stderr, "\n");                                                                                         \
        failures++;                                                                                                    \
    } while (0)

#define MP_EXPECT_STATUS(rank, call, want)                                                                             \
    do {                                                                                                               \
        ep_status_t st_ = (call);                                                                                      \
        if (st_ != (want))                                                                                             \
            MP_FAIL(rank, "%s returned %s, expected %s; message: %s", #call, ep_status_string(st_),                    \
                    ep_status_string(want), ep_last_error());                                                          \
    } while (0)

#endif
