/* Low-latency dispatch and combine against the CPU reference, one process per GPU (issue 4, first cut).
 * Dispatch: per local expert, recv_count, the packed rows (bf16 bytes, or e4m3 bytes and scales bit-exact
 * with the reference's cast, in the column-major scale layout, float or packed UE8M0), src_info and
 * layout_range. Combine: synthetic expert outputs, out bit-exact with the reference's fmaf-in-k-order sum,
 * plain and with LogFMT on the wire (log and raw groups, zeros, values clipped to zero).
 * Both the one-call path and the hook path (send, then hook) are run, several rounds with fresh data.
 * With EPCOMM_LL_COMBINE_PER_RANK=1 (tools/gpu-check.sh's variant run) the bf16 combines send per-rank sums and
 * are compared, bit for bit, with the reference's per-rank sums (epref_ll_combine_per_rank). */
#define _POSIX_C_SOURCE 200809L
#include "env.h"
#include "epref.h"
#include "mp.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    int T, H, K, E, fp8, round_scale, ue8m0, check_combine, logfmt;
    int hot; /* every token of every rank also picks the last expert (k = 0): it receives up to R*T rows */
} ll_case_t;

static const ll_case_t cases[] = {
    {"t128_fp8", 128, 7168, 8, 256, 1, 0, 0, 0, 0, 0},
    {"t128_fp8_ue8m0", 128, 7168, 8, 256, 1, 1, 1, 0, 0, 0},
    {"t32_bf16_k6", 32, 2048, 6, 64, 0, 0, 0, 1, 0, 0},
    {"t128_fp8_combine", 128, 2048, 8, 64, 1, 0, 0, 1, 0, 0},
    {"t1", 1, 7168, 8, 32, 1, 1, 0, 1, 0, 0},
    {"t64_k16_e288", 64, 1024, 16, 288, 0, 0, 0, 1, 0, 0},
    {"t128_logfmt", 128, 7168, 8, 256, 1, 0, 0, 1, 1, 0},
    {"t32_logfmt_k6", 32, 2048, 6, 64, 0, 0, 0, 1, 1, 0},
    {"t256_fp8_hot", 256, 2048, 8, 64, 1, 0, 0, 1, 0, 1},
    {"t1_hot", 1, 7168, 8, 32, 0, 0, 0, 1, 0, 1},
    {"t1024_bf16", 1024, 512, 8, 64, 0, 0, 0, 1, 0, 0},
    {"t32_fp8_h8320", 32, 8320, 8, 64, 1, 0, 0, 1, 0, 0}, /* 65 scale groups: not a multiple of 512, over 64 */
};

/* Expert outputs for the LogFMT cases: most 128-channel groups below 1 in magnitude (log format), with
 * zeros and tiny values (clipped to zero), every fourth group as is (amax >= 1: raw bf16). */
static uint16_t synth_logfmt(uint16_t v, int64_t h) {
    if ((h / 128) % 4 == 0)
        return v;
    if (h % 37 == 0)
        return 0;
    float f = epref_bf16_to_float(v) / 8.0f;
    if (h % 53 == 0)
        f *= 1e-12f;
    return epref_float_to_bf16(f);
}

/* Read in main before the ranks start: whether the bf16 combines run as per-rank sums. */
static int per_rank_combine;

static uint16_t synth(int d, int64_t l, int64_t row, int64_t h) {
    uint32_t z = (uint32_t)(d * 7919 + l * 104729 + row * 131 + h * 17);
    z ^= z >> 13, z *= 0x5bd1e995u, z ^= z >> 15;
    return epref_float_to_bf16(((float)(z % 2001) - 1000.0f) / 256.0f);
}

static int run_case(int rank, ep_group_t g, int R, const ll_case_t *c, uint64_t seed, int hook) {
    int failures = 0;
    const int T = c->T, H = c->H, K = c->K, E = mp_experts(c->E, R), L = E / R, S = H / 128;
    const int64_t RT = (int64_t)R * T;
    epref_rank_input_t in[8];
    memset(in, 0, sizeof(in));
    if (R > 8)
        return 1;
    uint16_t *xs[8];
    int64_t *idx[8];
    float *w[8];
    for (int r = 0; r < R; r++) {
        epref_rng_t rng;
        epref_rng_seed(&rng, seed, (uint64_t)r);
        int n = T > 3 ? T - 3 * r : T;
        xs[r] = malloc((size_t)n * H * 2 + 16);
        idx[r] = malloc((size_t)n * K * 8 + 16);
        w[r] = malloc((size_t)n * K * 4 + 16);
        for (size_t i = 0; i < (size_t)n * H; i++)
            xs[r][i] = epref_float_to_bf16(epref_rng_normal(&rng) * (i % 97 == 0 ? 30.0f : 1.0f));
        epref_random_routing(&rng, n, K, E, 0.1f, idx[r], w[r]);
        for (int t = 0; t < n; t += 11) /* duplicates: count once, combine reads the row twice */
            if (K > 1)
                idx[r][(size_t)t * K + 1] = idx[r][(size_t)t * K];
        for (int t = 0; c->hot && t < n; t++)
            idx[r][(size_t)t * K] = E - 1;
        memset(&in[r], 0, sizeof(in[r]));
        in[r].num_tokens = n;
        in[r].x = (const uint8_t *)xs[r];
        in[r].row_bytes = (size_t)H * 2;
        in[r].stride_bytes = (size_t)H * 2;
        in[r].topk = K;
        in[r].topk_idx = idx[r];
        in[r].topk_weights = w[r];
    }
    const int N = in[rank].num_tokens;
    epref_ll_dispatch_result_t ref[8];
    for (int d = 0; d < R; d++)
        if (epref_ll_dispatch(in, R, E, T, H, d, c->fp8, c->round_scale, c->ue8m0, &ref[d]) != EPREF_OK)
            MP_FAIL(rank, "%s: reference: %s", c->name, epref_last_error());
    size_t eb = c->fp8 ? 1 : 2, sw = c->ue8m0 ? (size_t)S / 4 : (size_t)S;
    void *dx, *didx, *dw, *rx, *rs, *rc, *si, *lr, *dy, *dout;
    mp_malloc(&dx, (size_t)N * H * 2 + 16);
    mp_malloc(&didx, (size_t)N * K * 8 + 16);
    mp_malloc(&dw, (size_t)N * K * 4 + 16);
    mp_malloc(&rx, (size_t)L * RT * H * eb);
    mp_malloc(&rs, (size_t)L * sw * RT * 4 + 16);
    mp_malloc(&rc, (size_t)L * 4);
    mp_malloc(&si, (size_t)L * RT * 4);
    mp_malloc(&lr, (size_t)L * R * 8);
    cudaMemcpy(dx, xs[rank], (size_t)N * H * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(didx, idx[rank], (size_t)N * K * 8, cudaMemcpyHostToDevice);
    cudaMemcpy(dw, w[rank], (size_t)N * K * 4, cudaMemcpyHostToDevice);
    cudaMemset(rc, 0xFF, (size_t)L * 4);
    cudaMemset(lr, 0xFF, (size_t)L * R * 8);
    ep_low_latency_dispatch_args_t a = EP_LOW_LATENCY_DISPATCH_ARGS_INIT;
    a.x = ep_tensor_2d(dx, EP_DTYPE_BFLOAT16, N, H);
    a.topk_idx = ep_tensor_2d(didx, EP_DTYPE_INT64, N, K);
    a.max_tokens = T, a.num_experts = E, a.use_fp8 = c->fp8, a.round_scale = c->round_scale, a.use_ue8m0 = c->ue8m0;
    a.return_recv_hook = hook;
    a.recv_x = ep_tensor_3d(rx, c->fp8 ? EP_DTYPE_FLOAT8_E4M3 : EP_DTYPE_BFLOAT16, L, RT, H);
    if (c->fp8)
        a.recv_x_scales = ep_tensor_3d(rs, c->ue8m0 ? EP_DTYPE_INT32 : EP_DTYPE_FLOAT32, L, (int64_t)sw, RT);
    a.recv_count = ep_tensor_1d(rc, EP_DTYPE_INT32, L);
    a.src_info = ep_tensor_2d(si, EP_DTYPE_INT32, L, RT);
    a.layout_range = ep_tensor_2d(lr, EP_DTYPE_INT64, L, R);
    ep_ll_handle_t h = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &a, &h, NULL), EP_SUCCESS);
    if (hook) {
        /* Before the hook, the combine must refuse the handle. */
        ep_low_latency_combine_args_t early = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
        MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &early, h, NULL), EP_ERROR_INVALID_ARGUMENT);
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, h, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, h, NULL), EP_ERROR_INVALID_ARGUMENT);
    }
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    const epref_ll_dispatch_result_t *want = &ref[rank];
    int32_t *gc = malloc((size_t)L * 4);
    int64_t *glr = malloc((size_t)L * R * 8);
    int32_t *gsi = malloc((size_t)L * RT * 4);
    uint8_t *gx = malloc((size_t)L * RT * H * eb);
    uint32_t *gs = malloc((size_t)L * sw * RT * 4 + 16);
    cudaMemcpy(gc, rc, (size_t)L * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(glr, lr, (size_t)L * R * 8, cudaMemcpyDeviceToHost);
    cudaMemcpy(gsi, si, (size_t)L * RT * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(gx, rx, (size_t)L * RT * H * eb, cudaMemcpyDeviceToHost);
    cudaMemcpy(gs, rs, (size_t)L * sw * RT * 4, cudaMemcpyDeviceToHost);
    for (int l = 0; l < L && !failures; l++) {
        if (gc[l] != want->recv_count[l]) {
            MP_FAIL(rank, "%s: recv_count[%d] = %d, want %d", c->name, l, gc[l], want->recv_count[l]);
            break;
        }
        for (int s = 0; s < R; s++)
            if (glr[l * R + s] != want->layout_range[l * R + s])
                MP_FAIL(rank, "%s: layout_range[%d, %d] = 0x%llx, want 0x%llx", c->name, l, s,
                        (unsigned long long)glr[l * R + s], (unsigned long long)want->layout_range[l * R + s]);
        for (int i = 0; i < gc[l] && !failures; i++) {
            size_t row = (size_t)l * RT + i;
            if (gsi[row] != want->src_info[row])
                MP_FAIL(rank, "%s: src_info[%d, %d] = %d, want %d", c->name, l, i, gsi[row], want->src_info[row]);
            if (memcmp(gx + row * H * eb, (const uint8_t *)want->x + row * H * eb, (size_t)H * eb) != 0)
                MP_FAIL(rank, "%s: recv_x[%d, %d] differs", c->name, l, i);
            for (size_t j = 0; c->fp8 && j < sw && !failures; j++) {
                uint32_t got = gs[((size_t)l * sw + j) * RT + i];
                uint32_t exp = ((const uint32_t *)want->scales)[row * sw + j];
                if (got != exp)
                    MP_FAIL(rank, "%s: scales[%d, %zu, %d] = 0x%08x, want 0x%08x", c->name, l, j, i, got, exp);
            }
        }
    }
    if (c->check_combine && !failures) {
        uint16_t *ys[8];
        for (int d = 0; d < R; d++) {
            /* Only the rows each expert received; the rest NaN, which no combine may read. */
            ys[d] = malloc((size_t)L * RT * H * 2);
            memset(ys[d], 0xFF, (size_t)L * RT * H * 2);
            for (int64_t l = 0; l < L; l++)
                for (int64_t i = 0; i < ref[d].recv_count[l]; i++)
                    for (int64_t hh = 0; hh < H; hh++) {
                        uint16_t v = synth(d, l, i, hh);
                        ys[d][(l * RT + i) * H + hh] = c->logfmt ? synth_logfmt(v, hh) : v;
                    }
        }
        uint16_t *want_out = malloc((size_t)N * H * 2 + 16);
        epref_status_t st = per_rank_combine && !c->logfmt
                                ? epref_ll_combine_per_rank((const uint16_t *const *)ys, ref, R, E, rank, N, K,
                                                            idx[rank], w[rank], want_out)
                                : epref_ll_combine((const uint16_t *const *)ys, ref, R, E, rank, N, K, idx[rank],
                                                   w[rank], c->logfmt, want_out);
        if (st != EPREF_OK)
            MP_FAIL(rank, "%s: reference combine: %s", c->name, epref_last_error());
        mp_malloc(&dy, (size_t)L * RT * H * 2);
        mp_malloc(&dout, (size_t)N * H * 2 + 16);
        cudaMemcpy(dy, ys[rank], (size_t)L * RT * H * 2, cudaMemcpyHostToDevice);
        cudaMemset(dout, 0xFF, (size_t)N * H * 2);
        ep_low_latency_combine_args_t ca = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
        ca.x = ep_tensor_3d(dy, EP_DTYPE_BFLOAT16, L, RT, H);
        ca.topk_idx = a.topk_idx;
        ca.topk_weights = ep_tensor_2d(dw, EP_DTYPE_FLOAT32, N, K);
        ca.out = ep_tensor_2d(dout, EP_DTYPE_BFLOAT16, N, H);
        ca.return_recv_hook = hook;
        ca.use_logfmt = c->logfmt;
        MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &ca, h, NULL), EP_SUCCESS);
        if (hook)
            MP_EXPECT_STATUS(rank, ep_low_latency_combine_hook(g, h, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
        uint16_t *got = malloc((size_t)N * H * 2 + 16);
        cudaMemcpy(got, dout, (size_t)N * H * 2, cudaMemcpyDeviceToHost);
        for (size_t i = 0; i < (size_t)N * H && !failures; i++)
            if (got[i] != want_out[i])
                MP_FAIL(rank, "%s: combine out[%zu, %zu] = 0x%04x, want 0x%04x", c->name, i / H, i % H, got[i],
                        want_out[i]);
        for (int d = 0; d < R; d++)
            free(ys[d]);
        free(want_out), free(got);
        mp_free(dy), mp_free(dout);
    }
    MP_EXPECT_STATUS(rank, ep_ll_handle_destroy(h), EP_SUCCESS);
    for (int d = 0; d < R; d++)
        epref_ll_dispatch_result_free(&ref[d]);
    for (int r = 0; r < R; r++)
        free(xs[r]), free(idx[r]), free(w[r]);
    free(gc), free(glr), free(gsi), free(gx), free(gs);
    mp_free(dx), mp_free(didx), mp_free(dw), mp_free(rx), mp_free(rs), mp_free(rc), mp_free(si), mp_free(lr);
    if (rank == 0)
        printf("     %-18s R=%d T=%d H=%d K=%d E=%d%s: %s\n", c->name, R, T, H, K, E, hook ? " (hook)" : "",
               failures ? "FAIL" : "ok");
    return failures;
}

static int ll_vs_reference(int rank, int num_ranks, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    mp_enter_device(rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const ll_case_t *c = &cases[i];
        size_t need = ep_low_latency_buffer_bytes(num_ranks, c->T, c->H, c->K, mp_experts(c->E, num_ranks));
        cfg.num_nvl_bytes = need > cfg.num_nvl_bytes ? need : cfg.num_nvl_bytes;
    }
    ep_group_t g = NULL;
    if (ep_group_create(id, num_ranks, rank, mp_device(rank), &cfg, &g) != EP_SUCCESS) {
        MP_FAIL(rank, "create: %s", ep_last_error());
        return 1;
    }
    for (int round = 0; round < 2; round++)
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
            failures += run_case(rank, g, num_ranks, &cases[i], 31u * (uint64_t)(round + 1) + i, (int)(i + round) % 2);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

int main(int argc, char **argv) {
    int ranks = mp_arg_int(argc, argv, "--ranks", 2);
    per_rank_combine = ep_env_ll_combine_per_rank(); /* as the library reads it */
    if (per_rank_combine)
        printf("     bf16 combines as per-rank sums (EPCOMM_LL_COMBINE_PER_RANK=1)\n");
    int failed = mp_run(per_rank_combine ? "ll.matches_reference.per_rank" : "ll.matches_reference", ranks,
                        ll_vs_reference, NULL, 300) != 0;
    printf("%d passed, %d failed\n", 1 - failed, failed);
    return failed;
}
