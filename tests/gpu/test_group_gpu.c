/* Group tests on real GPUs, one process per GPU:
 *  - pattern_exchange: every rank writes a rank- and slot-tagged random pattern into every peer's buffer,
 *    barriers, and checks all it received, many rounds with fresh seeds;
 *  - barrier_loop: many back-to-back barriers (and their cost);
 *  - missing_peer_times_out: a rank that never arrives makes the barrier fail with EP_ERROR_TIMEOUT naming it,
 *    destroy while the barrier is in flight says EP_ERROR_IN_PROGRESS, the group stays failed, and every rank
 *    (the absent one too) can destroy it without hanging;
 *  - foreign_stream_is_rejected: a stream of another device is an argument error, and nothing is launched;
 *  - mismatched_config_is_an_error: ranks passing different buffer sizes all get an error naming the field;
 *  - from_existing_comm: a group over a communicator the caller made.
 * Usage: test_group_gpu --ranks N [--rounds K] */
#define _POSIX_C_SOURCE 200809L
#include "group.h"
#include "mp.h"
#include "pattern.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int g_rounds = 40;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static ep_status_t create(int rank, int num_ranks, const ep_unique_id_t *id, size_t nvl_bytes, int64_t timeout_ms,
                          ep_group_t *g) {
    mp_enter_device(rank); /* this process's device, for the test's own streams and buffers */
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = nvl_bytes;
    cfg.timeout_ms = timeout_ms;
    return ep_group_create(id, num_ranks, rank, mp_device(rank), &cfg, g);
}

static int pattern_exchange(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    const size_t slot = (size_t)8 << 20;
    ep_group_t g = NULL;
    ep_status_t st = create(rank, num_ranks, id, slot * (size_t)num_ranks, 0, &g);
    if (st != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    pattern_report_t *rep = NULL;
    mp_malloc((void **)&rep, sizeof(*rep));
    for (int round = 0; round < g_rounds && failures == 0; round++) {
        uint64_t seed = 0x1234567ull * (uint64_t)(round + 1) + (uint64_t)time(NULL) * 0; /* same on all ranks */
        seed ^= (uint64_t)round << 40;
        cudaMemsetAsync(rep, 0, sizeof(*rep), s);
        pattern_poison(&g->dev, slot * (size_t)num_ranks, s);
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, s), EP_SUCCESS); /* everyone poisoned before anyone writes */
        pattern_write(&g->dev, slot, seed, s);
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, s), EP_SUCCESS); /* every write landed */
        pattern_check(&g->dev, slot, seed, rep, s);
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, s), EP_SUCCESS); /* everyone checked before the next round */
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS);
        pattern_report_t host;
        cudaMemcpy(&host, rep, sizeof(host), cudaMemcpyDeviceToHost);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess)
            MP_FAIL(rank, "CUDA error in round %d: %s", round, cudaGetErrorString(err));
        else if (host.mismatches)
            MP_FAIL(rank, "round %d: %llu mismatched words; first from rank %d word %llu: got 0x%08x want 0x%08x",
                    round, host.mismatches, host.first_src, host.first_index, host.first_got, host.first_want);
    }
    mp_free(rep);
    cudaStreamDestroy(s);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

static int barrier_loop(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = NULL;
    if (create(rank, num_ranks, id, 1 << 20, 0, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    const int n = 2000;
    MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    double t0 = now_ms();
    for (int i = 0; i < n; i++)
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    double per = (now_ms() - t0) * 1e3 / n;
    uint64_t epoch = 0;
    cudaMemcpy(&epoch, g->barrier_epoch_dev, sizeof(epoch), cudaMemcpyDeviceToHost);
    if (epoch != (uint64_t)n + 1)
        MP_FAIL(rank, "barrier epoch is %llu, expected %d", (unsigned long long)epoch, n + 1);
    if (rank == 0)
        printf("     barrier: %.2f us per barrier over %d barriers (R=%d)\n", per, n, num_ranks);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

/* The last error is a timeout after about timeout_ms naming `peer` and `stage`. */
static int check_timeout(int rank, int peer, const char *stage, double waited, int64_t timeout_ms) {
    int failures = mp_check_timeout_message(rank, peer, stage);
    if (waited < (double)timeout_ms * 0.9 || waited > (double)timeout_ms + 4000)
        MP_FAIL(rank, "timed out after %.0f ms, expected about %lld", waited, (long long)timeout_ms);
    return failures;
}

static int missing_peer(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    const int64_t timeout_ms = num_ranks > 4 ? 4000 : 1500; /* creation at R=8 takes ~2 s */
    const int absent = num_ranks - 1;
    ep_group_t g = NULL;
    if (create(rank, num_ranks, id, 1 << 20, timeout_ms, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    if (rank == absent) {
        struct timespec nap = {(time_t)(2 * timeout_ms + 1000) / 1000, 0};
        nanosleep(&nap, NULL); /* never enters the barrier */
        double t0 = now_ms();
        MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
        if (now_ms() - t0 > (double)timeout_ms + 6000)
            MP_FAIL(rank, "destroy took %.0f ms", now_ms() - t0);
        return failures;
    }
    double t0 = now_ms();
    MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS); /* enqueued; it will time out on the device */
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_ERROR_IN_PROGRESS);
    if (!strstr(ep_last_error(), "in flight"))
        MP_FAIL(rank, "destroy message does not say work is in flight: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_ERROR_TIMEOUT);
    failures += check_timeout(rank, absent, "group barrier", now_ms() - t0, timeout_ms);
    MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_ERROR_TIMEOUT); /* sticky */
    if (!strstr(ep_last_error(), "failed earlier"))
        MP_FAIL(rank, "sticky error message: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

/* A healthy group whose last rank reaches destroy late: the others' handshake times out and destroy says so
 * (naming that rank and the stage) after tearing down locally; the late rank then sees their abort votes and
 * tears down locally without an error. */
static int late_destroy(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    const int64_t timeout_ms = num_ranks > 4 ? 4000 : 1500;
    const int late = num_ranks - 1;
    ep_group_t g = NULL;
    if (create(rank, num_ranks, id, 1 << 20, timeout_ms, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    if (rank == late) {
        struct timespec nap = {(time_t)(2 * timeout_ms + 1000) / 1000, 0};
        nanosleep(&nap, NULL);
        MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
        return failures;
    }
    double t0 = now_ms();
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_ERROR_TIMEOUT);
    failures += check_timeout(rank, late, "destroy handshake", now_ms() - t0, timeout_ms);
    return failures;
}

static int foreign_stream_is_rejected(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = NULL;
    if (create(rank, num_ranks, id, 1 << 20, 0, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    int other = (rank + 1) % num_ranks;
    cudaStream_t s;
    cudaSetDevice(mp_device(other));
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    mp_enter_device(rank);
    MP_EXPECT_STATUS(rank, ep_group_barrier(g, s), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "cuda_stream"))
        MP_FAIL(rank, "message does not name cuda_stream: %s", ep_last_error());
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    /* Nothing was launched: the group still works. */
    MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    cudaSetDevice(mp_device(other));
    cudaStreamDestroy(s);
    mp_enter_device(rank);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

static int mismatched_config(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = NULL;
    size_t bytes = rank == 0 ? (2u << 20) : (1u << 20);
    MP_EXPECT_STATUS(rank, create(rank, num_ranks, id, bytes, 5000, &g), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "config.num_nvl_bytes"))
        MP_FAIL(rank, "message does not name config.num_nvl_bytes: %s", ep_last_error());
    if (g != NULL)
        MP_FAIL(rank, "group set on failure");
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    return failures;
}

static int from_existing_comm(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    mp_enter_device(rank);
    ncclUniqueId nid;
    memcpy(nid.internal, id->internal, sizeof(nid.internal));
    ncclComm_t comm;
    if (ncclCommInitRank(&comm, num_ranks, nid, rank) != ncclSuccess) {
        MP_FAIL(rank, "ncclCommInitRank failed");
        return 1;
    }
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = 1 << 20;
    ep_group_t g = NULL;
    MP_EXPECT_STATUS(rank, ep_group_create_from_comm(comm, rank, &cfg, &g), EP_SUCCESS);
    if (g) {
        int r = -1, n = -1;
        ep_group_rank(g, &r);
        ep_group_size(g, &n);
        if (r != rank || n != num_ranks)
            MP_FAIL(rank, "group reports rank %d of %d", r, n);
        for (int i = 0; i < 10; i++)
            MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    }
    ncclCommDestroy(comm);
    return failures;
}

int main(int argc, char **argv) {
    int ranks = mp_arg_int(argc, argv, "--ranks", 2);
    g_rounds = mp_arg_int(argc, argv, "--rounds", g_rounds);
    int failed = 0;
    failed += mp_run("group.pattern_exchange", ranks, pattern_exchange, NULL, 120) != 0;
    failed += mp_run("group.barrier_loop", ranks, barrier_loop, NULL, 60) != 0;
    failed += mp_run("group.missing_peer_times_out", ranks, missing_peer, NULL, 60) != 0;
    int skipped = 0;
    if (ranks >= 2) {
        failed += mp_run("group.late_destroy_is_reported", ranks, late_destroy, NULL, 60) != 0;
    } else {
        printf("SKIP group.late_destroy_is_reported R=1 (needs 2 ranks)\n");
        skipped++;
    }
    if (ranks >= 2 && mp_device(1) != mp_device(0)) { /* a stream on another rank's GPU */
        failed += mp_run("group.foreign_stream_is_rejected", ranks, foreign_stream_is_rejected, NULL, 60) != 0;
    } else {
        printf("SKIP group.foreign_stream_is_rejected R=%d (needs ranks on two GPUs)\n", ranks);
        skipped++;
    }
    if (ranks >= 2) { /* a config another rank disagrees with */
        failed += mp_run("group.mismatched_config_is_an_error", ranks, mismatched_config, NULL, 60) != 0;
    } else {
        printf("SKIP group.mismatched_config_is_an_error R=1 (needs 2 ranks)\n");
        skipped++;
    }
    if (!mp_local()) { /* NCCL needs a GPU per rank */
        failed += mp_run("group.from_existing_comm", ranks, from_existing_comm, NULL, 60) != 0;
    } else {
        printf("SKIP group.from_existing_comm (an NCCL communicator needs one process per GPU)\n");
        skipped++;
    }
    printf("%d passed, %d failed\n", 7 - skipped - failed, failed);
    return failed ? 1 : 0;
}
