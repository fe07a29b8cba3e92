/* epcomm-bench: the main job. With GPUs it brings a group up on all of them and measures what the GPU side
 * offers so far; it always runs the MoE round trip on the CPU reference and checks it.
 *
 *   epcomm-bench [--gpus G] [--quick] [--jsonl FILE] [--machine NAME] [--gpu NAME] [--commit SHA] [--cpu-only]
 *                [--only ht|ll] [--ranks R] [--tokens N] [--hidden H] [--topk K] [--experts E] [--seed S]
 * --gpus: GPUs to use (default: all); --machine, --gpu, --commit: recorded in the JSONL; --ranks etc.: the CPU
 * reference's simulated group. */

typedef struct {
    int gpus, quick, cpu_only;
    const char *jsonl, *machine, *gpu, *commit, *only;
} gpu_opts_t;
#include "bench_ht.h"
#include "bench_ll.h"
#include "demo.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_args(int argc, char **argv, demo_args_t *a, gpu_opts_t *o) {
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(k, "--cpu-only") == 0 || strcmp(k, "--quick") == 0) {
            *(k[2] == 'c' ? &o->cpu_only : &o->quick) = 1;
            continue;
        }
        if (v == NULL) {
            fprintf(stderr, "missing value after %s\n", k);
            return 1;
        }
        if (strcmp(k, "--gpus") == 0)
            o->gpus = atoi(v);
        else if (strcmp(k, "--only") == 0) {
            if (strcmp(v, "ht") != 0 && strcmp(v, "ll") != 0) {
                fprintf(stderr, "--only: expected ht or ll, got %s\n", v);
                return 1;
            }
            o->only = v;
        }
        else if (strcmp(k, "--jsonl") == 0)
            o->jsonl = v;
        else if (strcmp(k, "--machine") == 0)
            o->machine = v;
        else if (strcmp(k, "--gpu") == 0)
            o->gpu = v;
        else if (strcmp(k, "--commit") == 0)
            o->commit = v;
        else if (strcmp(k, "--ranks") == 0)
            a->ranks = atoi(v);
        else if (strcmp(k, "--tokens") == 0)
            a->tokens = atoi(v);
        else if (strcmp(k, "--hidden") == 0)
            a->hidden = atoi(v);
        else if (strcmp(k, "--topk") == 0)
            a->topk = atoi(v);
        else if (strcmp(k, "--experts") == 0)
            a->experts = atoi(v);
        else if (strcmp(k, "--seed") == 0)
            a->seed = strtoull(v, NULL, 10);
        else {
            fprintf(stderr, "unknown option %s\n", k);
            return 1;
        }
        i++;
    }
    if (a->ranks < 1 || a->ranks > 64 || a->tokens < 0 || a->hidden < 128 || a->hidden % 128 || a->topk < 1 ||
        a->topk > 32 || a->experts < a->ranks || a->experts % a->ranks || a->topk > a->experts) {
        fprintf(stderr, "invalid sizes: need 1 <= ranks, hidden %% 128 == 0, 1 <= topk <= min(32, experts), "
                        "experts %% ranks == 0\n");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    demo_args_t a = {4, 512, 7168, 8, 256, 1};
    gpu_opts_t o = {0, 0, 0, NULL, NULL, NULL, NULL, NULL};
    if (parse_args(argc, argv, &a, &o))
        return 2;
    int failed = 0;
    int gpus = o.cpu_only ? 0 : demo_gpu_count();
    if (o.gpus > 0 && o.gpus < gpus)
        gpus = o.gpus;
    const int one_rank = o.gpus == 1 && gpus >= 1; /* asked for: kernel cost with every row to itself */
    if (one_rank) {
        printf("epcomm-bench: --gpus 1: one rank, every row goes to itself (kernel cost without NVLink; "
               "the NCCL rows are local copies)\n");
    } else if (gpus < 2) {
        printf("epcomm-bench: %s: no GPU run; running the CPU reference instead.\n",
               o.cpu_only  ? "--cpu-only"
               : gpus == 1 ? "only 1 GPU found (a group needs 2)"
                           : "no CUDA GPU found");
    } else if (gpus > 8) {
        printf("epcomm-bench: %d GPUs; one NVLink group holds at most 8, using 8.\n", gpus);
        gpus = 8;
    }
    if (gpus >= 2 || one_rank) {
        printf("epcomm-bench: %d GPUs: group check, then the high-throughput and low-latency benchmarks, then the "
               "CPU reference.\n",
               gpus);
        failed |= demo_gpu_group(gpus);
        bench_ht_args_t b = {gpus, a.hidden, a.topk, a.experts, o.quick, o.jsonl, o.machine, o.gpu, o.commit};
        if (o.only == NULL || strcmp(o.only, "ht") == 0)
            failed |= bench_ht_run(&b);
        bench_ll_args_t ll = {gpus, a.hidden, a.topk, a.experts, o.jsonl, o.machine, o.gpu, o.commit};
        if (o.only == NULL || strcmp(o.only, "ll") == 0)
            failed |= bench_ll_run(&ll);
    }
    failed |= demo_ref_round_trip(&a);
    printf("epcomm-bench: %s\n", failed ? "FAILED" : "all checks passed");
    return failed ? 1 : 0;
}
