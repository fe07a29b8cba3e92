/* The GPU part of the main job (grows as the GPU modes land): group bring-up on every GPU, one process
 * each, and the cost of a device barrier. */
#define _POSIX_C_SOURCE 200809L
#include "demo.h"
#include "epcomm.h"
#include "fork_ranks.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int demo_gpu_count(void) {
    pid_t pid = fork();
    if (pid == 0) {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess)
            n = 0;
        _exit(n > 100 ? 100 : n);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
        return 0;
    return WEXITSTATUS(status);
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int group_worker(int rank, int num_ranks, const ep_unique_id_t *id) {
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = 64u << 20;
    ep_group_t g = NULL;
    double t0 = now_us();
    if (ep_group_create(id, num_ranks, rank, rank, &cfg, &g) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, ep_last_error());
        return 1;
    }
    double create_ms = (now_us() - t0) / 1e3;
    const int n = 1000;
    int bad = ep_group_barrier(g, NULL) != EP_SUCCESS || ep_group_synchronize(g, NULL) != EP_SUCCESS;
    t0 = now_us();
    for (int i = 0; i < n && !bad; i++)
        bad = ep_group_barrier(g, NULL) != EP_SUCCESS;
    bad = bad || ep_group_synchronize(g, NULL) != EP_SUCCESS;
    double per_us = (now_us() - t0) / n;
    if (bad)
        fprintf(stderr, "rank %d: %s\n", rank, ep_last_error());
    if (rank == 0 && !bad)
        printf("  group of %d GPUs: created in %.0f ms; device barrier %.2f us (mean over %d back to back)\n",
               num_ranks, create_ms, per_us, n);
    bad |= ep_group_destroy(g) != EP_SUCCESS;
    return bad;
}

typedef struct {
    int num_ranks;
    const ep_unique_id_t *id;
} group_fork_ctx_t;

static int group_rank_main(int rank, void *arg) {
    const group_fork_ctx_t *f = arg;
    return group_worker(rank, f->num_ranks, f->id);
}

int demo_gpu_group(int num_gpus) {
    ep_unique_id_t id;
    if (ep_get_unique_id(&id) != EP_SUCCESS) {
        fprintf(stderr, "ep_get_unique_id: %s\n", ep_last_error());
        return 1;
    }
    group_fork_ctx_t fc = {num_gpus, &id};
    int failed = bench_fork_ranks(num_gpus, group_rank_main, &fc);
    printf("  group check on %d GPUs: %s\n", num_gpus, failed ? "FAILED" : "ok");
    return failed;
}
