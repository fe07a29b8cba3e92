/* The high-throughput benchmark (PERF.md): our dispatch and combine beside an NCCL all-to-all of the same
 * bytes, in one run, one process per GPU. Rows go to a table on stdout and to JSONL. */
#ifndef EP_BENCH_HT_H
#define EP_BENCH_HT_H

typedef struct {
    int ranks;
    int hidden, topk, experts;
    int quick;           /* fewer configurations */
    const char *jsonl;   /* append results here, or NULL */
    const char *machine; /* recorded in JSONL */
    const char *gpu;     /* the GPU's name, recorded in JSONL */
    const char *commit;
} bench_ht_args_t;

int bench_ht_run(const bench_ht_args_t *a);

#endif
