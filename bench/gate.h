/* Benchmark kernels. A launch gate for latency benchmarks: a one-thread kernel that holds its stream until
 * the host opens the gate, so that everything enqueued behind it runs back to back, free of host launch
 * gaps. And a fill of synthetic expert outputs. */
#ifndef EP_BENCH_GATE_H
#define EP_BENCH_GATE_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Blocks `stream` until *gate >= ticket (gate: host-mapped memory, device pointer), or 2 s pass. */
cudaError_t bench_gate_launch(const volatile uint32_t *gate, uint32_t ticket, cudaStream_t stream);

/* Fills n bf16 values with hashed values, uniform in (-scale, scale). */
cudaError_t bench_fill_bf16(uint16_t *x, size_t n, uint32_t seed, float scale, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
