/* Low-latency dispatch. Send: one block per token casts the row once (FP8 per 128 channels, or bf16 as is)
 * and stores it, with a header naming the token's local experts, into one slot per destination rank (not one
 * per expert: each rank gets a token once, whatever number of its experts the token names). The last block to
 * finish raises a flag at every rank carrying (epoch, tokens sent). Receive (the hook): two blocks per local
 * expert wait for every source's flag, then walk the sources in rank order and their slots in token order,
 * packing the slots that name this expert into its rows: deterministic, and no atomics decide an order. */
#include "copy.cuh"
#include "ll_kernels.h"
#include "ll_layout.h"
#include "sync.cuh"
#include "wave.cuh"

#include <cuda_fp8.h>

#define LL_SEND_THREADS 512
#define LL_SEND_UNROLL  4
#define LL_RECV_THREADS 512
#define LL_RECV_SPLIT   2 /* blocks per local expert in the receive (fewer in a fused kernel that must fit) */
#define LL_RECV_MIN_BLOCKS 2 /* receive and fused kernels: two blocks per SM (64 registers, no spills) */
static_assert(LL_SEND_THREADS == LL_RECV_THREADS, "the fused kernel runs both parts with one block size");

__device__ __forceinline__ char *ll_half(const ep_dev_group_t &g, int rank, int parity, uint64_t half_bytes) {
    return g.window[rank] + EP_CTRL_BYTES + (uint64_t)parity * half_bytes;
}

__device__ __forceinline__ uint64_t *ll_flag(const ep_dev_group_t &g, int rank, int parity, int src, int offset) {
    return (uint64_t *)(g.window[rank] + offset) + parity * g.num_ranks + src;
}

/* ceil(log2(s)) of a positive normal float, read from its bits (as the reference does). */
__device__ __forceinline__ int ceil_log2_bits(float s) {
    uint32_t b = __float_as_uint(s);
    int e = (int)((b >> 23) & 0xff) - 127;
    return (b & 0x7fffff) ? e + 1 : e;
}

/* One warp casts one 128-channel group: each lane holds 4 channels (`raw`, 4 bf16). Returns the 4 e4m3 bytes
 * packed. */
__device__ __forceinline__ uint32_t cast_group(uint2 raw, int round_scale, float *scale_inv) {
    float f[4] = {__uint_as_float(raw.x << 16), __uint_as_float(raw.x & 0xffff0000u), __uint_as_float(raw.y << 16),
                  __uint_as_float(raw.y & 0xffff0000u)};
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++)
        amax = fmaxf(amax, fabsf(f[i])); /* fmaxf ignores NaN */
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    amax = fmaxf(amax, 1e-4f);
    float s_inv, scale;
    if (isinf(amax)) {
        s_inv = __int_as_float(0x7f800000);
        scale = 0.0f;
    } else if (round_scale) {
        int e = ceil_log2_bits(amax * (1.0f / 448.0f));
        s_inv = __uint_as_float((uint32_t)(e + 127) << 23);
        scale = __uint_as_float((uint32_t)(127 - e) << 23);
    } else {
        s_inv = amax * (1.0f / 448.0f);
        scale = __fdiv_rn(448.0f, amax);
    }
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float v = __fmul_rn(f[i], scale);
        uint32_t q = isnan(v) ? 0x7fu : (uint32_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
        packed |= (q & 0xffu) << (8 * i);
    }
    *scale_inv = s_inv;
    return packed;
}

/* One batch of a bf16 row's 16-byte chunks (c0, c0 + LL_SEND_THREADS, ...) into registers. */
__device__ __forceinline__ void load_bf16_batch(uint4 (&v)[LL_SEND_UNROLL], const uint16_t *row, int64_t c0,
                                                int64_t chunks) {
#pragma unroll
    for (int u = 0; u < LL_SEND_UNROLL; u++)
        if (c0 + u * LL_SEND_THREADS < chunks)
            v[u] = ((const uint4 *)row)[c0 + u * LL_SEND_THREADS];
}

/* One batch of a warp's 128-channel groups (g0, g0 + W, ...): 4 channels per lane each. */
__device__ __forceinline__ void load_fp8_batch(uint2 (&raw)[LL_SEND_UNROLL], const uint16_t *row, int g0, int lane,
                                               int S) {
    const int W = LL_SEND_THREADS / 32;
#pragma unroll
    for (int u = 0; u < LL_SEND_UNROLL; u++)
        if (g0 + u * W < S)
            raw[u] = *(const uint2 *)(row + (g0 + u * W) * 128 + lane * 4);
}

/* The send of token t (none if t >= N) by one block, then the block counts itself done; the last block of the
 * grid raises the flags. `epoch`: this call's, read by every block before it counts itself. */
__device__ __forceinline__ void dispatch_send_block(const ep_dev_group_t &g, const ep_ll_dispatch_kargs_t &a, int t,
                                                    uint32_t epoch) {
    __shared__ int16_t ids[EP_MAX_NVL_RANKS][EP_LL_MAX_TOPK];
    __shared__ unsigned dest_mask;
    const int R = g.num_ranks, me = g.rank, L = a.num_experts / R, K = a.topk, p = a.parity;
    const ep_ll_layout_t lay = ep_ll_layout(R, a.max_tokens, a.hidden, K, L);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    if (t < a.num_tokens) {
        /* The row's first batch of loads goes out before the routing is read, so the two memory latencies
         * overlap (at H <= 8192 the first batch is the whole row). */
        const uint16_t *row = a.x + (int64_t)t * a.x_stride;
        const int64_t chunks = (int64_t)a.hidden * 2 / 16;
        const int S = a.hidden / 128, W = LL_SEND_THREADS / 32;
        uint4 v[LL_SEND_UNROLL];
        uint2 raw[LL_SEND_UNROLL];
        if (!a.use_fp8)
            load_bf16_batch(v, row, tid, chunks);
        else
            load_fp8_batch(raw, row, warp, lane, S);
        if (tid < EP_MAX_NVL_RANKS * EP_LL_MAX_TOPK)
            ids[tid / EP_LL_MAX_TOPK][tid % EP_LL_MAX_TOPK] = -1;
        if (tid == 0)
            dest_mask = 0;
        __syncthreads();
        if (tid < K) {
            int64_t e = a.topk_idx[(int64_t)t * a.idx_stride + tid];
            if (e < -1 || e >= a.num_experts) {
                ep_record_input_error(g.input_error, EP_STAGE_LL_DISPATCH_SEND, EP_INPUT_BAD_EXPERT, t, tid, e);
                e = -1;
            }
            if (e >= 0) {
                int d = (int)(e / L);
                ids[d][tid] = (int16_t)(e - (int64_t)d * L);
                atomicOr(&dest_mask, 1u << d);
            }
        }
        __syncthreads();
        const unsigned mask = dest_mask;
        if (!a.use_fp8) {
            /* bf16 as is: every chunk of the row goes to each destination, several loads in flight. */
            for (int64_t c0 = tid; c0 < chunks; c0 += LL_SEND_THREADS * LL_SEND_UNROLL) {
                if (c0 != tid)
                    load_bf16_batch(v, row, c0, chunks);
                for (int d = 0; d < R; d++) {
                    if (!(mask >> d & 1))
                        continue;
                    uint4 *dst = (uint4 *)(ll_half(g, d, p, a.half_bytes) + lay.dispatch_off +
                                           ((uint64_t)me * a.max_tokens + t) * lay.slot_bytes + lay.data_off);
#pragma unroll
                    for (int u = 0; u < LL_SEND_UNROLL; u++)
                        if (c0 + u * LL_SEND_THREADS < chunks)
                            dst[c0 + u * LL_SEND_THREADS] = v[u];
                }
            }
        } else {
            /* FP8: warp w casts groups w, w + W, ...; the loads of LL_SEND_UNROLL groups are issued together. */
            for (int g0 = warp; g0 < S; g0 += W * LL_SEND_UNROLL) {
                if (g0 != warp)
                    load_fp8_batch(raw, row, g0, lane, S);
#pragma unroll
                for (int u = 0; u < LL_SEND_UNROLL; u++) {
                    const int grp = g0 + u * W;
                    if (grp >= S)
                        break;
                    float s_inv;
                    uint32_t q = cast_group(raw[u], a.round_scale, &s_inv);
                    for (int d = 0; d < R; d++) {
                        if (!(mask >> d & 1))
                            continue;
                        char *slot = ll_half(g, d, p, a.half_bytes) + lay.dispatch_off +
                                     ((uint64_t)me * a.max_tokens + t) * lay.slot_bytes;
                        ((uint32_t *)(slot + lay.data_off + grp * 128))[lane] = q;
                        if (lane == 0)
                            ((float *)(slot + lay.scales_off))[grp] = s_inv;
                    }
                }
            }
        }
        if (tid < R && (mask >> tid & 1)) {
            ep_ll_header_t *h = (ep_ll_header_t *)(ll_half(g, tid, p, a.half_bytes) + lay.dispatch_off +
                                                   ((uint64_t)me * a.max_tokens + t) * lay.slot_bytes);
            h->token = t;
            for (int k = 0; k < EP_LL_MAX_TOPK; k++)
                h->local_ids[k] = ids[tid][k];
            h->tag = ep_ll_tag(epoch, R, a.max_tokens, a.hidden, K, a.num_experts);
        }
    }
    /* Block 0 tells every rank this call's sizes; they land before the flag, like the rows. */
    if (t == 0 && tid < R)
        *(volatile uint64_t *)((uint64_t *)(g.window[tid] + EP_CTRL_LL_DISPATCH_LAYOUTS) + p * R + me) =
            a.layout_word;
    /* The last block to finish tells every rank how many tokens this rank has (and that they landed). */
    __syncthreads();
    if (tid == 0)
        ep_last_block_signal(g, &g.ll_state[4 + p], &g.ll_state[p], epoch, EP_CTRL_LL_DISPATCH_FLAGS, p,
                             ((uint64_t)epoch << 32) | (uint32_t)a.num_tokens);
}

__global__ void __launch_bounds__(LL_SEND_THREADS)
    ll_dispatch_send_kernel(const __grid_constant__ ep_dev_group_t g,
                            const __grid_constant__ ep_ll_dispatch_kargs_t a) {
    dispatch_send_block(g, a, blockIdx.x, g.ll_state[a.parity] + 1);
}

/* Exclusive prefix of `valid` over the block; returns this thread's position, writes the total. */
__device__ __forceinline__ int block_scan(int valid, int *total) {
    __shared__ int warp_sums[LL_RECV_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned ballot = __ballot_sync(0xffffffffu, valid);
    int in_warp = __popc(ballot & ((1u << lane) - 1));
    if (lane == 0)
        warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, sum = 0;
    for (int w = 0; w < LL_RECV_THREADS / 32; w++) {
        before += w < warp ? warp_sums[w] : 0;
        sum += warp_sums[w];
    }
    __syncthreads();
    *total = sum;
    return before + in_warp;
}

/* The k by which slot header `h` names local expert l, or -1. The 64-byte header is read with four vector
 * loads issued together (one memory latency), the ids by constant indices (registers, not local memory).
 * With `lead_copy`, a header naming l is also copied there (by each of the token's experts here: the same bytes):
 * the per-rank combine reads the token's experts from that copy, which only this rank writes (a peer's later
 * dispatch may rewrite the slot while a hooked combine of this one still runs). */
__device__ __forceinline__ int slot_names_expert(const char *h, uint64_t tag, int l, int K, char *lead_copy) {
    union {
        uint4 v[4];
        ep_ll_header_t h;
    } u;
#pragma unroll
    for (int i = 0; i < 4; i++)
        u.v[i] = ((const uint4 *)h)[i];
    if (u.h.tag != tag)
        return -1;
    int found = -1;
#pragma unroll
    for (int k = EP_LL_MAX_TOPK - 1; k >= 0; k--)
        if (k < K && u.h.local_ids[k] == l)
            found = k;
    if (lead_copy != nullptr && found >= 0) /* by every expert the token names here: the same bytes */
#pragma unroll
        for (int i = 0; i < 4; i++)
            ((uint4 *)lead_copy)[i] = u.v[i];
    return found;
}

/* Whether source `src` (whose flag for this call has been seen) dispatched with other (T, H, K, E) or row format
 * than this rank: then its rows are not where this rank looks, so it is recorded as EP_DEV_STATUS_MISMATCH naming
 * the source (which fails the group) and its rows are not read. */
__device__ __forceinline__ bool layout_differs(const ep_dev_group_t &g, const ep_ll_dispatch_kargs_t &a, int p,
                                               int src) {
    const uint64_t *words = (const uint64_t *)(g.window[g.rank] + EP_CTRL_LL_DISPATCH_LAYOUTS);
    const uint64_t theirs = *(volatile const uint64_t *)(words + p * g.num_ranks + src);
    if (theirs == a.layout_word)
        return false;
    ep_record_error(g, EP_DEV_STATUS_MISMATCH, EP_STAGE_LL_DISPATCH_RECV, src, theirs, a.layout_word);
    return true;
}

/* a.recv_split blocks per local expert l. The slots of all sources are scanned as one sequence in (source,
 * token) order, EP_LL_RECV_THREADS at a time: a block-wide scan gives each slot that names l its row, so rows
 * come out in the reference's order. Each of l's blocks makes the same scan (a few header loads) and copies
 * every recv_split-th row, so more SMs move the rows; the first writes the bookkeeping. */
__device__ __forceinline__ void dispatch_recv_block(const ep_dev_group_t &g, const ep_ll_dispatch_kargs_t &a, int vb,
                                                    uint32_t epoch) {
    __shared__ int32_t first[EP_MAX_NVL_RANKS + 1]; /* first[s]: index of source s's slot 0 in the sequence */
    __shared__ int32_t per_src[EP_MAX_NVL_RANKS];   /* rows of l from each source */
    __shared__ int32_t picked[LL_RECV_THREADS];     /* sequence index of each picked slot of the chunk */
    const int R = g.num_ranks, me = g.rank, L = a.num_experts / R, K = a.topk, p = a.parity;
    const int split = a.recv_split, l = vb / split, sub = vb % split; /* sub 0 writes the bookkeeping */
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int64_t RT = (int64_t)R * a.max_tokens;
    const ep_ll_layout_t lay = ep_ll_layout(R, a.max_tokens, a.hidden, K, L);
    const char *half = ll_half(g, me, p, a.half_bytes);
    const uint64_t tag = ep_ll_tag(epoch, R, a.max_tokens, a.hidden, K, a.num_experts);
    if (tid < R) {
        uint64_t t0 = ep_globaltimer_ns();
        const uint64_t *flag = ll_flag(g, me, p, tid, EP_CTRL_LL_DISPATCH_FLAGS);
        uint64_t v = 0;
        bool ok = ep_wait_epoch(g, flag, epoch, EP_STAGE_LL_DISPATCH_RECV, tid, &v);
        ok = ok && !ep_flag_overrun(g, v, epoch, EP_STAGE_LL_DISPATCH_RECV, tid);
        ok = ok && !layout_differs(g, a, p, tid);
        first[tid + 1] = ok ? (int32_t)(v & 0xffffffffu) : 0;
        per_src[tid] = 0;
        if (a.wait_cost_stats && vb == 0)
            atomicAdd((unsigned long long *)&a.wait_cost_stats[tid], (unsigned long long)(ep_globaltimer_ns() - t0));
    }
    __syncthreads();
    if (tid == 0) {
        first[0] = 0;
        for (int s = 0; s < R; s++)
            first[s + 1] += first[s];
    }
    __syncthreads();
    const int S = a.hidden / 128;
    const int32_t slots = first[R];
    const int64_t row_bytes = a.use_fp8 ? a.hidden : 2 * (int64_t)a.hidden;
    int32_t row = 0;
    for (int32_t f0 = 0; f0 < slots; f0 += LL_RECV_THREADS) {
        const int32_t f = f0 + tid;
        int s = 0, k_found = -1;
        if (f < slots) {
            while (f >= first[s + 1])
                s++;
            const int j = f - first[s];
            const uint64_t sj = (uint64_t)s * a.max_tokens + j;
            k_found = slot_names_expert(half + lay.dispatch_off + sj * lay.slot_bytes, tag, l, K,
                                        sub == 0 ? (char *)half + lay.heads_off + sj * EP_LL_HEADER_BYTES : nullptr);
            if (k_found >= 0)
                atomicAdd(&per_src[s], 1);
        }
        int total;
        int pos = block_scan(k_found >= 0, &total);
        if (k_found >= 0) {
            const int j = f - first[s];
            picked[pos] = f;
            if (sub == 0) {
                a.src_info[l * RT + row + pos] = j;
                ((int32_t *)(half + lay.srck_off))[l * RT + row + pos] = (j << 5) | k_found;
                ((int32_t *)(half + lay.rowk_off))[((int64_t)s * a.max_tokens + j) * K + k_found] = row + pos;
            }
        }
        __syncthreads();
        for (int c = warp * split + sub; c < total; c += split * (LL_RECV_THREADS / 32)) {
            const int32_t fc = picked[c];
            int sc_src = 0;
            while (fc >= first[sc_src + 1])
                sc_src++;
            const char *slot =
                half + lay.dispatch_off + ((uint64_t)sc_src * a.max_tokens + (fc - first[sc_src])) * lay.slot_bytes;
            const int64_t out_row = l * RT + row + c;
            const float *scales = (const float *)(slot + lay.scales_off);
            float sc0 = 0.0f, sc1 = 0.0f; /* the first 64 scales, loaded before the row copy to overlap */
            if (a.use_fp8 && !a.use_ue8m0) {
                sc0 = lane < S ? scales[lane] : 0.0f;
                sc1 = lane + 32 < S ? scales[lane + 32] : 0.0f;
            }
            ep_warp_copy16((uint4 *)(a.recv_x + out_row * row_bytes), (const uint4 *)(slot + lay.data_off),
                           row_bytes / 16, lane);
            if (!a.use_fp8)
                continue;
            if (!a.use_ue8m0) {
                for (int gi = lane; gi < S; gi += 32)
                    ((float *)a.recv_scales)[((int64_t)l * S + gi) * RT + row + c] = gi < 32   ? sc0
                                                                                     : gi < 64 ? sc1
                                                                                               : scales[gi];
            } else {
                for (int wi = lane; wi < S / 4; wi += 32) {
                    uint32_t word = 0;
                    for (int b = 0; b < 4; b++)
                        word |= ((__float_as_uint(scales[wi * 4 + b]) >> 23) & 0xffu) << (8 * b);
                    ((int32_t *)a.recv_scales)[((int64_t)l * (S / 4) + wi) * RT + row + c] = (int32_t)word;
                }
            }
        }
        row += total;
        __syncthreads();
    }
    if (sub != 0)
        return;
    if (tid < R) {
        int32_t begin = 0;
        for (int s = 0; s < tid; s++)
            begin += per_src[s];
        int64_t range = ((int64_t)begin << 32) | (int64_t)per_src[tid];
        a.layout_range[l * R + tid] = range;
        ((int64_t *)(half + lay.range_off))[l * R + tid] = range;
    }
    if (tid == 0) {
        a.recv_count[l] = row;
        ((int32_t *)(half + lay.count_off))[l] = row;
        if (a.cumulative_stats)
            atomicAdd(&a.cumulative_stats[l], row);
    }
}

__global__ void __launch_bounds__(LL_RECV_THREADS, LL_RECV_MIN_BLOCKS)
    ll_dispatch_recv_kernel(const __grid_constant__ ep_dev_group_t g,
                            const __grid_constant__ ep_ll_dispatch_kargs_t a) {
    dispatch_recv_block(g, a, blockIdx.x, g.ll_state[a.parity]); /* the send kernel before it set the epoch */
}

/* Send and receive in one kernel (the call without a hook): G = max(N, blocks of the receive) blocks each send
 * their token, and the last `recv_blocks` of them then receive. Receivers wait only after sending, and the
 * blocks that only send come first, so every send runs whatever number of blocks the GPU holds at once. */
__global__ void __launch_bounds__(LL_SEND_THREADS, LL_RECV_MIN_BLOCKS)
    ll_dispatch_fused_kernel(const __grid_constant__ ep_dev_group_t g,
                             const __grid_constant__ ep_ll_dispatch_kargs_t a) {
    const uint32_t epoch = g.ll_state[a.parity] + 1; /* read before this block counts itself done */
    dispatch_send_block(g, a, blockIdx.x, epoch);
    const int recv_blocks = a.num_experts / g.num_ranks * a.recv_split;
    const int vb = (int)blockIdx.x - ((int)gridDim.x - recv_blocks);
    if (vb >= 0)
        dispatch_recv_block(g, a, vb, epoch);
}

extern "C" cudaError_t ep_launch_ll_dispatch_send(const ep_dev_group_t *g, const ep_ll_dispatch_kargs_t *a,
                                                  cudaStream_t s) {
    int blocks = a->num_tokens > 0 ? a->num_tokens : 1;
    ll_dispatch_send_kernel<<<blocks, LL_SEND_THREADS, 0, s>>>(*g, *a);
    return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ll_dispatch_recv(const ep_dev_group_t *g, const ep_ll_dispatch_kargs_t *a,
                                                  cudaStream_t s) {
    ep_ll_dispatch_kargs_t k = *a;
    k.recv_split = LL_RECV_SPLIT;
    ll_dispatch_recv_kernel<<<a->num_experts / g->num_ranks * k.recv_split, LL_RECV_THREADS, 0, s>>>(*g, k);
    return cudaGetLastError();
}

/* The call without a hook: one fused kernel when its grid fits on the GPU at once (with two receive blocks per
 * expert, else one), else send then receive. */
extern "C" cudaError_t ep_launch_ll_dispatch_both(const ep_dev_group_t *g, const ep_ll_dispatch_kargs_t *a,
                                                  int cooperative, cudaStream_t s) {
    static int per_sm;
    const int capacity = ep_wave_capacity((const void *)ll_dispatch_fused_kernel, LL_SEND_THREADS, g->num_sms, &per_sm);
    const int L = a->num_experts / g->num_ranks;
    for (int split = LL_RECV_SPLIT; split >= 1; split--) {
        const int blocks = a->num_tokens > L * split ? a->num_tokens : L * split;
        if (blocks <= capacity) {
            ep_ll_dispatch_kargs_t k = *a;
            k.recv_split = split;
            cudaError_t err = ep_launch_resident(ll_dispatch_fused_kernel, blocks, LL_SEND_THREADS, cooperative, s,
                                                 *g, k);
            if (err != cudaErrorCooperativeLaunchTooLarge)
                return err;
        }
    }
    cudaError_t err = ep_launch_ll_dispatch_send(g, a, s);
    return err == cudaSuccess ? ep_launch_ll_dispatch_recv(g, a, s) : err;
}
