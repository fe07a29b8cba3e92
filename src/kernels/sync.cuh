/* Cross-GPU flag primitives with timeouts. Flags written by one GPU and read by another need system-scope
 * release/acquire; device scope is not enough across NVLink. */
#ifndef EP_SYNC_CUH
#define EP_SYNC_CUH

#include "dev_group.h"

#include <stdint.h>

__device__ __forceinline__ uint64_t ep_globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void ep_store_release_sys(uint64_t *p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* A plain (relaxed) system-scope store: for flags raised right after a __threadfence_system(), which already
 * orders everything before them (one fence instead of one per release store). */
__device__ __forceinline__ void ep_store_relaxed_sys(uint64_t *p, uint64_t v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ep_load_acquire_sys(const uint64_t *p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int32_t ep_load_volatile_i32(const int32_t *p) {
    return *(const volatile int32_t *)p;
}

/* Records the first error of the group; later ones are dropped (the first is the cause). The status is claimed
 * first and published last, so a host that sees it also sees the details. */
__device__ __forceinline__ void ep_record_error(const ep_dev_group_t &g, int32_t status, int stage, int peer,
                                                uint64_t detail, uint64_t waited_ns) {
    if (atomicCAS_system(&g.error->status, 0, EP_DEV_ERROR_WRITING) == 0) {
        g.error->stage = stage;
        g.error->rank = g.rank;
        g.error->peer = peer;
        g.error->detail = detail;
        g.error->waited_ns = waited_ns;
        __threadfence_system();
        atomicExch_system(&g.error->status, status);
    }
}

/* Records bad input (first one wins the details; all are counted). */
__device__ __forceinline__ void ep_record_input_error(ep_dev_input_error_t *err, int op, int kind, int64_t token, int k,
                                                      int64_t value) {
    if (atomicAdd_system(&err->count, 1u) == 0) {
        err->op = op;
        err->kind = kind;
        err->token = token;
        err->k = k;
        err->value = value;
        __threadfence_system();
    }
}

__device__ __forceinline__ uint32_t ep_load_acquire_sys(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* Adds v to a 32-bit counter (another GPU's or this one's) with release semantics at system scope: whatever
 * this thread wrote before, or saw written (e.g. its warp's stores before a __syncwarp), lands first. */
__device__ __forceinline__ void ep_red_add_release_sys(uint32_t *p, uint32_t v) {
    asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

/* One spin of a wait that began at `start`: every 1024 spins, false when the group already recorded an error or
 * the timeout has passed (then recorded, naming `peer` and `stage`, with `detail`). */
__device__ __forceinline__ bool ep_keep_waiting(const ep_dev_group_t &g, uint32_t &spins, uint64_t start, int stage,
                                                int peer, uint64_t detail) {
    if ((++spins & 1023u) != 0)
        return true;
    if (ep_load_volatile_i32(&g.error->status) != 0)
        return false;
    uint64_t waited = ep_globaltimer_ns() - start;
    if (waited <= g.timeout_ns)
        return true;
    ep_record_error(g, EP_DEV_STATUS_TIMEOUT, stage, peer, detail, waited);
    return false;
}

/* Spins until *flag >= target (acquire, system scope). Returns false (and records EP_ERROR_TIMEOUT naming
 * `peer` and `stage`) when the group's timeout passes, or at once if the group already recorded an error, so
 * one failure does not make every later wait sit out its own timeout. */
template <typename T>
__device__ __forceinline__ bool ep_wait_geq(const ep_dev_group_t &g, const T *flag, T target, int stage, int peer) {
    uint64_t start = ep_globaltimer_ns();
    uint32_t spins = 0;
    while (ep_load_acquire_sys(flag) < target)
        if (!ep_keep_waiting(g, spins, start, stage, peer, (uint64_t)target))
            return false;
    return true;
}

__device__ __forceinline__ bool ep_wait_flag_geq(const ep_dev_group_t &g, const uint64_t *flag, uint64_t target,
                                                 int stage, int peer) {
    return ep_wait_geq<uint64_t>(g, flag, target, stage, peer);
}

/* A low-latency flag, epoch << 32 | value: spins until its epoch has reached `epoch`, in wrap-around order (the
 * epochs are 32-bit counts per buffer half, which wrap after 2^32 calls). Returns true with the flag in *seen;
 * false on a timeout (recorded, naming `peer` and `stage`) or at once if the group already recorded an error. */
__device__ __forceinline__ bool ep_wait_epoch(const ep_dev_group_t &g, const uint64_t *flag, uint32_t epoch, int stage,
                                              int peer, uint64_t *seen) {
    uint64_t start = ep_globaltimer_ns();
    uint32_t spins = 0;
    for (;;) {
        const uint64_t v = ep_load_acquire_sys(flag);
        if (ep_epoch_reached((uint32_t)(v >> 32), epoch)) {
            *seen = v;
            return true;
        }
        if (!ep_keep_waiting(g, spins, start, stage, peer, epoch))
            return false;
    }
}

/* Whether a flag seen by ep_wait_epoch is already past this call's `epoch`: `peer` has run a later call on the
 * same buffer half, so this call's data there may be overwritten (more than two low-latency results were alive
 * across the group). Recorded as EP_DEV_STATUS_OVERRUN naming the peer, which fails the group. A best-effort
 * check: made once, when the flag is read; a later call that lands after it is not seen. */
__device__ __forceinline__ bool ep_flag_overrun(const ep_dev_group_t &g, uint64_t flag_value, uint32_t epoch, int stage,
                                                int peer) {
    if ((uint32_t)(flag_value >> 32) == epoch)
        return false;
    ep_record_error(g, EP_DEV_STATUS_OVERRUN, stage, peer, (flag_value >> 32 << 32) | epoch, 0);
    return true;
}

/* Called by thread 0 of every block of a send kernel when the block's stores are issued: the last block to
 * get here (all others' stores fenced before they counted themselves) stores the new epoch and raises
 * `flag_value` in this rank's slot of every rank's flag array at `flags_offset` + parity * R. */
__device__ __forceinline__ void ep_last_block_signal(const ep_dev_group_t &g, uint32_t *done, uint32_t *epoch_word,
                                                     uint32_t epoch, int flags_offset, int parity,
                                                     uint64_t flag_value) {
    __threadfence_system();
    if (atomicAdd(done, 1u) != gridDim.x - 1)
        return;
    *done = 0;
    *epoch_word = epoch;
    __threadfence_system();
    for (int d = 0; d < g.num_ranks; d++)
        ep_store_relaxed_sys((uint64_t *)(g.window[d] + flags_offset) + parity * g.num_ranks + g.rank, flag_value);
}

/* A cross-rank barrier run by one CTA (threads 0..R-1 talk to rank p = threadIdx.x), by epochs: each rank
 * counts completed barriers; barrier n writes n into this rank's slot of every peer's flag array and waits
 * until every slot of its own array reaches n. Flags only grow, so nothing is ever reset and no two barriers
 * can be confused. What this CTA wrote to peers before the call, and what earlier kernels of the stream wrote,
 * lands before the flag (other CTAs of the same kernel are not covered: callers run one CTA). Returns false on
 * timeout (recorded).
 * Each rank also leaves `word` at every peer (slots by epoch parity: a peer can be at most one barrier ahead);
 * a non-zero word is compared with every peer's, and a difference recorded as EP_INPUT_SEND_MISMATCH. The two
 * barriers of a dispatch with a count exchange pass 0, the exchange having compared the call (they still write
 * it, so that a peer comparing at the same barrier sees no stale word); every other barrier names its call
 * (ht_layout.h: EP_HT_SEND_*, EP_BARRIER_PLAIN). */
__device__ __forceinline__ bool ep_cta_barrier(const ep_dev_group_t &g, int stage, uint64_t word) {
    __shared__ uint64_t epoch;
    __shared__ int ok;
    int peer = threadIdx.x;
    if (peer == 0) {
        epoch = *g.barrier_epoch + 1;
        ok = 1;
    }
    __syncthreads();
    if (peer < g.num_ranks) {
        const int half = (int)(epoch & 1) * g.num_ranks;
        *((volatile uint64_t *)(g.window[peer] + EP_CTRL_BARRIER_WORDS) + half + g.rank) = word;
        __threadfence_system();
        uint64_t *remote = (uint64_t *)(g.window[peer] + EP_CTRL_BARRIER_FLAGS) + g.rank;
        ep_store_release_sys(remote, epoch);
        const uint64_t *local = (const uint64_t *)(g.window[g.rank] + EP_CTRL_BARRIER_FLAGS) + peer;
        if (!ep_wait_flag_geq(g, local, epoch, stage, peer)) {
            ok = 0;
        } else if (word != 0 && ep_load_acquire_sys(local) <= epoch + 1) {
            /* A healthy peer is at most one barrier further, and writes the other slot there; one two or more
             * further (its waits return at once after a device error) may have overwritten this one: not compared
             * (best effort: the group has failed then anyway). */
            const uint64_t theirs =
                *((const volatile uint64_t *)(g.window[g.rank] + EP_CTRL_BARRIER_WORDS) + half + peer);
            if (theirs != word)
                ep_record_input_error(g.input_error, stage, EP_INPUT_SEND_MISMATCH, (int64_t)word, peer,
                                      (int64_t)theirs);
        }
    }
    __syncthreads();
    if (peer == 0)
        *g.barrier_epoch = epoch;
    bool result = ok != 0;
    __syncthreads();
    return result;
}

#endif
