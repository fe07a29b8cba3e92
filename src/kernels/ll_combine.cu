/* Low-latency combine. Send: each expert rank sends every row its experts produced back to the token's rank,
 * into that token's slot for the k that named the expert (one row per (token, k); no reduction here, so the
 * receiver can sum in exactly the reference's order). The last block raises a flag at every rank. Receive
 * (the hook): one block per token waits for every rank's flag, then sums w[t, k] * row[t, k] with fmaf in k
 * order (a duplicated expert reads the row of its first k) and rounds once to bf16.
 * Per-rank sums (experimental, EPCOMM_LL_COMBINE_PER_RANK=1, bf16 only): each source first writes its weights into
 * every rank's buffer (a small kernel, then a flag); each expert rank then sums, per token, w[t, k] * row over the
 * k that named its experts, in k order by fmaf (the reference's chain, restarted at 0 on each rank), rounds the
 * sum to bf16 and sends it once, into the token's staging row of the first k that named that rank. About 2.2x
 * fewer bytes at EP4 with top-8 of 256 (3.6 ranks per token instead of 8 rows); the receive adds the ranks' sums
 * in the order of their first k. Two roundings instead of one (ref/ll_combine.c, epref_ll_combine_per_rank). */
#include "bf16.cuh"
#include "copy.cuh"
#include "ll_kernels.h"
#include "ll_layout.h"
#include "logfmt.cuh"
#include "sync.cuh"
#include "wave.cuh"

#define LL_COMBINE_THREADS 512
#ifndef LL_LOGFMT_BATCH
#define LL_LOGFMT_BATCH 8 /* groups whose loads are in flight together when encoding LogFMT */
#endif
#define LL_LOGFMT_K_BATCH    4 /* LogFMT rows whose fetches are in flight together in the receive */
#define LL_COMBINE_MAX_PARTS 8 /* pieces a row may be cut into between warps */
#define LL_COMBINE_K_BATCH   8 /* rows whose loads are in flight together in the receive */
#define LL_RANK_SUM_BATCH    4 /* per-rank sums: rows whose loads are in flight together */
#define LL_RANK_SUM_CHUNKS   2 /* per-rank sums: 16-byte chunks per lane per step */
#define LL_WEIGHTS_THREADS   256

__device__ __forceinline__ char *ll_half_c(const ep_dev_group_t &g, int rank, int parity, uint64_t half_bytes) {
    return g.window[rank] + EP_CTRL_BYTES + (uint64_t)parity * half_bytes;
}

__host__ __device__ __forceinline__ int combine_send_blocks(const ep_ll_combine_kargs_t &a, int num_ranks) {
    return a.num_experts / num_ranks * (a.send_warps / (LL_COMBINE_THREADS / 32));
}

/* Encodes group gi of a row into the row's slot `dst`: the payload at gi * 256, the group's word after the
 * row's payload (at row_bytes + 4 * gi). */
__device__ __forceinline__ void logfmt_encode_to(uint2 raw, char *dst, int64_t row_bytes, int64_t gi, int lane) {
    const uint32_t word = ep_logfmt_encode_group(raw, dst + gi * 256, lane);
    if (lane == 0)
        ((uint32_t *)(dst + row_bytes))[gi] = word;
}

/* Called by every thread of a send block when its stores are issued: the block counts itself done, and the last
 * block of the grid raises the flags, carrying the epoch and whether the rows are per-rank sums (so that a receiver
 * expecting the other kind can tell). */
__device__ __forceinline__ void combine_send_done(const ep_dev_group_t &g, const ep_ll_combine_kargs_t &a,
                                                  uint32_t epoch) {
    const int q = a.combine_parity;
    __syncthreads();
    if (threadIdx.x == 0)
        ep_last_block_signal(g, &g.ll_state[6 + q], &g.ll_state[2 + q], epoch, EP_CTRL_LL_COMBINE_FLAGS, q,
                             (uint64_t)epoch << 32 | (uint64_t)(a.per_rank != 0));
}

/* Send block vb (of combine_send_blocks; a block beyond them sends nothing), then the block counts itself
 * done; the last block of the grid raises the flags. One instance per row format (bf16 copy, LogFMT encode),
 * so that each keeps few registers (two blocks per SM). */
template <bool LOGFMT>
__device__ __forceinline__ void combine_send_block(const ep_dev_group_t &g, const ep_ll_combine_kargs_t &a, int vb,
                                                   uint32_t epoch) {
    __shared__ int64_t ranges[EP_MAX_NVL_RANKS];
    const int R = g.num_ranks, me = g.rank, L = a.num_experts / R, K = a.topk, p = a.parity, q = a.combine_parity;
    const int l = vb % L, blk = vb / L, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int64_t RT = (int64_t)R * a.max_tokens;
    const ep_ll_layout_t lay = ep_ll_layout(R, a.max_tokens, a.hidden, K, L);
    const char *mine = ll_half_c(g, me, p, a.half_bytes);
    /* The expert's row count is loaded together with the ranges (one memory latency, not two). */
    const int32_t count = vb < combine_send_blocks(a, R) ? ((const int32_t *)(mine + lay.count_off))[l] : 0;
    if (tid < R)
        ranges[tid] = ((const int64_t *)(mine + lay.range_off))[l * R + tid];
    __syncthreads();
    const int64_t row_bytes = 2 * (int64_t)a.hidden, S = a.hidden / 128;
    /* a.send_warps warps per expert share its rows, a whole row each. Only when an expert has at most an eighth
     * as many rows as warps (small T: latency, not bytes) is a row cut into `parts` pieces (bf16 rows in 16-byte
     * chunks, LogFMT rows in 128-channel groups). Cutting larger counts was slower at EP4 (T=128: 55 us with
     * rows in four pieces against 48 us whole; LogFMT: 54.9 us in two pieces against 45.0 whole). */
    const int warps = a.send_warps;
    const int parts = count > 0 && count * 8 <= warps ? min(LL_COMBINE_MAX_PARTS, warps / count) : 1;
    const int64_t units = LOGFMT ? S : row_bytes / 16, per_part = (units + parts - 1) / parts;
    for (int32_t item = blk * (LL_COMBINE_THREADS / 32) + warp; item < count * parts; item += warps) {
        const int32_t i = item / parts;
        const int64_t u0 = (item % parts) * per_part, u1 = min(units, u0 + per_part);
        const uint4 *src = (const uint4 *)(a.x + l * a.x_stride0 + (int64_t)i * a.x_stride1);
        int s = 0;
        while (s + 1 < R && i >= (int32_t)(ranges[s + 1] >> 32))
            s++;
        int32_t packed = ((const int32_t *)(mine + lay.srck_off))[l * RT + i];
        int t = packed >> 5, k = packed & 31;
        char *dst = ll_half_c(g, s, q, a.half_bytes) + lay.combine_off + ((uint64_t)t * K + k) * lay.comb_row_bytes;
        if constexpr (!LOGFMT) {
            if (u1 > u0)
                ep_warp_copy16((uint4 *)dst + u0, src + u0, u1 - u0, lane);
        } else {
            /* Full batches (the loads of LL_LOGFMT_BATCH groups in flight together, no bounds test inside), then
             * the groups left. Two loops on purpose: one helper for both compiled to 64 registers with spills
             * instead of 96 without (not measured, so not taken). */
            int64_t g0 = u0;
            for (; g0 + LL_LOGFMT_BATCH <= u1; g0 += LL_LOGFMT_BATCH) {
                uint2 raw[LL_LOGFMT_BATCH];
#pragma unroll
                for (int u = 0; u < LL_LOGFMT_BATCH; u++)
                    raw[u] = ((const uint2 *)src)[(g0 + u) * 32 + lane];
#pragma unroll
                for (int u = 0; u < LL_LOGFMT_BATCH; u++)
                    logfmt_encode_to(raw[u], dst, row_bytes, g0 + u, lane);
            }
            if (g0 < u1) { /* fewer than a batch left (a row cut in pieces): their loads in flight together too */
                uint2 raw[LL_LOGFMT_BATCH];
#pragma unroll
                for (int u = 0; u < LL_LOGFMT_BATCH; u++)
                    if (g0 + u < u1)
                        raw[u] = ((const uint2 *)src)[(g0 + u) * 32 + lane];
#pragma unroll
                for (int u = 0; u < LL_LOGFMT_BATCH; u++)
                    if (g0 + u < u1) /* the same on every lane: the warp stays converged */
                        logfmt_encode_to(raw[u], dst, row_bytes, g0 + u, lane);
            }
        }
    }
    combine_send_done(g, a, epoch);
}

/* Per-rank sums, step 1 (one block per rank d): this rank's weights [N, K] into d's weights array (row `me`), then
 * d's flag for them, carrying this combine's epoch. */
__global__ void __launch_bounds__(LL_WEIGHTS_THREADS)
    ll_combine_weights_kernel(const __grid_constant__ ep_dev_group_t g,
                              const __grid_constant__ ep_ll_combine_kargs_t a) {
    const int R = g.num_ranks, me = g.rank, d = blockIdx.x, K = a.topk, q = a.combine_parity;
    const uint32_t epoch = g.ll_state[2 + q] + 1; /* the send kernel after this one sets it */
    const ep_ll_layout_t lay = ep_ll_layout(R, a.max_tokens, a.hidden, K, a.num_experts / R);
    float *dst = (float *)(ll_half_c(g, d, q, a.half_bytes) + lay.weights_off) + (int64_t)me * a.max_tokens * K;
    for (int64_t i = threadIdx.x; i < (int64_t)a.num_tokens * K; i += LL_WEIGHTS_THREADS)
        dst[i] = a.weights[i / K * a.w_stride + i % K];
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        ep_store_relaxed_sys((uint64_t *)(g.window[d] + EP_CTRL_LL_COMBINE_WEIGHT_FLAGS) + q * R + me,
                             (uint64_t)epoch << 32 | (uint32_t)a.num_tokens);
    }
}

/* Waits for source s's weights of this combine; false if they did not come. A combine flag of this epoch from s
 * marked as rows per (token, k) means s combines the other way (EPCOMM_LL_COMBINE_PER_RANK differs): recorded at
 * once as a mismatch naming s, rather than after the timeout. Timeouts and overruns are recorded too. */
__device__ __forceinline__ bool wait_source_weights(const ep_dev_group_t &g, int q, uint32_t epoch, int s) {
    const uint64_t *weights_flag =
        (const uint64_t *)(g.window[g.rank] + EP_CTRL_LL_COMBINE_WEIGHT_FLAGS) + q * g.num_ranks + s;
    const uint64_t *combine_flag =
        (const uint64_t *)(g.window[g.rank] + EP_CTRL_LL_COMBINE_FLAGS) + q * g.num_ranks + s;
    const uint64_t start = ep_globaltimer_ns();
    uint32_t spins = 0;
    for (;;) {
        const uint64_t v = ep_load_acquire_sys(weights_flag);
        if (ep_epoch_reached((uint32_t)(v >> 32), epoch))
            return !ep_flag_overrun(g, v, epoch, EP_STAGE_LL_COMBINE_WEIGHTS, s);
        const uint64_t c = ep_load_acquire_sys(combine_flag);
        if ((uint32_t)(c >> 32) == epoch && (c & 1) == 0) {
            ep_record_error(g, EP_DEV_STATUS_MISMATCH, EP_STAGE_LL_COMBINE_WEIGHTS, s, 0, 1);
            return false;
        }
        if (!ep_keep_waiting(g, spins, start, EP_STAGE_LL_COMBINE_WEIGHTS, s, epoch))
            return false;
    }
}

/* Thread s < R waits for source s's weights if `range` (this block's expert's rows from s) is not empty; ok[s]:
 * whether they are there (or not needed). That source's tokens are skipped otherwise. */
__device__ __forceinline__ void wait_weights(const ep_dev_group_t &g, int q, uint32_t epoch, int64_t range, int *ok) {
    const int s = threadIdx.x;
    if (s < g.num_ranks)
        ok[s] = (range & 0xffffffff) == 0 || wait_source_weights(g, q, epoch, s);
    __syncthreads();
}

/* dst[u0, u1) (16-byte chunks) = bf16 of the fmaf chain over the n rows in order, with their weights, from 0. */
__device__ __forceinline__ void rank_sum_rows(uint4 *dst, const uint4 *const *rows, const float *w, int n, int64_t u0,
                                              int64_t u1, int lane) {
    for (int64_t c0 = u0 + lane; c0 < u1; c0 += 32 * LL_RANK_SUM_CHUNKS) {
        float acc[LL_RANK_SUM_CHUNKS][8] = {};
        for (int e0 = 0; e0 < n; e0 += LL_RANK_SUM_BATCH) {
            uint4 r[LL_RANK_SUM_BATCH][LL_RANK_SUM_CHUNKS];
#pragma unroll
            for (int u = 0; u < LL_RANK_SUM_BATCH; u++)
#pragma unroll
                for (int j = 0; j < LL_RANK_SUM_CHUNKS; j++)
                    if (e0 + u < n && c0 + j * 32 < u1)
                        r[u][j] = rows[e0 + u][c0 + j * 32];
#pragma unroll
            for (int u = 0; u < LL_RANK_SUM_BATCH; u++) {
                if (e0 + u >= n)
                    continue;
                const float wu = w[e0 + u];
#pragma unroll
                for (int j = 0; j < LL_RANK_SUM_CHUNKS; j++) {
                    const uint32_t words[4] = {r[u][j].x, r[u][j].y, r[u][j].z, r[u][j].w};
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        acc[j][2 * i] = __fmaf_rn(wu, ep_bf16_lo(words[i]), acc[j][2 * i]);
                        acc[j][2 * i + 1] = __fmaf_rn(wu, ep_bf16_hi(words[i]), acc[j][2 * i + 1]);
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < LL_RANK_SUM_CHUNKS; j++)
            if (c0 + j * 32 < u1)
                dst[c0 + j * 32] = ep_pack_bf16x8(acc[j]);
    }
}

/* Per-rank sums, step 2: send block vb walks expert l's rows like combine_send_block, but only the row of a
 * token's first k here (its "leading" row) does work: its warp finds the token's rows at every k naming an
 * expert here (the dispatch receive's copy of the slot header gives the experts by k, its row-by-k array the
 * rows), sums them with the source's weights and sends the sum to the leading row's staging slot. Waits only
 * for the weights of sources with rows at this expert. */
__device__ __forceinline__ void combine_send_rank_sums_block(const ep_dev_group_t &g, const ep_ll_combine_kargs_t &a,
                                                             int vb, uint32_t epoch) {
    constexpr int WARPS = LL_COMBINE_THREADS / 32;
    __shared__ int64_t ranges[EP_MAX_NVL_RANKS];
    __shared__ int weights_ok[EP_MAX_NVL_RANKS];
    __shared__ const uint4 *rows[WARPS][EP_LL_MAX_TOPK];
    __shared__ float row_w[WARPS][EP_LL_MAX_TOPK];
    const int R = g.num_ranks, me = g.rank, L = a.num_experts / R, K = a.topk, p = a.parity, q = a.combine_parity;
    const int l = vb % L, blk = vb / L, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int64_t T = a.max_tokens, RT = (int64_t)R * T;
    const ep_ll_layout_t lay = ep_ll_layout(R, a.max_tokens, a.hidden, K, L);
    const char *mine = ll_half_c(g, me, p, a.half_bytes);
    const float *weights = (const float *)(ll_half_c(g, me, q, a.half_bytes) + lay.weights_off);
    const int32_t *rowk = (const int32_t *)(mine + lay.rowk_off);
    const int32_t count = vb < combine_send_blocks(a, R) ? ((const int32_t *)(mine + lay.count_off))[l] : 0;
    if (tid < R)
        ranges[tid] = ((const int64_t *)(mine + lay.range_off))[l * R + tid];
    wait_weights(g, q, epoch, count > 0 && tid < R ? ranges[tid] : 0, weights_ok); /* ends with __syncthreads */
    const int warps = a.send_warps;
    const int parts = count > 0 && count * 8 <= warps ? min(LL_COMBINE_MAX_PARTS, warps / count) : 1;
    const int64_t units = 2 * (int64_t)a.hidden / 16, per_part = (units + parts - 1) / parts;
    for (int32_t item = blk * WARPS + warp; item < count * parts; item += warps) {
        const int32_t i = item / parts;
        int s = 0;
        while (s + 1 < R && i >= (int32_t)(ranges[s + 1] >> 32))
            s++;
        const int32_t packed = ((const int32_t *)(mine + lay.srck_off))[l * RT + i];
        const int t = packed >> 5, k = packed & 31;
        const ep_ll_header_t *h =
            (const ep_ll_header_t *)(mine + lay.heads_off + ((uint64_t)s * T + t) * EP_LL_HEADER_BYTES);
        const int my_l = lane < K ? h->local_ids[lane] : -1;
        const unsigned named = __ballot_sync(0xffffffffu, my_l >= 0);
        if (!weights_ok[s] || __ffs(named) - 1 != k)
            continue;  /* the same on every lane: another row of the token leads, or its weights did not come */
        int kf = lane; /* the first k naming this lane's expert: its row is the one received */
        for (int j = 0; j < K; j++) {
            const int other = __shfl_sync(0xffffffffu, my_l, j);
            if (j < kf && other == my_l)
                kf = j;
        }
        if (my_l >= 0) {
            const int pos = __popc(named & ((1u << lane) - 1));
            const int32_t ri = rowk[((int64_t)s * T + t) * K + kf];
            rows[warp][pos] = (const uint4 *)(a.x + my_l * a.x_stride0 + (int64_t)ri * a.x_stride1);
            row_w[warp][pos] = weights[((int64_t)s * T + t) * K + lane];
        }
        __syncwarp();
        const int64_t u0 = (item % parts) * per_part, u1 = min(units, u0 + per_part);
        char *dst = ll_half_c(g, s, q, a.half_bytes) + lay.combine_off + ((uint64_t)t * K + k) * lay.comb_row_bytes;
        rank_sum_rows((uint4 *)dst, rows[warp], row_w[warp], __popc(named), u0, u1, lane);
        __syncwarp(); /* before the next item's lists */
    }
    combine_send_done(g, a, epoch);
}

template <bool LOGFMT>
__global__ void __launch_bounds__(LL_COMBINE_THREADS)
    ll_combine_send_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ll_combine_kargs_t a) {
    combine_send_block<LOGFMT>(g, a, blockIdx.x, g.ll_state[2 + a.combine_parity] + 1);
}

__global__ void __launch_bounds__(LL_COMBINE_THREADS)
    ll_combine_send_rank_sums_kernel(const __grid_constant__ ep_dev_group_t g,
                                     const __grid_constant__ ep_ll_combine_kargs_t a) {
    combine_send_rank_sums_block(g, a, blockIdx.x, g.ll_state[2 + a.combine_parity] + 1);
}

/* Receive block b (of num_tokens * recv_slices): token b / recv_slices, slice b % recv_slices of its 16-byte
 * chunks. Waits for every rank's flag of `epoch`, then sums the token's rows in k order. */
template <bool LOGFMT>
__device__ __forceinline__ void combine_recv_block(const ep_dev_group_t &g, const ep_ll_combine_kargs_t &a, int b,
                                                   uint32_t epoch) {
    __shared__ int first_k[EP_LL_MAX_TOPK];
    __shared__ float weight[EP_LL_MAX_TOPK];
    const int R = g.num_ranks, me = g.rank, L = a.num_experts / R, K = a.topk, q = a.combine_parity;
    const int tid = threadIdx.x, t = b / a.recv_slices, slice = b % a.recv_slices;
    const int chunks = a.hidden / 8, per_slice = (chunks + a.recv_slices - 1) / a.recv_slices;
    const int c_end = min(chunks, (slice + 1) * per_slice);
    const ep_ll_layout_t lay = ep_ll_layout(R, a.max_tokens, a.hidden, K, L);
    /* The token's routing and weights (inputs, there from the start) are read before the wait for the flags. */
    if (tid < K) {
        const int64_t *ids = a.topk_idx + (int64_t)t * a.idx_stride;
        const int64_t e = ids[tid];
        int f = -1;
        if (e >= 0 && e < a.num_experts) {
            /* The row to read for this k: the row of the first k naming the same expert; with per-rank sums, the
             * sum of the first k naming the same rank is read once (at that k, with weight 1), later k not. */
            f = tid;
            for (int k = 0; k < tid; k++)
                if (a.per_rank ? ids[k] >= 0 && ids[k] < a.num_experts && ids[k] / L == e / L : ids[k] == e) {
                    f = a.per_rank ? -1 : k;
                    break;
                }
        }
        first_k[tid] = f;
        weight[tid] = a.per_rank ? 1.0f : a.weights[(int64_t)t * a.w_stride + tid];
    }
    if (tid < R) {
        uint64_t t0 = ep_globaltimer_ns();
        const uint64_t *flag = (const uint64_t *)(g.window[me] + EP_CTRL_LL_COMBINE_FLAGS) + q * R + tid;
        uint64_t v = 0;
        if (ep_wait_epoch(g, flag, epoch, EP_STAGE_LL_COMBINE_RECV, tid, &v) &&
            !ep_flag_overrun(g, v, epoch, EP_STAGE_LL_COMBINE_RECV, tid) && (int)(v & 1) != (a.per_rank != 0))
            ep_record_error(g, EP_DEV_STATUS_MISMATCH, EP_STAGE_LL_COMBINE_RECV, tid, v & 1, a.per_rank != 0);
        if (a.wait_cost_stats && b == 0)
            atomicAdd((unsigned long long *)&a.wait_cost_stats[tid], (unsigned long long)(ep_globaltimer_ns() - t0));
    }
    __syncthreads();
    const char *slots = ll_half_c(g, me, q, a.half_bytes) + lay.combine_off + (uint64_t)t * K * lay.comb_row_bytes;
    for (int c = slice * per_slice + tid; c < c_end; c += LL_COMBINE_THREADS) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if constexpr (LOGFMT) {
            /* As below: the fetches of LL_LOGFMT_K_BATCH rows are in flight together, then decoded in k order. */
            const int gi = c / 16, e0 = (c % 16) * 8;
            for (int k0 = 0; k0 < K; k0 += LL_LOGFMT_K_BATCH) {
                ep_logfmt_piece_t piece[LL_LOGFMT_K_BATCH];
#pragma unroll
                for (int u = 0; u < LL_LOGFMT_K_BATCH; u++) {
                    const int f = k0 + u < K ? first_k[k0 + u] : -1;
                    if (f >= 0) {
                        const char *row = slots + (uint64_t)f * lay.comb_row_bytes;
                        piece[u] = ep_logfmt_fetch8(row + gi * 256, ((const uint32_t *)(row + 2 * a.hidden))[gi], e0);
                    }
                }
#pragma unroll
                for (int u = 0; u < LL_LOGFMT_K_BATCH; u++) {
                    if (k0 + u >= K || first_k[k0 + u] < 0)
                        continue;
                    float v[8];
                    ep_logfmt_decode8(piece[u], v);
#pragma unroll
                    for (int j = 0; j < 8; j++)
                        acc[j] = __fmaf_rn(weight[k0 + u], v[j], acc[j]);
                }
            }
        } else {
            /* The loads of LL_COMBINE_K_BATCH rows are issued together, then summed in k order. */
            for (int k0 = 0; k0 < K; k0 += LL_COMBINE_K_BATCH) {
                uint4 r[LL_COMBINE_K_BATCH];
#pragma unroll
                for (int u = 0; u < LL_COMBINE_K_BATCH; u++) {
                    const int f = k0 + u < K ? first_k[k0 + u] : -1;
                    if (f >= 0)
                        r[u] = ((const uint4 *)(slots + (uint64_t)f * lay.comb_row_bytes))[c];
                }
#pragma unroll
                for (int u = 0; u < LL_COMBINE_K_BATCH; u++) {
                    if (k0 + u >= K || first_k[k0 + u] < 0)
                        continue;
                    const float w = weight[k0 + u];
                    const uint32_t words[4] = {r[u].x, r[u].y, r[u].z, r[u].w};
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        acc[2 * j] = __fmaf_rn(w, ep_bf16_lo(words[j]), acc[2 * j]);
                        acc[2 * j + 1] = __fmaf_rn(w, ep_bf16_hi(words[j]), acc[2 * j + 1]);
                    }
                }
            }
        }
        ((uint4 *)(a.out + (int64_t)t * a.out_stride))[c] = ep_pack_bf16x8(acc);
    }
}

template <bool LOGFMT>
__global__ void __launch_bounds__(LL_COMBINE_THREADS)
    ll_combine_recv_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ll_combine_kargs_t a) {
    combine_recv_block<LOGFMT>(g, a, blockIdx.x, g.ll_state[2 + a.combine_parity]); /* the send kernel set it */
}

/* The row formats of the combine's kernels: each compiled on its own, so that each keeps few registers. */
enum { COMBINE_BF16 = 0, COMBINE_LOGFMT = 1, COMBINE_RANK_SUMS = 2 };

__host__ __device__ __forceinline__ int combine_format(const ep_ll_combine_kargs_t &a) {
    return a.use_logfmt ? COMBINE_LOGFMT : a.per_rank ? COMBINE_RANK_SUMS : COMBINE_BF16;
}

/* Send and receive in one kernel (the call without a hook): G = max(send blocks, receive blocks) blocks each
 * send, and the last ones then receive (receivers wait only after sending; send-only blocks come first). */
template <int FORMAT>
__global__ void __launch_bounds__(LL_COMBINE_THREADS)
    ll_combine_fused_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ll_combine_kargs_t a) {
    const uint32_t epoch = g.ll_state[2 + a.combine_parity] + 1; /* read before this block counts itself done */
    if constexpr (FORMAT == COMBINE_RANK_SUMS)
        combine_send_rank_sums_block(g, a, blockIdx.x, epoch);
    else
        combine_send_block<FORMAT == COMBINE_LOGFMT>(g, a, blockIdx.x, epoch);
    const int b = (int)blockIdx.x - ((int)gridDim.x - a.num_tokens * a.recv_slices);
    if (b >= 0)
        combine_recv_block<FORMAT == COMBINE_LOGFMT>(g, a, b, epoch);
}

/* Per-rank sums: every source's weights go out first (their own kernel, so that no send block waits for a block
 * of its own grid that may not be resident). */
static cudaError_t launch_weights(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a, cudaStream_t s) {
    if (!a->per_rank || a->use_logfmt)
        return cudaSuccess;
    ll_combine_weights_kernel<<<g->num_ranks, LL_WEIGHTS_THREADS, 0, s>>>(*g, *a);
    return cudaGetLastError();
}

/* The send alone (the weights' kernel already launched where per-rank sums need it). */
static cudaError_t launch_send(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a, cudaStream_t s) {
    const int blocks = combine_send_blocks(*a, g->num_ranks);
    switch (combine_format(*a)) {
    case COMBINE_LOGFMT: ll_combine_send_kernel<true><<<blocks, LL_COMBINE_THREADS, 0, s>>>(*g, *a); break;
    case COMBINE_RANK_SUMS: ll_combine_send_rank_sums_kernel<<<blocks, LL_COMBINE_THREADS, 0, s>>>(*g, *a); break;
    default: ll_combine_send_kernel<false><<<blocks, LL_COMBINE_THREADS, 0, s>>>(*g, *a); break;
    }
    return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_combine_send(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a,
                                                 cudaStream_t s) {
    cudaError_t err = launch_weights(g, a, s);
    return err == cudaSuccess ? launch_send(g, a, s) : err;
}

extern "C" cudaError_t ep_launch_ll_combine_recv(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a,
                                                 cudaStream_t s) {
    if (a->num_tokens == 0)
        return cudaSuccess;
    if (a->use_logfmt)
        ll_combine_recv_kernel<true><<<a->num_tokens * a->recv_slices, LL_COMBINE_THREADS, 0, s>>>(*g, *a);
    else
        ll_combine_recv_kernel<false><<<a->num_tokens * a->recv_slices, LL_COMBINE_THREADS, 0, s>>>(*g, *a);
    return cudaGetLastError();
}

/* The call without a hook: one fused kernel when its grid fits on the GPU at once, else send then receive. */
extern "C" cudaError_t ep_launch_ll_combine_both(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a,
                                                 int cooperative, cudaStream_t s) {
    static int per_sm[3];
    void (*const kernels[3])(ep_dev_group_t, ep_ll_combine_kargs_t) = {ll_combine_fused_kernel<COMBINE_BF16>,
                                                                       ll_combine_fused_kernel<COMBINE_LOGFMT>,
                                                                       ll_combine_fused_kernel<COMBINE_RANK_SUMS>};
    const int format = combine_format(*a);
    const int send = combine_send_blocks(*a, g->num_ranks), recv = a->num_tokens * a->recv_slices;
    const int blocks = recv > send ? recv : send;
    cudaError_t err = launch_weights(g, a, s);
    if (err != cudaSuccess)
        return err;
    if (blocks <= ep_wave_capacity((const void *)kernels[format], LL_COMBINE_THREADS, g->num_sms, &per_sm[format])) {
        err = ep_launch_resident(kernels[format], blocks, LL_COMBINE_THREADS, cooperative, s, *g, *a);
        if (err != cudaErrorCooperativeLaunchTooLarge)
            return err;
    }
    err = launch_send(g, a, s);
    return err == cudaSuccess ? ep_launch_ll_combine_recv(g, a, s) : err;
}
