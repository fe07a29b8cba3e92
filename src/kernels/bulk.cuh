/* Bulk asynchronous copies (sm_90 `cp.async.bulk`, the 1-D form of the Tensor Memory Accelerator): one thread
 * asks the SM's copy unit to move a 16-byte-aligned run of bytes global -> shared (completion counted on an
 * mbarrier) or shared -> global (completion tracked by bulk groups). The global side may be a peer GPU's memory
 * mapped into this one's address space, so a row staged once in shared memory can be stored to several ranks
 * without the threads holding it in registers. */
#ifndef EP_BULK_CUH
#define EP_BULK_CUH

#include <stdint.h>

__device__ __forceinline__ uint32_t ep_smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* An mbarrier that one thread arrives on (with the expected bytes), the copy unit completes. */
__device__ __forceinline__ void ep_mbar_init(uint64_t *bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(ep_smem_addr(bar)) : "memory");
}

/* Makes barrier initialisation visible to the copy unit (the async proxy). */
__device__ __forceinline__ void ep_mbar_init_fence(void) {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void ep_mbar_expect_bytes(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(ep_smem_addr(bar)), "r"(bytes)
                 : "memory");
}

/* Waits until the barrier's phase `parity` has completed (the bytes of that use have all landed). */
__device__ __forceinline__ void ep_mbar_wait(uint64_t *bar, uint32_t parity) {
    asm volatile("{\n"
                 ".reg .pred done;\n"
                 "wait_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait_%=;\n"
                 "}" ::"r"(ep_smem_addr(bar)),
                 "r"(parity)
                 : "memory");
}

/* global -> shared; `bytes` a multiple of 16, both addresses 16-byte aligned. */
__device__ __forceinline__ void ep_bulk_load(void *smem, const void *gmem, uint32_t bytes, uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     ep_smem_addr(smem)),
                 "l"(gmem), "r"(bytes), "r"(ep_smem_addr(bar))
                 : "memory");
}

/* shared -> global (local or a peer's); tracked by the bulk group of the next ep_bulk_commit. */
__device__ __forceinline__ void ep_bulk_store(void *gmem, const void *smem, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem), "r"(ep_smem_addr(smem)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void ep_bulk_commit(void) {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

/* Waits until at most N committed groups still read their shared memory (so older buffers can be reused). */
template <int N> __device__ __forceinline__ void ep_bulk_wait_read(void) {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

/* Waits until every committed group has completed its writes, then orders them (async proxy) before this
 * thread's later ordinary memory operations, such as the flag that tells peers the rows are there. */
__device__ __forceinline__ void ep_bulk_wait_all(void) {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

#endif
