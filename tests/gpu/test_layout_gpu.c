/* ep_get_dispatch_layout against the CPU reference, one process per GPU: random routing with masked (-1)
 * entries, duplicate experts in a row, K from 1 to 32, E in {8, 64, 256, 288} (rounded up to a multiple of R), N from 0
 * to 8192, padded row strides; and out-of-range ids, which are skipped and reported as EP_ERROR_DEVICE_INPUT.
 * Outputs are poisoned before every run; every element is compared. */
#define _POSIX_C_SOURCE 200809L
#include "epref.h"
#include "mp.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int tokens, topk, experts, stride_pad, duplicates, bad_ids;
} layout_case_t;

static const layout_case_t cases[] = {
    {4096, 8, 256, 0, 0, 0}, {8192, 8, 256, 3, 0, 0}, {0, 8, 64, 0, 0, 0},    {1, 1, 8, 0, 0, 0},
    {777, 32, 288, 1, 0, 0}, {1000, 6, 64, 0, 1, 0},  {513, 32, 64, 0, 1, 0}, {2048, 8, 256, 0, 0, 1},
};

static int compare_i32(int rank, const char *what, const int32_t *got, const int32_t *want, int n) {
    for (int i = 0; i < n; i++)
        if (got[i] != want[i]) {
            fprintf(stderr, "[rank %d] %s[%d]: got %d, want %d\n", rank, what, i, got[i], want[i]);
            return 1;
        }
    return 0;
}

static int run_case(int rank, ep_group_t g, int R, const layout_case_t *c, uint64_t seed) {
    int failures = 0;
    if (c->topk > mp_experts(c->experts, R))
        return 0;
    int N = c->tokens, K = c->topk, E = mp_experts(c->experts, R);
    int64_t row = K + c->stride_pad;
    size_t n_idx = (size_t)(N ? N : 1) * (size_t)row;
    int64_t *idx = calloc(n_idx, sizeof(int64_t));
    int64_t *clean = calloc((size_t)(N ? N : 1) * (size_t)K, sizeof(int64_t));
    epref_rng_t rng;
    epref_rng_seed(&rng, seed, (uint64_t)rank);
    epref_random_routing(&rng, N, K, E, 0.1f, clean, NULL);
    for (int t = 0; t < N; t++) {
        if (c->duplicates && K > 1 && t % 3 == 0)
            clean[(size_t)t * K + K - 1] = clean[(size_t)t * K];
        for (int k = 0; k < K; k++)
            idx[(size_t)t * row + k] = clean[(size_t)t * K + k];
        if (c->bad_ids && t % 97 == 5) {
            idx[(size_t)t * row + (t % K)] = t % 2 ? E + t : -2 - t; /* out of range: skipped */
            clean[(size_t)t * K + (t % K)] = -1;
        }
    }
    int32_t *want_rank = calloc((size_t)R, 4), *want_expert = calloc((size_t)E, 4);
    uint8_t *want_in = calloc((size_t)(N ? N : 1) * (size_t)R, 1);
    if (epref_dispatch_layout(clean, N, K, R, E, want_rank, want_expert, want_in) != EPREF_OK) {
        MP_FAIL(rank, "reference: %s", epref_last_error());
        return failures;
    }
    int64_t *d_idx;
    int32_t *d_rank, *d_expert;
    uint8_t *d_in;
    mp_malloc((void **)&d_idx, n_idx * 8);
    mp_malloc((void **)&d_rank, (size_t)R * 4);
    mp_malloc((void **)&d_expert, (size_t)E * 4);
    mp_malloc((void **)&d_in, (size_t)(N ? N : 1) * (size_t)R);
    cudaMemcpy(d_idx, idx, n_idx * 8, cudaMemcpyHostToDevice);
    cudaMemset(d_rank, 0x5A, (size_t)R * 4); /* poison */
    cudaMemset(d_expert, 0x5A, (size_t)E * 4);
    cudaMemset(d_in, 0x77, (size_t)(N ? N : 1) * (size_t)R);
    ep_tensor_t t_idx = ep_tensor_2d(d_idx, EP_DTYPE_INT64, N, K);
    t_idx.strides[0] = row;
    ep_tensor_t t_rank = ep_tensor_1d(d_rank, EP_DTYPE_INT32, R);
    ep_tensor_t t_expert = ep_tensor_1d(d_expert, EP_DTYPE_INT32, E);
    ep_tensor_t t_in = ep_tensor_2d(d_in, EP_DTYPE_BOOL, N, R);
    MP_EXPECT_STATUS(rank, ep_get_dispatch_layout(g, &t_idx, E, &t_rank, NULL, &t_expert, &t_in, NULL), EP_SUCCESS);
    ep_status_t st = ep_group_synchronize(g, NULL);
    if (c->bad_ids && N > 5) {
        if (st != EP_ERROR_DEVICE_INPUT || !strstr(ep_last_error(), "topk_idx["))
            MP_FAIL(rank, "bad ids: synchronize returned %s (%s), expected EP_ERROR_DEVICE_INPUT naming topk_idx",
                    ep_status_string(st), ep_last_error());
        else if (rank == 0)
            printf("     rank 0 saw: %s\n", ep_last_error());
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS); /* reported once, then cleared */
    } else if (st != EP_SUCCESS) {
        MP_FAIL(rank, "synchronize: %s", ep_last_error());
    }
    int32_t *got_rank = calloc((size_t)R, 4), *got_expert = calloc((size_t)E, 4);
    uint8_t *got_in = calloc((size_t)(N ? N : 1) * (size_t)R, 1);
    cudaMemcpy(got_rank, d_rank, (size_t)R * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(got_expert, d_expert, (size_t)E * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(got_in, d_in, (size_t)N * (size_t)R, cudaMemcpyDeviceToHost);
    failures += compare_i32(rank, "num_tokens_per_rank", got_rank, want_rank, R);
    failures += compare_i32(rank, "num_tokens_per_expert", got_expert, want_expert, E);
    for (int i = 0; i < N * R && !failures; i++)
        if (got_in[i] != want_in[i])
            MP_FAIL(rank, "is_token_in_rank[%d, %d]: got %d, want %d", i / R, i % R, got_in[i], want_in[i]);
    if (failures)
        fprintf(stderr, "[rank %d] case N=%d K=%d E=%d failed\n", rank, N, K, E);
    mp_free(d_idx), mp_free(d_rank), mp_free(d_expert), mp_free(d_in);
    free(idx), free(clean), free(want_rank), free(want_expert), free(want_in), free(got_rank), free(got_expert),
        free(got_in);
    return failures;
}

static int layout_vs_reference(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    mp_enter_device(rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    ep_group_t g = NULL;
    if (ep_group_create(id, num_ranks, rank, mp_device(rank), &cfg, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    for (int round = 0; round < 3; round++)
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
            failures += run_case(rank, g, num_ranks, &cases[i], 1000u * (uint64_t)round + i);
    /* Bad arguments: nothing launched, group still fine. */
    ep_tensor_t bad = ep_tensor_2d((void *)16, EP_DTYPE_INT32, 4, 8);
    ep_tensor_t r = ep_tensor_1d((void *)16, EP_DTYPE_INT32, num_ranks);
    ep_tensor_t e = ep_tensor_1d((void *)16, EP_DTYPE_INT32, 64);
    ep_tensor_t in = ep_tensor_2d((void *)16, EP_DTYPE_BOOL, 4, num_ranks);
    MP_EXPECT_STATUS(rank, ep_get_dispatch_layout(g, &bad, 64, &r, NULL, &e, &in, NULL), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "topk_idx: expected dtype int64, got int32"))
        MP_FAIL(rank, "message: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

int main(int argc, char **argv) {
    int ranks = mp_arg_int(argc, argv, "--ranks", 2);
    int failed = mp_run("layout.matches_reference", ranks, layout_vs_reference, NULL, 120) != 0;
    printf("%d passed, %d failed\n", 1 - failed, failed);
    return failed;
}
