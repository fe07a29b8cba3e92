/* Dispatch, step 1: the count exchange. One CTA.
 *  a. Each thread takes a run of tokens and counts, per destination, the tokens it sends there; a block scan
 *     turns those into each token's rank among the tokens going to that destination.
 *  b. The [R] row of counts goes to every peer (so every rank knows the whole [R][R] matrix) and the
 *     per-local-expert counts go to the expert's rank. A count that disagrees with num_tokens_per_rank is
 *     sent as -1, so that every rank abandons the op together instead of reading unwritten rows. The
 *     dispatch's sizes (one word) and num_worst_tokens go to every peer too: a rank whose differ from a peer's
 *     abandons (every rank then sees a difference, so all abandon; equal num_worst_tokens also make every rank
 *     check capacity against the same number).
 *  c. After a barrier, each rank knows where each source's rows start in every receiver: it writes the final
 *     row position of each of its tokens at each destination, its receive count and per-expert counts, and
 *     tells the host through mapped memory. */
#include "ht_kernels.h"
#include "sync.cuh"

#define NOTIFY_THREADS 1024
#define NOTIFY_WARPS   (NOTIFY_THREADS / 32)
static_assert(NOTIFY_WARPS == 32, "the second level of the scan is one warp over the warps' totals");

#define NOTIFY_HELD_TOKENS 8 /* a thread's first tokens, whose destinations stay in registers between phases */
static_assert(NOTIFY_HELD_TOKENS * EP_MAX_NVL_RANKS == 64, "one bit per (held token, destination) in a uint64");

/* Bit i * 8 + d set: token t0 + i goes to rank d, for the thread's first NOTIFY_HELD_TOKENS tokens (t < t1),
 * with all the loads issued together. */
__device__ __forceinline__ uint64_t load_held_destinations(const ep_ht_notify_args_t &a, int R, int t0, int t1) {
    uint64_t bits = 0;
#pragma unroll
    for (int i = 0; i < NOTIFY_HELD_TOKENS; i++)
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
            if (t0 + i < t1 && d < R && a.is_token_in_rank[(int64_t)(t0 + i) * a.in_rank_stride + d] != 0)
                bits |= 1ull << (i * EP_MAX_NVL_RANKS + d);
    return bits;
}

/* Whether token t (this thread's, t >= t0) goes to rank d: from the held bits, else from memory. */
__device__ __forceinline__ int goes_to(const ep_ht_notify_args_t &a, uint64_t held, int t0, int t, int d) {
    const int i = t - t0;
    if (i < NOTIFY_HELD_TOKENS)
        return (int)(held >> (i * EP_MAX_NVL_RANKS + d) & 1);
    return a.is_token_in_rank[(int64_t)t * a.in_rank_stride + d] != 0;
}

/* Inclusive scan of v over the warp's lanes. */
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int32_t up = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o)
            v += up;
    }
    return v;
}

/* Replaces each thread's count per destination by the sum of the counts of the threads before it (thread order
 * is token order), and writes the block's totals: a warp scan, then one warp scans the warps' totals. */
__device__ __forceinline__ void block_exclusive_scan(int32_t (&v)[EP_MAX_NVL_RANKS],
                                                     int32_t (*warp_sums)[EP_MAX_NVL_RANKS], int32_t *totals) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int32_t incl[EP_MAX_NVL_RANKS];
#pragma unroll
    for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
        incl[d] = warp_inclusive_scan(v[d], lane);
        if (lane == 31)
            warp_sums[warp][d] = incl[d];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
            int32_t w = warp_sums[lane][d], w_incl = warp_inclusive_scan(w, lane);
            warp_sums[lane][d] = w_incl - w;
            if (lane == 31)
                totals[d] = w_incl;
        }
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
        v[d] = warp_sums[warp][d] + incl[d] - v[d];
}

__global__ void __launch_bounds__(NOTIFY_THREADS, 1)
    ht_notify_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ht_notify_args_t a) {
    __shared__ int32_t warp_sums[NOTIFY_WARPS][EP_MAX_NVL_RANKS];
    __shared__ int32_t totals[EP_MAX_NVL_RANKS];
    __shared__ int32_t counts[EP_MAX_NVL_RANKS][EP_MAX_NVL_RANKS];
    __shared__ int abandon;
    const int R = g.num_ranks, me = g.rank, tid = threadIdx.x;
    const int per_thread = (a.num_tokens + NOTIFY_THREADS - 1) / NOTIFY_THREADS;
    const int t0 = tid * per_thread, t1 = min(a.num_tokens, t0 + per_thread);

    /* a. per-thread counts (destinations >= R stay 0), then their block scan: run[d] is the rank of this
     *    thread's first token among this rank's tokens going to d. */
    const uint64_t held = load_held_destinations(a, R, t0, t1);
    int32_t run[EP_MAX_NVL_RANKS];
#pragma unroll
    for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
        run[d] = __popcll(held & (0x0101010101010101ull << d));
    for (int t = t0 + NOTIFY_HELD_TOKENS; t < t1; t++) /* more than 8192 tokens */
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
            if (d < R)
                run[d] += a.is_token_in_rank[(int64_t)t * a.in_rank_stride + d] != 0;
    if (tid == 0)
        abandon = 0;
    block_exclusive_scan(run, warp_sums, totals);

    /* b. publish counts. */
    const int L = a.num_experts / R;
    if (tid < R * R) {
        int peer = tid / R, d = tid % R;
        int32_t c = totals[d];
        if (c != a.tokens_per_rank[d]) {
            ep_record_input_error(g.input_error, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_LAYOUT_MISMATCH,
                                  a.tokens_per_rank[d], d, c);
            c = -1;
        }
        int32_t *slot = (int32_t *)(g.window[peer] + EP_CTRL_HT_COUNTS) + (a.parity * R + me) * R + d;
        *(volatile int32_t *)slot = c;
    }
    if (tid < R) {
        volatile uint64_t *call = (uint64_t *)(g.window[tid] + EP_CTRL_HT_CALLS) + (a.parity * R + me) * 2;
        call[0] = a.call_word;
        call[1] = (uint64_t)a.worst_tokens;
    }
    for (int i = tid; i < a.num_experts; i += NOTIFY_THREADS) {
        int peer = i / L, l = i % L;
        int32_t *slot =
            (int32_t *)(g.window[peer] + EP_CTRL_HT_EXPERTS) + a.parity * EP_CTRL_HT_EXPERT_WORDS + me * L + l;
        *(volatile int32_t *)slot = a.tokens_per_expert[i];
    }
    __syncthreads();
    /* A peer that never arrives: the timeout is recorded; abandon without reading its (stale) counts. */
    if (!ep_cta_barrier(g, EP_STAGE_DISPATCH_NOTIFY, 0)) {
        if (tid == 0) {
            *a.routing.num_recv = -1;
            a.host->num_recv = -1;
            a.host->ok = 0;
            __threadfence_system();
            *(volatile uint32_t *)&a.host->seq = a.seq;
        }
        return;
    }

    /* c. read the matrix; every rank makes the same abandon decision from the same numbers. */
    if (tid < R * R) {
        int s = tid / R, d = tid % R;
        int32_t c = *(volatile int32_t *)((int32_t *)(g.window[me] + EP_CTRL_HT_COUNTS) + (a.parity * R + s) * R + d);
        counts[s][d] = c;
        if (c < 0)
            abandon = 1;
        a.routing.counts[tid] = c;
        a.host->counts[tid] = c;
    }
    if (tid < R) {
        const volatile uint64_t *call = (uint64_t *)(g.window[me] + EP_CTRL_HT_CALLS) + (a.parity * R + tid) * 2;
        const uint64_t w = call[0];
        const int64_t worst = (int64_t)call[1];
        if (w != a.call_word) {
            ep_record_input_error(g.input_error, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_CALL_MISMATCH,
                                  (int64_t)a.call_word, tid, (int64_t)w);
            abandon = 1;
        } else if (worst != a.worst_tokens) {
            ep_record_input_error(g.input_error, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_WORST_MISMATCH, a.worst_tokens,
                                  tid, worst);
            abandon = 1;
        }
    }
    __syncthreads();
    if (tid < R && !abandon) {
        int64_t into = 0;
        for (int s = 0; s < R; s++)
            into += counts[s][tid];
        if (into > a.capacity_rows) {
            ep_record_input_error(g.input_error, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_CAPACITY, a.capacity_rows, tid,
                                  into);
            abandon = 1;
        }
    }
    __syncthreads();
    int32_t base[EP_MAX_NVL_RANKS]; /* where this rank's rows start at each destination */
#pragma unroll
    for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
        base[d] = 0;
        for (int s = 0; s < me && d < R; s++)
            base[d] += counts[s][d];
    }
    for (int t = t0; t < t1; t++) {
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
            if (d >= R)
                continue;
            const int in = goes_to(a, held, t0, t, d);
            a.routing.send_pos[(int64_t)t * R + d] = (in && !abandon) ? base[d] + run[d] : -1;
            run[d] += in;
        }
    }
    for (int l = tid; l < L; l += NOTIFY_THREADS) {
        int64_t sum = 0;
        for (int s = 0; s < R; s++)
            sum += *(volatile int32_t *)((int32_t *)(g.window[me] + EP_CTRL_HT_EXPERTS) +
                                         a.parity * EP_CTRL_HT_EXPERT_WORDS + s * L + l);
        int64_t al = a.expert_alignment;
        a.host->recv_per_expert[l] = (int32_t)((sum + al - 1) / al * al);
    }
    if (tid == 0) {
        int32_t nr = 0;
        for (int s = 0; s < R; s++)
            nr += counts[s][me];
        nr = abandon ? -1 : nr;
        *a.routing.num_recv = nr;
        a.host->num_recv = nr;
        a.host->ok = !abandon;
    }
    __syncthreads();
    if (tid == 0) {
        __threadfence_system();
        *(volatile uint32_t *)&a.host->seq = a.seq;
    }
}

extern "C" cudaError_t ep_launch_ht_notify(const ep_dev_group_t *g, const ep_ht_notify_args_t *a, cudaStream_t s) {
    ht_notify_kernel<<<1, NOTIFY_THREADS, 0, s>>>(*g, *a);
    return cudaGetLastError();
}
