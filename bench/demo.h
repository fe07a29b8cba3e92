/* The parts of the main job. */
#ifndef EP_BENCH_DEMO_H
#define EP_BENCH_DEMO_H

typedef struct {
    int ranks;  /* simulated ranks for the CPU reference */
    int tokens; /* per rank */
    int hidden;
    int topk;
    int experts;
    unsigned long long seed;
} demo_args_t;

/* An MoE round trip on the CPU reference (normal and low-latency modes), checked; prints routing
 * statistics. Returns 0 when every check passed. */
int demo_ref_round_trip(const demo_args_t *a);

/* Number of CUDA devices, asked in a child process so that this process stays free to fork GPU workers. */
int demo_gpu_count(void);
/* Creates a group over `num_gpus` GPUs (one process each), checks a barrier round and reports its latency. */
int demo_gpu_group(int num_gpus);

#endif
