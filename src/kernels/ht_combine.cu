/* Combine in two steps: the expert ranks send each received row back to the rank it came from (send kernel
 * on the SM budget), a barrier, then every rank sums, for each of its tokens, the rows that came back, in
 * ascending rank order (reduce kernel on every SM). The row work is in ht_combine_row.cuh. */
#include "ht_combine_row.cuh"

__global__ void __launch_bounds__(COMBINE_WARPS * 32)
    ht_combine_send_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ht_combine_args_t a) {
    __shared__ combine_send_plan_t plan;
    const int R = g.num_ranks, lane = threadIdx.x % 32;
    const ep_ht_combine_region_t reg = ep_ht_combine_region(a.data_bytes, a.row_bytes, a.topk);
    if (threadIdx.x == 0)
        combine_plan_send(g, a, reg, &plan);
    __syncthreads();
    if (plan.skip)
        return;
    const int64_t virtual_rows = combine_virtual_rows(plan, R);
    for (int64_t v = (int64_t)blockIdx.x * COMBINE_WARPS + threadIdx.x / 32; v < virtual_rows;
         v += (int64_t)gridDim.x * COMBINE_WARPS) {
        const int s = (int)(v % R);
        const int64_t j = v / R;
        if (j < plan.recv_start[s + 1] - plan.recv_start[s])
            combine_send_row(g, a, reg, plan, s, j, lane);
    }
}

__global__ void __launch_bounds__(COMBINE_WARPS * 32)
    ht_combine_reduce_kernel(const __grid_constant__ ep_dev_group_t g, const __grid_constant__ ep_ht_combine_args_t a) {
    __shared__ combine_reduce_plan_t plan;
    const int R = g.num_ranks, lane = threadIdx.x % 32;
    const ep_ht_combine_region_t reg = ep_ht_combine_region(a.data_bytes, a.row_bytes, a.topk);
    const char *region = combine_region(g, g.rank, a);
    combine_plan_reduce(g, a, &plan);
    __syncthreads();
    const int valid = *a.routing.num_recv >= 0;
    for (int64_t t = (int64_t)blockIdx.x * COMBINE_WARPS + threadIdx.x / 32; t < a.num_tokens;
         t += (int64_t)gridDim.x * COMBINE_WARPS)
        combine_reduce_token(a, reg, region, plan, R, t, combine_run_index(a, plan, R, t, lane, valid), lane);
}

extern "C" cudaError_t ep_launch_ht_combine_send(const ep_dev_group_t *g, const ep_ht_combine_args_t *a,
                                                 cudaStream_t s) {
    ht_combine_send_kernel<<<a->num_blocks, COMBINE_WARPS * 32, 0, s>>>(*g, *a);
    return cudaGetLastError();
}

extern "C" cudaError_t ep_launch_ht_combine_reduce(const ep_dev_group_t *g, const ep_ht_combine_args_t *a,
                                                   cudaStream_t s) {
    if (a->num_tokens == 0)
        return cudaSuccess;
    ht_combine_reduce_kernel<<<a->num_reduce_blocks, COMBINE_WARPS * 32, 0, s>>>(*g, *a);
    return cudaGetLastError();
}
