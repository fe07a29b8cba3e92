/* Combine's per-row and per-token work, shared by the two-step combine (ht_combine.cu: send kernel, barrier,
 * reduce kernel) and the overlapped one (ht_combine_overlap.cu: both in one kernel, per-chunk counters).
 *
 * Send: the rows a rank received from source s form one contiguous run (rows are ordered by source), and
 * they go to one contiguous run of s's combine region (after the runs of lower ranks), so a warp per row
 * copies 16-byte chunks with no gather. Reduce: one warp per token, float32 accumulation in ascending rank
 * order, bias0 then bias1, one rounding to bf16. */
#ifndef EP_HT_COMBINE_ROW_CUH
#define EP_HT_COMBINE_ROW_CUH

#include "bf16.cuh"
#include "ht_kernels.h"
#include "ht_layout.h"
#include "sync.cuh"

#define COMBINE_WARPS  16
#define COMBINE_UNROLL 4

__device__ __forceinline__ char *combine_region(const ep_dev_group_t &g, int rank, const ep_ht_combine_args_t &a) {
    return g.window[rank] + EP_CTRL_BYTES + ep_ht_combine_base(a.data_bytes, a.parity);
}

__device__ __forceinline__ void add_bf16x8(float acc[8], uint4 v) {
    acc[0] += ep_bf16_lo(v.x), acc[1] += ep_bf16_hi(v.x), acc[2] += ep_bf16_lo(v.y), acc[3] += ep_bf16_hi(v.y);
    acc[4] += ep_bf16_lo(v.z), acc[5] += ep_bf16_hi(v.z), acc[6] += ep_bf16_lo(v.w), acc[7] += ep_bf16_hi(v.w);
}

/* Where the sender's rows are: recv_start[s] (rows from source s start there on this rank; [R] = all rows),
 * dst_start[s] (this rank's run starts there in s's region). */
typedef struct {
    int32_t recv_start[EP_MAX_NVL_RANKS + 1];
    int32_t dst_start[EP_MAX_NVL_RANKS];
    int skip; /* the dispatch was abandoned, or a region would overflow (recorded): send nothing */
} combine_send_plan_t;

/* Thread 0 of the block fills the plan (the caller synchronises the block afterwards). */
__device__ __forceinline__ void combine_plan_send(const ep_dev_group_t &g, const ep_ht_combine_args_t &a,
                                                  const ep_ht_combine_region_t &reg, combine_send_plan_t *p) {
    const int R = g.num_ranks, me = g.rank;
    p->skip = *a.routing.num_recv < 0;
    int32_t off = 0;
    for (int s = 0; s < R; s++) {
        p->recv_start[s] = off;
        off += a.routing.counts[s * R + me];
        int32_t before = 0, total = 0;
        for (int d = 0; d < R; d++) {
            before += d < me ? a.routing.counts[s * R + d] : 0;
            total += a.routing.counts[s * R + d];
        }
        p->dst_start[s] = before;
        if (total > (int64_t)reg.rows) { /* every rank sees the same and skips */
            if (blockIdx.x == 0)
                ep_record_input_error(g.input_error, EP_STAGE_COMBINE_SEND, EP_INPUT_CAPACITY, reg.rows, s, total);
            p->skip = 1;
        }
    }
    p->recv_start[R] = off;
}

/* Rows are stored by source, so walking them in order would send to one peer at a time and leave the other
 * NVLinks idle. Interleave instead: virtual row v is row v / R of source v % R; this is how many there are. */
__device__ __forceinline__ int64_t combine_virtual_rows(const combine_send_plan_t &p, int R) {
    int64_t most = 0;
    for (int s = 0; s < R; s++)
        most = max(most, (int64_t)(p.recv_start[s + 1] - p.recv_start[s]));
    return most * R;
}

/* The warp sends row j of source s's run (its expert output row and its topk weights) back to s. */
__device__ __forceinline__ void combine_send_row(const ep_dev_group_t &g, const ep_ht_combine_args_t &a,
                                                 const ep_ht_combine_region_t &reg, const combine_send_plan_t &p,
                                                 int s, int64_t j, int lane) {
    const int64_t chunks = a.row_bytes / 16;
    const int64_t i = p.recv_start[s] + j, row = p.dst_start[s] + j;
    char *region = combine_region(g, s, a);
    const uint4 *src = (const uint4 *)(a.x + i * a.x_stride_bytes);
    uint4 *dst = (uint4 *)(region + reg.x_off + row * a.row_bytes);
    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * COMBINE_UNROLL) {
        uint4 v[COMBINE_UNROLL];
#pragma unroll
        for (int u = 0; u < COMBINE_UNROLL; u++)
            if (c0 + u * 32 < chunks)
                v[u] = __ldg(src + c0 + u * 32);
#pragma unroll
        for (int u = 0; u < COMBINE_UNROLL; u++)
            if (c0 + u * 32 < chunks)
                dst[c0 + u * 32] = v[u];
    }
    if (a.weights && lane < a.topk)
        ((float *)(region + reg.weights_off))[row * a.topk + lane] = a.weights[i * a.w_stride + lane];
}

/* Where the receiver's rows are: region_start[d] (rows from destination d start there in this rank's
 * region), base[d] (this rank's first row at d, to turn a send position into an index in d's run). */
typedef struct {
    int32_t region_start[EP_MAX_NVL_RANKS];
    int32_t base[EP_MAX_NVL_RANKS];
} combine_reduce_plan_t;

/* Threads 0..R-1 fill the plan (the caller synchronises the block afterwards). */
__device__ __forceinline__ void combine_plan_reduce(const ep_dev_group_t &g, const ep_ht_combine_args_t &a,
                                                    combine_reduce_plan_t *p) {
    const int R = g.num_ranks, me = g.rank;
    if (threadIdx.x < R) {
        int d = threadIdx.x;
        int32_t start = 0, b = 0;
        for (int e = 0; e < d; e++)
            start += a.routing.counts[me * R + e];
        for (int s = 0; s < me; s++)
            b += a.routing.counts[s * R + d];
        p->region_start[d] = start;
        p->base[d] = b;
    }
}

/* Lane d < R: the index in destination d's run of token t's row, or -1 (not sent there, or abandoned). */
__device__ __forceinline__ int combine_run_index(const ep_ht_combine_args_t &a, const combine_reduce_plan_t &p,
                                                 int R, int64_t t, int lane, int valid) {
    int pos = (lane < R && valid) ? a.routing.send_pos[t * R + lane] : -1;
    return pos >= 0 ? pos - p.base[lane] : -1;
}

/* The warp sums token t's rows (run index j_lane from lane d, see combine_run_index) in ascending rank order,
 * adds the biases, rounds once and writes out (and the weights' sum). */
__device__ __forceinline__ void combine_reduce_token(const ep_ht_combine_args_t &a, const ep_ht_combine_region_t &reg,
                                                     const char *region, const combine_reduce_plan_t &p, int R,
                                                     int64_t t, int j_lane, int lane) {
    const int64_t chunks = a.row_bytes / 16;
    const int my_row = j_lane >= 0 ? p.region_start[lane] + j_lane : -1;
    int rows[EP_MAX_NVL_RANKS];
#pragma unroll
    for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
        rows[d] = __shfl_sync(0xffffffffu, my_row, d);
    /* Several 16-byte chunks per lane per step: R * COMBINE_UNROLL independent loads in flight. */
    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * COMBINE_UNROLL) {
        float acc[COMBINE_UNROLL][8];
#pragma unroll
        for (int u = 0; u < COMBINE_UNROLL; u++)
#pragma unroll
            for (int j = 0; j < 8; j++)
                acc[u][j] = 0.0f;
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++) {
            if (d >= R || rows[d] < 0)
                continue;
            const uint4 *src = (const uint4 *)(region + reg.x_off + (int64_t)rows[d] * a.row_bytes);
            uint4 v[COMBINE_UNROLL];
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; u++)
                if (c0 + u * 32 < chunks)
                    v[u] = src[c0 + u * 32];
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; u++)
                if (c0 + u * 32 < chunks)
                    add_bf16x8(acc[u], v[u]);
        }
#pragma unroll
        for (int u = 0; u < COMBINE_UNROLL; u++) {
            int64_t c = c0 + u * 32;
            if (c >= chunks)
                continue;
            if (a.bias0)
                add_bf16x8(acc[u], ((const uint4 *)(a.bias0 + t * a.bias0_stride))[c]);
            if (a.bias1)
                add_bf16x8(acc[u], ((const uint4 *)(a.bias1 + t * a.bias1_stride))[c]);
            ((uint4 *)(a.out + t * a.out_stride))[c] = ep_pack_bf16x8(acc[u]);
        }
    }
    if (a.out_weights && lane < a.topk) {
        float w = 0.0f;
#pragma unroll
        for (int d = 0; d < EP_MAX_NVL_RANKS; d++)
            if (d < R && rows[d] >= 0)
                w += ((const float *)(region + reg.weights_off))[(int64_t)rows[d] * a.topk + lane];
        a.out_weights[t * a.out_w_stride + lane] = w;
    }
}

#endif
