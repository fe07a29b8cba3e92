/* Combine with the reduction overlapped with the transfer (experimental, EPCOMM_HT_COMBINE_OVERLAP=W). One
 * kernel on the SM budget, launched cooperatively (every block resident at once: reducing warps wait for rows
 * that other blocks send). In each block, warps [0, 16 - W) send rows as the two-step combine does, and after
 * each row add one, with release semantics, to the counter of its chunk (EP_HT_COMBINE_CHUNK_ROWS rows of the
 * sender's run) at the receiver; warps [16 - W, 16) reduce this rank's tokens, taken in ascending order from a
 * shared counter, each first waiting (acquire) until the chunks holding its rows are complete; sending warps
 * join the reduction when their rows are out. Senders walk their runs in ascending order too, so the
 * reduction trails the transfer instead of starting after it. The last block to finish zeroes this rank's
 * counters of this parity; the barrier after the kernel orders that before their next use. */
#include "ht_combine_row.cuh"
#include "wave.cuh"

__device__ __forceinline__ uint32_t *chunk_counter(const ep_dev_group_t &g, int rank, int parity, int src, int chunk) {
    return (uint32_t *)(g.window[rank] + EP_CTRL_HT_COMBINE_CHUNKS) +
           ((int64_t)(parity * g.num_ranks + src) * EP_HT_COMBINE_MAX_CHUNKS + chunk);
}

/* Rows per chunk: EP_HT_COMBINE_CHUNK_ROWS, or a multiple of it so that the longest run (the largest count of
 * the [R][R] matrix, the same on every rank) fits in EP_HT_COMBINE_MAX_CHUNKS chunks. */
__device__ __forceinline__ int combine_chunk_rows(const ep_ht_combine_args_t &a, int R) {
    int most = 0;
    for (int i = 0; i < R * R; i++)
        most = max(most, a.routing.counts[i]);
    const int per = EP_HT_COMBINE_CHUNK_ROWS * EP_HT_COMBINE_MAX_CHUNKS;
    return EP_HT_COMBINE_CHUNK_ROWS * max(1, (most + per - 1) / per);
}

__device__ __forceinline__ void overlap_send(const ep_dev_group_t &g, const ep_ht_combine_args_t &a,
                                             const ep_ht_combine_region_t &reg, const combine_send_plan_t &plan,
                                             int chunk_rows, int send_warps, int warp, int lane) {
    const int R = g.num_ranks;
    const int64_t virtual_rows = combine_virtual_rows(plan, R);
    for (int64_t v = (int64_t)blockIdx.x * send_warps + warp; v < virtual_rows; v += (int64_t)gridDim.x * send_warps) {
        const int s = (int)(v % R);
        const int64_t j = v / R;
        if (j >= plan.recv_start[s + 1] - plan.recv_start[s])
            continue;
        combine_send_row(g, a, reg, plan, s, j, lane);
        __syncwarp(); /* the warp's stores are ordered before lane 0's release */
        if (lane == 0)
            ep_red_add_release_sys(chunk_counter(g, s, a.parity, g.rank, (int)(j / chunk_rows)), 1u);
    }
}

/* Reduces tokens handed out in ascending order by a counter in device memory (ll_state[9]), until none are
 * left: the W reducing warps from the start, the sending warps once their rows are out. `landed`: 0 when
 * nothing was sent (an abandoned dispatch, or a region that would overflow: the same decision on every
 * rank): tokens then get their biases only and nothing is awaited. */
__device__ __forceinline__ void overlap_reduce(const ep_dev_group_t &g, const ep_ht_combine_args_t &a,
                                               const ep_ht_combine_region_t &reg, const combine_reduce_plan_t &plan,
                                               int chunk_rows, int landed, int lane) {
    const int R = g.num_ranks, me = g.rank;
    const char *region = combine_region(g, me, a);
    for (;;) {
        uint32_t next = 0;
        if (lane == 0)
            next = atomicAdd(&g.ll_state[9], 1u);
        const int64_t t = __shfl_sync(0xffffffffu, next, 0);
        if (t >= a.num_tokens)
            break;
        const int j = combine_run_index(a, plan, R, t, lane, landed);
        if (j >= 0) { /* lane d < R: token t's row from d is row j of d's run */
            const int c = j / chunk_rows, n = a.routing.counts[me * R + lane];
            const uint32_t rows = (uint32_t)min(chunk_rows, n - c * chunk_rows);
            ep_wait_geq<uint32_t>(g, chunk_counter(g, me, a.parity, lane, c), rows, EP_STAGE_COMBINE_SEND, lane);
        }
        __syncwarp(); /* lane d's acquire orders the other lanes' loads of d's rows */
        combine_reduce_token(a, reg, region, plan, R, t, j, lane);
    }
}

/* Every chunk counter of this rank was awaited to completion by some token, so once every block is done no
 * add is in flight: the last block zeroes them. */
__device__ __forceinline__ void overlap_reset_counters(const ep_dev_group_t &g, const ep_ht_combine_args_t &a,
                                                       int chunk_rows, int landed) {
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&g.ll_state[8], 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last)
        return;
    if (threadIdx.x == 0)
        g.ll_state[8] = g.ll_state[9] = 0;
    const int R = g.num_ranks, me = g.rank;
    for (int d = 0; d < R && landed; d++) {
        const int chunks = (a.routing.counts[me * R + d] + chunk_rows - 1) / chunk_rows;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x)
            *chunk_counter(g, me, a.parity, d, c) = 0;
    }
}

__global__ void __launch_bounds__(COMBINE_WARPS * 32)
    ht_combine_overlap_kernel(const __grid_constant__ ep_dev_group_t g,
                              const __grid_constant__ ep_ht_combine_args_t a) {
    __shared__ combine_send_plan_t send_plan;
    __shared__ combine_reduce_plan_t reduce_plan;
    const int R = g.num_ranks, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int send_warps = COMBINE_WARPS - a.overlap_reduce_warps;
    const ep_ht_combine_region_t reg = ep_ht_combine_region(a.data_bytes, a.row_bytes, a.topk);
    if (threadIdx.x == 0)
        combine_plan_send(g, a, reg, &send_plan);
    combine_plan_reduce(g, a, &reduce_plan);
    const int chunk_rows = combine_chunk_rows(a, R);
    __syncthreads();
    const int landed = !send_plan.skip;
    if (warp < send_warps && landed)
        overlap_send(g, a, reg, send_plan, chunk_rows, send_warps, warp, lane);
    overlap_reduce(g, a, reg, reduce_plan, chunk_rows, landed, lane);
    overlap_reset_counters(g, a, chunk_rows, landed);
}

extern "C" cudaError_t ep_launch_ht_combine_overlap(const ep_dev_group_t *g, const ep_ht_combine_args_t *a,
                                                    cudaStream_t s) {
    return ep_launch_resident(ht_combine_overlap_kernel, a->num_blocks, COMBINE_WARPS * 32, 1, s, *g, *a);
}
