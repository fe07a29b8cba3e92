/* High-throughput dispatch and combine against the CPU reference, one process per GPU.
 * Every rank draws every rank's inputs from (seed, rank), runs the reference for its own view and compares
 * every received byte, index, weight and source index, the per-expert counts, and the combined rows
 * bitwise. The expert at rank d computes y = bf16(x * (1 + d/8)) on the host, so each rank's contribution
 * differs and the reduction order matters. Receive regions and outputs are poisoned before every run. */
#define _POSIX_C_SOURCE 200809L
#include "epref.h"
#include "group.h"
#include "kernels/ht_layout.h"
#include "mp.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    int tokens, hidden, topk, experts;
    int fp8; /* 1: FP8 rows with float32 scales; 2: the same scales passed as int32 words (packed-UE8M0 style) */
    int weights, alignment, worst, biases;
    int zero_on_rank0, all_to_last, bad_ids, cached_rounds;
    int pad; /* extra elements after each row of x (dispatch) and of the expert output (combine) on the device */
} ht_case_t;

static const ht_case_t cases[] = {
    {"standard_bf16", 4096, 7168, 8, 256, 0, 1, 1, 0, 0, 0, 0, 0, 1, 0},
    {"aligned_bias0", 1000, 2048, 6, 64, 0, 1, 4, 0, 1, 0, 0, 0, 0, 0},
    {"fp8_colmajor_scales", 512, 7168, 8, 256, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0},
    {"worst_tokens_k32", 777, 4096, 32, 64, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0},
    {"zero_tokens_rank0", 300, 8192, 8, 288, 0, 0, 1, 0, 2, 1, 0, 0, 0, 0},
    {"all_to_last_rank", 640, 4096, 8, 64, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0},
    {"h128_k1_e8", 2000, 128, 1, 8, 0, 1, 2, 0, 2, 0, 0, 0, 0, 0},
    {"h16384", 256, 16384, 8, 288, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0},
    {"bad_expert_ids", 512, 2048, 8, 64, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0},
    {"padded_rows", 1000, 2048, 8, 64, 0, 1, 1, 0, 1, 0, 0, 0, 1, 64},
    {"fp8_int32_scales", 256, 2048, 8, 64, 2, 1, 1, 0, 0, 0, 0, 0, 1, 0},
};

typedef struct {
    int n;
    uint8_t *x;     /* [n, row_bytes] */
    float *scales;  /* [n, H/128] logical; uploaded column-major */
    int64_t *idx;   /* [n, K] as given to the GPU (may hold bad ids) */
    int64_t *clean; /* [n, K] bad ids replaced by -1 (what the reference sees) */
    float *w;
    epref_rank_input_t in;
} rank_inputs_t;

static int tokens_of(const ht_case_t *c, int rank) {
    if (c->zero_on_rank0 && rank == 0)
        return 0;
    return c->tokens + 37 * rank;
}

static void make_inputs(const ht_case_t *c, int R, int r, uint64_t seed, rank_inputs_t *ri) {
    int n = tokens_of(c, r), H = c->hidden, K = c->topk, E = mp_experts(c->experts, R);
    size_t row = (size_t)H * (c->fp8 ? 1 : 2), S = (size_t)H / 128;
    epref_rng_t rng;
    epref_rng_seed(&rng, seed, (uint64_t)r);
    ri->n = n;
    ri->x = malloc((size_t)n * row + 16);
    ri->scales = malloc((size_t)n * S * 4 + 16);
    ri->idx = malloc((size_t)n * K * 8 + 16);
    ri->clean = malloc((size_t)n * K * 8 + 16);
    ri->w = malloc((size_t)n * K * 4 + 16);
    for (size_t i = 0; i < (size_t)n * H; i++) {
        if (c->fp8)
            ri->x[i] = (uint8_t)(epref_rng_next(&rng) & 0x7e); /* finite e4m3 patterns */
        else
            ((uint16_t *)ri->x)[i] = epref_float_to_bf16(epref_rng_normal(&rng));
    }
    for (size_t i = 0; i < (size_t)n * S; i++)
        ri->scales[i] = epref_rng_uniform(&rng) + 0.01f;
    if (c->all_to_last) {
        int L = E / R;
        for (int t = 0; t < n; t++)
            for (int k = 0; k < K; k++)
                ri->clean[(size_t)t * K + k] = (R - 1) * L + (int)((t + k) % L);
        for (size_t i = 0; i < (size_t)n * K; i++)
            ri->w[i] = 0.5f + epref_rng_uniform(&rng);
    } else {
        epref_random_routing(&rng, n, K, E, 0.05f, ri->clean, ri->w);
    }
    memcpy(ri->idx, ri->clean, (size_t)n * K * 8);
    if (c->bad_ids)
        for (int t = 3; t < n; t += 101) {
            ri->idx[(size_t)t * K] = E + t;
            ri->clean[(size_t)t * K] = -1;
        }
    memset(&ri->in, 0, sizeof(ri->in));
    ri->in.num_tokens = n;
    ri->in.x = ri->x;
    ri->in.row_bytes = row;
    ri->in.stride_bytes = row;
    ri->in.scales = c->fp8 ? (const uint32_t *)ri->scales : NULL;
    ri->in.num_scales = c->fp8 ? (int)S : 0;
    ri->in.scales_stride = S;
    ri->in.topk = K;
    ri->in.topk_idx = ri->clean;
    ri->in.topk_weights = c->weights ? ri->w : NULL;
}

static void free_inputs(rank_inputs_t *ri) {
    free(ri->x), free(ri->scales), free(ri->idx), free(ri->clean), free(ri->w);
}

/* The expert: y = bf16(float(x) * (1 + d/8)). */
static uint16_t *expert(const uint16_t *x, size_t rows, int H, int d) {
    uint16_t *y = malloc(rows * (size_t)H * 2 + 16);
    for (size_t i = 0; i < rows * (size_t)H; i++)
        y[i] = epref_float_to_bf16(epref_bf16_to_float(x[i]) * (1.0f + (float)d / 8.0f));
    return y;
}

typedef struct {
    void *x, *scales, *idx, *w, *per_rank, *in_rank, *per_expert, *out, *out_w, *bias0, *bias1, *y, *y_w;
} device_bufs_t;

static void *dalloc_copy(const void *host, size_t bytes) {
    void *p = NULL;
    mp_malloc(&p, bytes ? bytes : 16);
    if (host && bytes)
        cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    return p;
}

static void *host_copy(const void *dev, size_t bytes) {
    void *p = malloc(bytes + 16);
    if (bytes)
        cudaMemcpy(p, dev, bytes, cudaMemcpyDeviceToHost);
    return p;
}

#define CHECK_BYTES(what, got, want, bytes)                                                                            \
    do {                                                                                                               \
        if ((size_t)(bytes) != 0 && memcmp((got), (want), (bytes)) != 0) {                                             \
            size_t i_ = 0;                                                                                             \
            while (((const uint8_t *)(got))[i_] == ((const uint8_t *)(want))[i_])                                      \
                i_++;                                                                                                  \
            MP_FAIL(rank, "%s: %s differs at byte %zu: got 0x%02x want 0x%02x", c->name, what, i_,                     \
                    ((const uint8_t *)(got))[i_], ((const uint8_t *)(want))[i_]);                                      \
        }                                                                                                              \
    } while (0)

static void poison_next_dispatch_region(ep_group_t g) {
    char *region = (char *)g->window_mem + EP_CTRL_BYTES +
                   ep_ht_dispatch_base(g->config.num_nvl_bytes, (int)(g->dispatch_seq & 1));
    cudaMemset(region, 0xEE, ep_ht_quarter_bytes(g->config.num_nvl_bytes));
    ep_group_barrier(g, NULL); /* nobody writes into it before it is poisoned */
}

static int run_case(int rank, ep_group_t g, int R, const ht_case_t *c, uint64_t seed, int *failures_out) {
    int failures = 0;
    int H = c->hidden, K = c->topk, E = mp_experts(c->experts, R), L = E / R;
    if (K > E)
        return 0;
    size_t S = (size_t)H / 128, row = (size_t)H * (c->fp8 ? 1 : 2);
    rank_inputs_t *all = calloc((size_t)R, sizeof(*all));
    epref_rank_input_t *ins = calloc((size_t)R, sizeof(*ins));
    for (int r = 0; r < R; r++) {
        make_inputs(c, R, r, seed, &all[r]);
        ins[r] = all[r].in;
    }
    rank_inputs_t *me = &all[rank];
    int N = me->n;
    epref_dispatch_result_t *ref = calloc((size_t)R, sizeof(*ref));
    int worst = c->worst ? R * (c->tokens + 37 * R) : 0;
    for (int d = 0; d < R; d++)
        if (epref_dispatch(ins, R, E, d, c->alignment, worst, &ref[d]) != EPREF_OK)
            MP_FAIL(rank, "%s: reference dispatch: %s", c->name, epref_last_error());

    /* Layout on the GPU. */
    device_bufs_t b;
    memset(&b, 0, sizeof(b));
    const size_t pitch = row + (size_t)c->pad * (c->fp8 ? 1 : 2); /* bytes from one row of x to the next */
    b.x = dalloc_copy(NULL, (size_t)N * pitch);
    cudaMemset(b.x, 0x7F, (size_t)N * pitch); /* the padding, which no kernel may read */
    cudaMemcpy2D(b.x, pitch, me->x, row, row, (size_t)N, cudaMemcpyHostToDevice);
    float *scales_cm = malloc(S * (size_t)N * 4 + 16); /* column-major: element (t, j) at j * N + t */
    for (int t = 0; t < N; t++)
        for (size_t j = 0; j < S; j++)
            scales_cm[j * (size_t)N + t] = me->scales[(size_t)t * S + j];
    b.scales = dalloc_copy(scales_cm, S * (size_t)N * 4);
    b.idx = dalloc_copy(me->idx, (size_t)N * K * 8);
    b.w = dalloc_copy(me->w, (size_t)N * K * 4);
    b.per_rank = dalloc_copy(NULL, (size_t)R * 4);
    b.in_rank = dalloc_copy(NULL, (size_t)N * R);
    b.per_expert = dalloc_copy(NULL, (size_t)E * 4);
    ep_tensor_t t_idx = ep_tensor_2d(b.idx, EP_DTYPE_INT64, N, K);
    ep_tensor_t t_rank = ep_tensor_1d(b.per_rank, EP_DTYPE_INT32, R);
    ep_tensor_t t_expert = ep_tensor_1d(b.per_expert, EP_DTYPE_INT32, E);
    ep_tensor_t t_in = ep_tensor_2d(b.in_rank, EP_DTYPE_BOOL, N, R);
    MP_EXPECT_STATUS(rank, ep_get_dispatch_layout(g, &t_idx, E, &t_rank, NULL, &t_expert, &t_in, NULL), EP_SUCCESS);
    ep_status_t lst = ep_group_synchronize(g, NULL);
    if (lst != (c->bad_ids && N > 3 ? EP_ERROR_DEVICE_INPUT : EP_SUCCESS))
        MP_FAIL(rank, "%s: layout synchronize: %s", c->name, ep_last_error());

    ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
    da.x = ep_tensor_2d(b.x, c->fp8 ? EP_DTYPE_FLOAT8_E4M3 : EP_DTYPE_BFLOAT16, N, H);
    da.x.strides[0] = H + c->pad;
    if (c->fp8) {
        da.x_scales = ep_tensor_2d(b.scales, c->fp8 == 2 ? EP_DTYPE_INT32 : EP_DTYPE_FLOAT32, N, (int64_t)S);
        da.x_scales.strides[0] = 1;
        da.x_scales.strides[1] = N;
    }
    da.topk_idx = t_idx;
    if (c->weights)
        da.topk_weights = ep_tensor_2d(b.w, EP_DTYPE_FLOAT32, N, K);
    da.num_tokens_per_rank = t_rank;
    da.is_token_in_rank = t_in;
    da.num_tokens_per_expert = t_expert;
    da.num_experts = E;
    da.expert_alignment = c->alignment;
    da.num_worst_tokens = worst;
    int32_t *per_expert = calloc((size_t)L, 4);
    ep_handle_t handle = NULL;
    const epref_dispatch_result_t *want = &ref[rank];
    int rounds = 1 + c->cached_rounds;
    for (int round = 0; round < rounds && !failures; round++) {
        if (round > 0) { /* cached dispatch: same routing, new x */
            for (size_t i = 0; i < (size_t)N * row; i++)
                me->x[i] ^= (uint8_t)(0x11 * round) & (c->fp8 ? 0x3e : 0xff);
            for (int r = 0; r < R; r++)
                if (r != rank)
                    for (size_t i = 0; i < (size_t)all[r].n * row; i++)
                        all[r].x[i] ^= (uint8_t)(0x11 * round) & (c->fp8 ? 0x3e : 0xff);
            for (int d = 0; d < R; d++) {
                epref_dispatch_result_free(&ref[d]);
                epref_dispatch(ins, R, E, d, c->alignment, worst, &ref[d]);
            }
            cudaMemcpy2D(b.x, pitch, me->x, row, row, (size_t)N, cudaMemcpyHostToDevice);
            da.cached_handle = handle;
            memset(&da.topk_idx, 0, sizeof(da.topk_idx));
            memset(&da.topk_weights, 0, sizeof(da.topk_weights));
        }
        poison_next_dispatch_region(g);
        ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
        res.num_recv_tokens_per_expert = per_expert;
        ep_status_t st = ep_dispatch(g, &da, &res, NULL);
        if (st != EP_SUCCESS) {
            MP_FAIL(rank, "%s: dispatch (round %d): %s", c->name, round, ep_last_error());
            break;
        }
        if (round == 0)
            handle = res.handle;
        st = ep_group_synchronize(g, NULL);
        if (st != EP_SUCCESS) /* bad ids: reported once, by the layout (its synchronize above) */
            MP_FAIL(rank, "%s: synchronize after dispatch: %s", c->name, ep_last_error());
        int nr = want->num_recv, rows = res.num_rows;
        if (!c->worst && res.num_recv_tokens != nr)
            MP_FAIL(rank, "%s: num_recv_tokens %d, want %d", c->name, res.num_recv_tokens, nr);
        if (rows != (worst ? worst : nr))
            MP_FAIL(rank, "%s: num_rows %d, want %d", c->name, rows, worst ? worst : nr);
        if (failures)
            break;
        uint8_t *gx = host_copy(res.recv_x.data, (size_t)nr * row);
        CHECK_BYTES("recv_x", gx, want->x, (size_t)nr * row);
        free(gx);
        if (c->fp8) {
            uint32_t *gs = host_copy(res.recv_x_scales.data, (size_t)nr * S * 4);
            CHECK_BYTES("recv_x_scales", gs, want->scales, (size_t)nr * S * 4);
            free(gs);
        }
        int meta = round == 0; /* a cached dispatch without topk returns no topk outputs */
        if (!meta && (res.recv_topk_idx.data != NULL || res.recv_topk_weights.data != NULL))
            MP_FAIL(rank, "%s: cached dispatch without topk returned topk outputs", c->name);
        if (meta) {
            int64_t *gi = host_copy(res.recv_topk_idx.data, (size_t)rows * K * 8);
            CHECK_BYTES("recv_topk_idx", gi, want->topk_idx, (size_t)rows * K * 8);
            free(gi);
        }
        if (c->weights && meta) {
            float *gw = host_copy(res.recv_topk_weights.data, (size_t)rows * K * 4);
            CHECK_BYTES("recv_topk_weights", gw, want->topk_weights, (size_t)rows * K * 4);
            free(gw);
        }
        int32_t *gsrc = host_copy(res.recv_src_idx.data, (size_t)rows * 4);
        CHECK_BYTES("recv_src_idx", gsrc, want->src_token, (size_t)rows * 4);
        free(gsrc);
        if (!c->worst && round == 0)
            CHECK_BYTES("num_recv_tokens_per_expert", per_expert, want->num_recv_per_expert, (size_t)L * 4);
        if (c->fp8 || failures)
            continue;

        /* Combine: each rank's expert output, then the reduction back. */
        uint16_t **ys = calloc((size_t)R, sizeof(*ys));
        size_t *ystride = calloc((size_t)R, sizeof(*ystride));
        const float **yw = calloc((size_t)R, sizeof(*yw));
        for (int d = 0; d < R; d++) {
            ys[d] = expert((const uint16_t *)ref[d].x, (size_t)ref[d].num_recv, H, d);
            ystride[d] = (size_t)H;
            yw[d] = c->weights && meta ? ref[d].topk_weights : NULL;
        }
        uint16_t *bias[2] = {NULL, NULL};
        for (int i = 0; i < c->biases; i++) {
            bias[i] = malloc((size_t)N * H * 2 + 16);
            for (size_t j = 0; j < (size_t)N * H; j++)
                bias[i][j] = epref_float_to_bf16((float)((j * 7 + (size_t)i) % 13) * 0.125f - 0.5f);
        }
        uint16_t *want_out = malloc((size_t)N * H * 2 + 16);
        float *want_w = malloc((size_t)N * K * 4 + 16);
        int with_w = c->weights && meta;
        if (epref_combine(ins, ref, (const uint16_t *const *)ys, ystride, with_w ? yw : NULL, R, E, rank, H, bias[0],
                          bias[1], want_out, with_w ? want_w : NULL) != EPREF_OK)
            MP_FAIL(rank, "%s: reference combine: %s", c->name, epref_last_error());
        ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
        const size_t ypitch = (size_t)(H + c->pad) * 2;
        void *dy = dalloc_copy(NULL, (size_t)rows * ypitch);
        cudaMemset(dy, 0x7F, (size_t)rows * ypitch); /* rows past Nr, and the padding, must be ignored */
        cudaMemcpy2D(dy, ypitch, ys[rank], (size_t)H * 2, (size_t)H * 2, (size_t)nr, cudaMemcpyHostToDevice);
        ca.x = ep_tensor_2d(dy, EP_DTYPE_BFLOAT16, rows, H);
        ca.x.strides[0] = H + c->pad;
        void *dyw = NULL, *dout_w = NULL, *db0 = NULL, *db1 = NULL;
        if (with_w) {
            dyw = res.recv_topk_weights.data; /* send the received weights back: the backward of dispatch */
            ca.topk_weights = ep_tensor_2d(dyw, EP_DTYPE_FLOAT32, rows, K);
            dout_w = dalloc_copy(NULL, (size_t)N * K * 4);
            cudaMemset(dout_w, 0xFF, (size_t)N * K * 4);
            ca.out_topk_weights = ep_tensor_2d(dout_w, EP_DTYPE_FLOAT32, N, K);
        }
        if (bias[0]) {
            db0 = dalloc_copy(bias[0], (size_t)N * H * 2);
            ca.bias0 = ep_tensor_2d(db0, EP_DTYPE_BFLOAT16, N, H);
        }
        if (bias[1]) {
            db1 = dalloc_copy(bias[1], (size_t)N * H * 2);
            ca.bias1 = ep_tensor_2d(db1, EP_DTYPE_BFLOAT16, N, H);
        }
        void *dout = dalloc_copy(NULL, (size_t)N * H * 2);
        cudaMemset(dout, 0xFF, (size_t)N * H * 2);
        ca.out = ep_tensor_2d(dout, EP_DTYPE_BFLOAT16, N, H);
        ca.handle = handle;
        MP_EXPECT_STATUS(rank, ep_combine(g, &ca, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
        uint16_t *gout = host_copy(dout, (size_t)N * H * 2);
        CHECK_BYTES("combine out", gout, want_out, (size_t)N * H * 2);
        free(gout);
        if (with_w) {
            float *gw = host_copy(dout_w, (size_t)N * K * 4);
            CHECK_BYTES("combine out_topk_weights", gw, want_w, (size_t)N * K * 4);
            free(gw);
        }
        mp_free(dy), mp_free(dout), mp_free(dout_w), mp_free(db0), mp_free(db1);
        for (int d = 0; d < R; d++)
            free(ys[d]);
        free(ys), free(ystride), free(yw), free(want_out), free(want_w), free(bias[0]), free(bias[1]);
    }
    MP_EXPECT_STATUS(rank, ep_handle_destroy(handle), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    mp_free(b.x), mp_free(b.scales), mp_free(b.idx), mp_free(b.w), mp_free(b.per_rank), mp_free(b.in_rank),
        mp_free(b.per_expert);
    free(scales_cm), free(per_expert);
    for (int r = 0; r < R; r++) {
        free_inputs(&all[r]);
        epref_dispatch_result_free(&ref[r]);
    }
    free(all), free(ins), free(ref);
    if (rank == 0)
        printf("     %-22s R=%d N=%d H=%d K=%d E=%d: %s\n", c->name, R, c->tokens, H, K, E, failures ? "FAIL" : "ok");
    *failures_out += failures;
    return failures;
}

/* One round: every case once, on one group. The round picks the combine transfer (set by main before the
 * ranks start: with ranks as threads, a setenv while another thread reads the environment can crash it). */
static int ht_vs_reference(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    const int round = *(const int *)arg;
    mp_enter_device(rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = ep_normal_buffer_bytes(num_ranks, 4096 + 37 * num_ranks, 16384, 2, 0, 32);
    ep_group_t g = NULL;
    if (ep_group_create(id, num_ranks, rank, mp_device(rank), &cfg, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(rank, g, num_ranks, &cases[i], 7919u * (uint64_t)(round + 1) + i, &failures);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

int main(int argc, char **argv) {
    int ranks = mp_arg_int(argc, argv, "--ranks", 2), rounds = mp_arg_int(argc, argv, "--rounds", 1);
    int failed = 0;
    for (int round = 0; round < rounds; round++) {
        /* Odd rounds move combine's rows with copy engines (ht_combine_ce.c), even rounds with SM kernels. */
        const int ce = round % 2;
        setenv("EPCOMM_HT_COMBINE_CE", ce ? "1" : "0", 1);
        printf("     round %d: combine transfer on %s\n", round, ce ? "copy engines" : "SMs");
        failed += mp_run(ce ? "ht.matches_reference.ce_combine" : "ht.matches_reference.sm_combine", ranks,
                         ht_vs_reference, &round, 600) != 0;
    }
    printf("%d passed, %d failed\n", rounds - failed, failed);
    return failed;
}
