/* Dispatch layout: per-rank and per-expert token counts and the token -> rank membership matrix.
 * One warp per token: lane k reads topk_idx[t, k]; __match_any_sync finds duplicate experts in a row so a
 * (token, expert) pair counts once, and an OR-reduction of rank bits gives the token's destination ranks.
 * Counts gather in shared memory per block, then one global atomic per counter per block. Integer sums
 * commute, so results are deterministic. */
#include "layout_kernels.h"
#include "sync.cuh"

#define LAYOUT_WARPS 8

__global__ void dispatch_layout_kernel(ep_layout_args_t a, ep_dev_input_error_t *err) {
    extern __shared__ int32_t smem[]; /* [E] expert counts, then [R] rank counts */
    int32_t *expert_count = smem;
    int32_t *rank_count = smem + a.num_experts;
    for (int i = threadIdx.x; i < a.num_experts + a.num_ranks; i += blockDim.x)
        smem[i] = 0;
    __syncthreads();

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int experts_per_rank = a.num_experts / a.num_ranks;
    for (int64_t t = (int64_t)blockIdx.x * LAYOUT_WARPS + warp; t < a.num_tokens;
         t += (int64_t)gridDim.x * LAYOUT_WARPS) {
        int64_t e = -1;
        if (lane < a.topk) {
            e = a.topk_idx[t * a.topk_row_stride + lane];
            if (e < -1 || e >= a.num_experts) {
                ep_record_input_error(err, EP_STAGE_LAYOUT, EP_INPUT_BAD_EXPERT, t, lane, e);
                e = -1;
            }
        }
        const int valid = e >= 0;
        /* Lanes holding the same expert: only the lowest counts it. */
        unsigned same = __match_any_sync(0xffffffffu, (unsigned long long)e);
        if (valid && (__ffs(same) - 1) == lane)
            atomicAdd(&expert_count[e], 1);
        unsigned rank_bits = __reduce_or_sync(0xffffffffu, valid ? 1u << (unsigned)(e / experts_per_rank) : 0u);
        if (lane < a.num_ranks) {
            int in_rank = (rank_bits >> lane) & 1u;
            a.is_token_in_rank[t * a.in_rank_row_stride + lane] = (uint8_t)in_rank;
            if (in_rank)
                atomicAdd(&rank_count[lane], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x)
        if (expert_count[i])
            atomicAdd(&a.tokens_per_expert[i], expert_count[i]);
    for (int i = threadIdx.x; i < a.num_ranks; i += blockDim.x)
        if (rank_count[i])
            atomicAdd(&a.tokens_per_rank[i], rank_count[i]);
}

extern "C" cudaError_t ep_launch_dispatch_layout(const ep_layout_args_t *args, ep_dev_input_error_t *input_error,
                                                 cudaStream_t stream) {
    cudaError_t err = cudaMemsetAsync(args->tokens_per_rank, 0, sizeof(int32_t) * (size_t)args->num_ranks, stream);
    if (err == cudaSuccess)
        err = cudaMemsetAsync(args->tokens_per_expert, 0, sizeof(int32_t) * (size_t)args->num_experts, stream);
    if (err != cudaSuccess || args->num_tokens == 0)
        return err;
    size_t smem = sizeof(int32_t) * (size_t)(args->num_experts + args->num_ranks);
    if (smem > 48 * 1024) {
        err = cudaFuncSetAttribute(dispatch_layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess)
            return err;
    }
    int blocks = (args->num_tokens + LAYOUT_WARPS - 1) / LAYOUT_WARPS;
    if (blocks > 1024)
        blocks = 1024;
    dispatch_layout_kernel<<<blocks, LAYOUT_WARPS * 32, smem, stream>>>(*args, input_error);
    return cudaGetLastError();
}
