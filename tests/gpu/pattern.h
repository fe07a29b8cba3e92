/* Test kernels for the group test: rank- and slot-tagged patterns written into peers' windows. */
#ifndef EP_TEST_PATTERN_H
#define EP_TEST_PATTERN_H

#include "kernels/dev_group.h"

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    unsigned long long mismatches;
    unsigned long long first_index; /* word index within the slot of the first mismatch */
    int first_src;
    uint32_t first_got, first_want;
} pattern_report_t;

/* Rank `g->rank` writes slot_bytes of pattern(seed, src=rank, dst=p, i) into slot `rank` of every peer p's
 * data buffer (window + EP_CTRL_BYTES). */
cudaError_t pattern_write(const ep_dev_group_t *g, size_t slot_bytes, uint64_t seed, cudaStream_t s);
/* Checks every slot of the local data buffer against pattern(seed, src, dst=rank, i); report in device mem. */
cudaError_t pattern_check(const ep_dev_group_t *g, size_t slot_bytes, uint64_t seed, pattern_report_t *report,
                          cudaStream_t s);
/* Fills the local data buffer with a poison value. */
cudaError_t pattern_poison(const ep_dev_group_t *g, size_t bytes, cudaStream_t s);

/* Spins for `delay_ms` on the device, then copies `bytes` from src to dst: a slow producer, to show that a
 * consumer ordered after it (by an event) really waits. */
cudaError_t test_delay_copy(void *dst, const void *src, size_t bytes, int delay_ms, cudaStream_t s);

/* A compute-bound kernel on every SM (`blocks` blocks, ~`iters` dependent FMAs per thread): its run time
 * shows whether other kernels hold SMs meanwhile. */
cudaError_t test_busy_kernel(float *sink, int blocks, int iters, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
