/* Low-latency combine. Send: each expert rank sends every row its experts produced back to the token's rank,
 * into that token's slot for the k that named the expert (one row per (token, k); no reduction here, so the
 * receiver can sum in exactly the reference's order). The last block raises a flag at every rank. Receive
 * (the hook): one block per token waits for every rank's flag, then sums w[t, k] * row[t, k] with fmaf in k
 * order (a duplicated expert reads the row of its first k) and rounds once to bf16. */
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
    __syncthreads();
    if (tid == 0)
        ep_last_block_signal(g, &g.ll_state[6 + q], &g.ll_state[2 + q], epoch, EP_CTRL_LL_COMBINE_FLAGS, q,
                             (uint64_t)epoch << 32);
}

template <bool LOGFMT>
__global__ void __launch_bounds__(LL_COMBINE_THREADS)
    ll_combine_send_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ll_combine_kargs_t a) {
    combine_send_block<LOGFMT>(g, a, blockIdx.x, g.ll_state[2 + a.combine_parity] + 1);
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
        int64_t e = a.topk_idx[(int64_t)t * a.idx_stride + tid];
        int f = -1;
        if (e >= 0 && e < a.num_experts) {
            f = tid;
            for (int k = 0; k < tid; k++)
                if (a.topk_idx[(int64_t)t * a.idx_stride + k] == e) {
                    f = k;
                    break;
                }
        }
        first_k[tid] = f;
        weight[tid] = a.weights[(int64_t)t * a.w_stride + tid];
    }
    if (tid < R) {
        uint64_t t0 = ep_globaltimer_ns();
        const uint64_t *flag = (const uint64_t *)(g.window[me] + EP_CTRL_LL_COMBINE_FLAGS) + q * R + tid;
        uint64_t v = 0;
        if (ep_wait_epoch(g, flag, epoch, EP_STAGE_LL_COMBINE_RECV, tid, &v))
            ep_flag_overrun(g, v, epoch, EP_STAGE_LL_COMBINE_RECV, tid);
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

/* Send and receive in one kernel (the call without a hook): G = max(send blocks, receive blocks) blocks each
 * send, and the last ones then receive (receivers wait only after sending; send-only blocks come first). */
template <bool LOGFMT>
__global__ void __launch_bounds__(LL_COMBINE_THREADS)
    ll_combine_fused_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ll_combine_kargs_t a) {
    const uint32_t epoch = g.ll_state[2 + a.combine_parity] + 1; /* read before this block counts itself done */
    combine_send_block<LOGFMT>(g, a, blockIdx.x, epoch);
    const int b = (int)blockIdx.x - ((int)gridDim.x - a.num_tokens * a.recv_slices);
    if (b >= 0)
        combine_recv_block<LOGFMT>(g, a, b, epoch);
}

extern "C" cudaError_t ep_launch_ll_combine_send(const ep_dev_group_t *g, const ep_ll_combine_kargs_t *a,
                                                 cudaStream_t s) {
    const int blocks = combine_send_blocks(*a, g->num_ranks);
    if (a->use_logfmt)
        ll_combine_send_kernel<true><<<blocks, LL_COMBINE_THREADS, 0, s>>>(*g, *a);
    else
        ll_combine_send_kernel<false><<<blocks, LL_COMBINE_THREADS, 0, s>>>(*g, *a);
    return cudaGetLastError();
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
    static int per_sm[2];
    const int send = combine_send_blocks(*a, g->num_ranks), recv = a->num_tokens * a->recv_slices;
    const int blocks = recv > send ? recv : send;
    void (*kernel)(ep_dev_group_t, ep_ll_combine_kargs_t) =
        a->use_logfmt ? ll_combine_fused_kernel<true> : ll_combine_fused_kernel<false>;
    if (blocks <=
        ep_wave_capacity((const void *)kernel, LL_COMBINE_THREADS, g->num_sms, &per_sm[a->use_logfmt ? 1 : 0])) {
        cudaError_t err = ep_launch_resident(kernel, blocks, LL_COMBINE_THREADS, cooperative, s, *g, *a);
        if (err != cudaErrorCooperativeLaunchTooLarge)
            return err;
    }
    cudaError_t err = ep_launch_ll_combine_send(g, a, s);
    return err == cudaSuccess ? ep_launch_ll_combine_recv(g, a, s) : err;
}
