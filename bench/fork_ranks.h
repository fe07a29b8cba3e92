/* One process per GPU for the main job: fork before any CUDA call in this process, run fn(rank, ctx) in
 * each child, wait for all. Returns 1 if any rank failed. */
#ifndef EP_BENCH_FORK_RANKS_H
#define EP_BENCH_FORK_RANKS_H

int bench_fork_ranks(int num_ranks, int (*fn)(int rank, void *ctx), void *ctx);

#endif
