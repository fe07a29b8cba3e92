/* The low-latency benchmark (PERF.md): dispatch (FP8) and combine latency per call, beside an NCCL
 * all-to-all of the same bytes, in one run, one process per GPU. */
#ifndef EP_BENCH_LL_H
#define EP_BENCH_LL_H

typedef struct {
    int ranks;
    int hidden, topk, experts;
    const char *jsonl, *machine, *gpu, *commit; /* the last three recorded in JSONL */
} bench_ll_args_t;

int bench_ll_run(const bench_ll_args_t *a);

#endif
