/* Low-latency mode beyond single calls, one process per GPU:
 *  - double_buffering: two dispatches alive at once (both with hooks), received and combined out of order,
 *    then a third dispatch reusing the first half, then two combines of that one handle alive at once (both
 *    sent before either receives, with different expert outputs); all checked against the reference; then
 *    the first handle (its half reused by the third) and, after clean_low_latency_buffer, the third are refused;
 *  - graph_replay: dispatch + combine captured once, replayed with new inputs, checked every time;
 *  - hook_frees_sms: a compute kernel on every SM runs as fast between a hooked send and its receive as
 *    alone (nothing of ours holds SMs in between);
 *  - fused_beside_busy_stream: a call without a hook (one fused kernel, whose blocks wait for each other)
 *    enqueued while a compute kernel on another stream holds every SM completes, correct;
 *  - missing_peer_times_out: a rank that never dispatches: the receive times out naming it;
 *  - overrun_is_reported: a rank whose receive comes after its peers' next dispatch into the same half gets an
 *    error naming a peer that ran ahead, not another call's rows;
 *  - argument errors: N > T, K > 16, H not a multiple of 128, UE8M0 without round_scale, too small a buffer;
 *  - per_rank_setting_differs (ranks as processes only): one rank combines with per-rank sums, the others not:
 *    every rank fails with a message naming the setting, not a timeout.
 * With EPCOMM_LL_COMBINE_PER_RANK=1 (tools/gpu-check.sh's variant run) every combine sends per-rank sums and is
 * checked against epref_ll_combine_per_rank. */
#define _POSIX_C_SOURCE 200809L
#include "env.h"
#include "epref.h"
#include "mp.h"
#include "pattern.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define T 64
#define H 2048
#define K 8
static int E = 64; /* experts: 64 rounded up to a multiple of the rank count (main) */
static int per_rank_combine; /* EPCOMM_LL_COMBINE_PER_RANK=1, read in main before the ranks start */

typedef struct {
    epref_rank_input_t in[8];
    uint16_t *x[8];
    int64_t *idx[8];
    float *w[8];
} inputs_t;

static void make_inputs(inputs_t *in, int R, uint64_t seed) {
    memset(in, 0, sizeof(*in));
    for (int r = 0; r < R; r++) {
        epref_rng_t rng;
        epref_rng_seed(&rng, seed, (uint64_t)r);
        int n = T - 5 * r;
        in->x[r] = malloc((size_t)n * H * 2);
        in->idx[r] = malloc((size_t)n * K * 8);
        in->w[r] = malloc((size_t)n * K * 4);
        for (size_t i = 0; i < (size_t)n * H; i++)
            in->x[r][i] = epref_float_to_bf16(epref_rng_normal(&rng));
        epref_random_routing(&rng, n, K, E, 0.1f, in->idx[r], in->w[r]);
        in->in[r] = (epref_rank_input_t){.num_tokens = n,
                                         .x = (const uint8_t *)in->x[r],
                                         .row_bytes = H * 2,
                                         .stride_bytes = H * 2,
                                         .topk = K,
                                         .topk_idx = in->idx[r],
                                         .topk_weights = in->w[r]};
    }
}

static void free_inputs(inputs_t *in, int R) {
    for (int r = 0; r < R; r++)
        free(in->x[r]), free(in->idx[r]), free(in->w[r]);
}

/* Device buffers of one dispatch/combine pair (BF16 dispatch; the expert output is x itself). */
typedef struct {
    void *x, *idx, *w, *rx, *rc, *si, *lr, *out;
    ep_low_latency_dispatch_args_t da;
    ep_low_latency_combine_args_t ca;
} pair_t;

static void pair_init(pair_t *p, int R) {
    const int64_t L = E / R, RT = (int64_t)R * T;
    mp_malloc(&p->x, (size_t)T * H * 2);
    mp_malloc(&p->idx, (size_t)T * K * 8);
    mp_malloc(&p->w, (size_t)T * K * 4);
    mp_malloc(&p->rx, (size_t)L * RT * H * 2);
    mp_malloc(&p->rc, (size_t)L * 4);
    mp_malloc(&p->si, (size_t)L * RT * 4);
    mp_malloc(&p->lr, (size_t)L * R * 8);
    mp_malloc(&p->out, (size_t)T * H * 2);
    cudaMemset(p->rx, 0, (size_t)L * RT * H * 2);
}

static void pair_load(pair_t *p, const inputs_t *in, int rank, int R) {
    const int64_t L = E / R, RT = (int64_t)R * T;
    int n = in->in[rank].num_tokens;
    cudaMemcpy(p->x, in->x[rank], (size_t)n * H * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(p->idx, in->idx[rank], (size_t)n * K * 8, cudaMemcpyHostToDevice);
    cudaMemcpy(p->w, in->w[rank], (size_t)n * K * 4, cudaMemcpyHostToDevice);
    cudaMemset(p->out, 0xFF, (size_t)T * H * 2);
    p->da = (ep_low_latency_dispatch_args_t)EP_LOW_LATENCY_DISPATCH_ARGS_INIT;
    p->da.x = ep_tensor_2d(p->x, EP_DTYPE_BFLOAT16, n, H);
    p->da.topk_idx = ep_tensor_2d(p->idx, EP_DTYPE_INT64, n, K);
    p->da.max_tokens = T, p->da.num_experts = E;
    p->da.recv_x = ep_tensor_3d(p->rx, EP_DTYPE_BFLOAT16, L, RT, H);
    p->da.recv_count = ep_tensor_1d(p->rc, EP_DTYPE_INT32, L);
    p->da.src_info = ep_tensor_2d(p->si, EP_DTYPE_INT32, L, RT);
    p->da.layout_range = ep_tensor_2d(p->lr, EP_DTYPE_INT64, L, R);
    p->ca = (ep_low_latency_combine_args_t)EP_LOW_LATENCY_COMBINE_ARGS_INIT;
    p->ca.x = p->da.recv_x; /* identity experts */
    p->ca.topk_idx = p->da.topk_idx;
    p->ca.topk_weights = ep_tensor_2d(p->w, EP_DTYPE_FLOAT32, n, K);
    p->ca.out = ep_tensor_2d(p->out, EP_DTYPE_BFLOAT16, n, H);
}

static void pair_free(pair_t *p) {
    mp_free(p->x), mp_free(p->idx), mp_free(p->w), mp_free(p->rx), mp_free(p->rc), mp_free(p->si);
    mp_free(p->lr), mp_free(p->out);
}

/* Receive counts and the combined output `out` against the reference for experts that return their rows
 * times `factor` (a power of two, so the expected output is the identity experts' times it, exactly). */
static int check_combined(int rank, int R, const inputs_t *in, const pair_t *p, const void *out, float factor,
                          const char *what) {
    int failures = 0, L = E / R, n = in->in[rank].num_tokens;
    epref_ll_dispatch_result_t ref[8];
    const uint16_t *ys[8];
    for (int d = 0; d < R; d++) {
        epref_ll_dispatch(in->in, R, E, T, H, d, 0, 0, 0, &ref[d]);
        ys[d] = (const uint16_t *)ref[d].x;
    }
    int32_t *rc = malloc((size_t)L * 4);
    cudaMemcpy(rc, p->rc, (size_t)L * 4, cudaMemcpyDeviceToHost);
    for (int l = 0; l < L; l++)
        if (rc[l] != ref[rank].recv_count[l])
            MP_FAIL(rank, "%s: recv_count[%d] = %d, want %d", what, l, rc[l], ref[rank].recv_count[l]);
    uint16_t *want = malloc((size_t)n * H * 2 + 16), *got = malloc((size_t)n * H * 2 + 16);
    if (per_rank_combine) /* doubled rows double each rank's sum and the total exactly too */
        epref_ll_combine_per_rank(ys, ref, R, E, rank, n, K, in->idx[rank], in->w[rank], want);
    else
        epref_ll_combine(ys, ref, R, E, rank, n, K, in->idx[rank], in->w[rank], 0, want);
    for (size_t i = 0; factor != 1.0f && i < (size_t)n * H; i++)
        want[i] = epref_float_to_bf16(epref_bf16_to_float(want[i]) * factor);
    cudaMemcpy(got, out, (size_t)n * H * 2, cudaMemcpyDeviceToHost);
    if (memcmp(got, want, (size_t)n * H * 2) != 0)
        MP_FAIL(rank, "%s: combined output differs from the reference", what);
    for (int d = 0; d < R; d++)
        epref_ll_dispatch_result_free(&ref[d]);
    free(rc), free(want), free(got);
    return failures;
}

static int check_pair(int rank, int R, const inputs_t *in, const pair_t *p, const char *what) {
    return check_combined(rank, R, in, p, p->out, 1.0f, what);
}

/* dst = 2 * src, [rows] bf16 on the device (through the host: a test, not a hot path). */
static void double_rows(void *dst, const void *src, size_t rows) {
    uint16_t *h = malloc(rows * H * 2);
    cudaMemcpy(h, src, rows * H * 2, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < rows * H; i++)
        h[i] = epref_float_to_bf16(2.0f * epref_bf16_to_float(h[i]));
    cudaMemcpy(dst, h, rows * H * 2, cudaMemcpyHostToDevice);
    free(h);
}

/* Two combines of one handle alive at once. Every rank sends the first (hook); all but rank 0 receive it and
 * go on to the second (expert outputs doubled), while rank 0 waits 200 ms before its first receive, so the
 * second's rows reach rank 0 before it reads the first's. Each must sum its own rows. A combine while the
 * handle's previous combine still waits for its hook is refused. b's recv_x and output hold the second's. */
static int two_combines_one_handle(int rank, int R, ep_group_t g, const inputs_t *in, pair_t *a, pair_t *b,
                                   ep_ll_handle_t h) {
    int failures = 0;
    const int64_t L = E / R, RT = (int64_t)R * T;
    double_rows(b->rx, a->rx, (size_t)(L * RT));
    ep_low_latency_combine_args_t first = a->ca, second = a->ca;
    first.return_recv_hook = 1;
    second.x.data = b->rx;
    second.out.data = b->out;
    cudaMemset(a->out, 0xFF, (size_t)T * H * 2);
    cudaMemset(b->out, 0xFF, (size_t)T * H * 2);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &first, h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &second, h, NULL), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "hook"))
        MP_FAIL(rank, "combine with a receive pending: the message should name the hook, got: %s", ep_last_error());
    if (rank == 0) {
        struct timespec wait = {0, 200 * 1000 * 1000};
        nanosleep(&wait, NULL);
    }
    MP_EXPECT_STATUS(rank, ep_low_latency_combine_hook(g, h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &second, h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    failures += check_combined(rank, R, in, a, a->out, 1.0f, "first of two combines of one handle");
    failures += check_combined(rank, R, in, a, b->out, 2.0f, "second combine of the handle (rows doubled)");
    return failures;
}

static ep_group_t make_group(int rank, int R, const ep_unique_id_t *id, int64_t timeout_ms) {
    mp_enter_device(rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = ep_low_latency_buffer_bytes(R, T, H, K, E);
    cfg.timeout_ms = timeout_ms;
    ep_group_t g = NULL;
    if (ep_group_create(id, R, rank, mp_device(rank), &cfg, &g) != EP_SUCCESS)
        fprintf(stderr, "[rank %d] create: %s\n", rank, ep_last_error());
    return g;
}

static int double_buffering(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = make_group(rank, R, id, 0);
    if (!g)
        return 1;
    inputs_t ia, ib, ic;
    make_inputs(&ia, R, 1), make_inputs(&ib, R, 2), make_inputs(&ic, R, 3);
    pair_t a, b;
    pair_init(&a, R), pair_init(&b, R);
    pair_load(&a, &ia, rank, R), pair_load(&b, &ib, rank, R);
    a.da.return_recv_hook = b.da.return_recv_hook = 1;
    ep_ll_handle_t ha = NULL, hb = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &a.da, &ha, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &b.da, &hb, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, hb, NULL), EP_SUCCESS); /* out of order */
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, ha, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &a.ca, ha, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &b.ca, hb, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    failures += check_pair(rank, R, &ia, &a, "first of two alive");
    failures += check_pair(rank, R, &ib, &b, "second of two alive");
    /* A third dispatch reuses the first half. */
    pair_load(&a, &ic, rank, R);
    ep_ll_handle_t hc = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &a.da, &hc, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &a.ca, hc, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    failures += check_pair(rank, R, &ic, &a, "third, reusing the first half");
    failures += two_combines_one_handle(rank, R, g, &ic, &a, &b, hc);
    /* ha's routing was in the half that hc reused, and cleaning the buffer wipes hc's: both are refused. */
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &a.ca, ha, NULL), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "later low-latency dispatches have reused"))
        MP_FAIL(rank, "combine of a handle two dispatches old: unexpected message: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_clean_low_latency_buffer(g, T, H, K, E, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS); /* its barrier, before destroy */
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &a.ca, hc, NULL), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "clean_low_latency_buffer"))
        MP_FAIL(rank, "combine after clean_low_latency_buffer: unexpected message: %s", ep_last_error());
    ep_ll_handle_destroy(ha), ep_ll_handle_destroy(hb), ep_ll_handle_destroy(hc);
    free_inputs(&ia, R), free_inputs(&ib, R), free_inputs(&ic, R);
    pair_free(&a), pair_free(&b);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

static int graph_replay(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = make_group(rank, R, id, 0);
    if (!g)
        return 1;
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    inputs_t in;
    make_inputs(&in, R, 10);
    pair_t p;
    pair_init(&p, R);
    pair_load(&p, &in, rank, R);
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = s;
    ep_ll_handle_t h = NULL;
    cudaGraph_t graph;
    cudaGraphExec_t exec = NULL;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal); /* ranks may be threads */
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &p.da, &h, &l), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(g, &p.ca, h, &l), EP_SUCCESS);
    if (cudaStreamEndCapture(s, &graph) != cudaSuccess || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
        MP_FAIL(rank, "capture failed: %s", cudaGetErrorString(cudaGetLastError()));
        return failures;
    }
    free_inputs(&in, R);
    for (int replay = 0; replay < 4 && !failures; replay++) {
        make_inputs(&in, R, 20 + (uint64_t)replay); /* same token counts, new values and routing */
        pair_load(&p, &in, rank, R);
        cudaGraphLaunch(exec, s);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS);
        char what[32];
        snprintf(what, sizeof(what), "graph replay %d", replay);
        failures += check_pair(rank, R, &in, &p, what);
        free_inputs(&in, R);
    }
    cudaGraphExecDestroy(exec), cudaGraphDestroy(graph);
    ep_ll_handle_destroy(h);
    pair_free(&p);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

static float time_busy(float *sink, int sms, cudaStream_t s) {
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    cudaEventRecord(e0, s);
    test_busy_kernel(sink, sms, 200000, s);
    cudaEventRecord(e1, s);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0), cudaEventDestroy(e1);
    return ms;
}

/* What the two cases with a compute kernel beside the low-latency calls share: a group, the SM count, the
 * busy kernel's output and stream, one pair of calls loaded with inputs drawn from `seed`. */
/* A group, every rank's inputs and one dispatch/combine pair loaded with this rank's; with `busy`, also what the
 * busy-kernel tests need (the SM count, a sink and a stream of their own). */
typedef struct {
    ep_group_t g;
    inputs_t in;
    pair_t p;
    int sms;
    float *sink;
    cudaStream_t busy;
} fixture_t;

static int fixture_init(fixture_t *f, int rank, int R, const ep_unique_id_t *id, int64_t timeout_ms, uint64_t seed,
                        int busy) {
    memset(f, 0, sizeof(*f));
    f->g = make_group(rank, R, id, timeout_ms);
    if (!f->g)
        return 1;
    if (busy) {
        cudaDeviceGetAttribute(&f->sms, cudaDevAttrMultiProcessorCount, rank);
        mp_malloc((void **)&f->sink, 4096);
        cudaStreamCreateWithFlags(&f->busy, cudaStreamNonBlocking);
    }
    make_inputs(&f->in, R, seed);
    pair_init(&f->p, R);
    pair_load(&f->p, &f->in, rank, R);
    return 0;
}

/* Frees what fixture_init made and destroys the group; returns the failures. */
static int fixture_free(fixture_t *f, int rank, int R) {
    int failures = 0;
    free_inputs(&f->in, R);
    pair_free(&f->p);
    if (f->busy) {
        cudaStreamDestroy(f->busy);
        mp_free(f->sink);
    }
    MP_EXPECT_STATUS(rank, ep_group_destroy(f->g), EP_SUCCESS);
    return failures;
}

static int hook_frees_sms(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    fixture_t f;
    if (fixture_init(&f, rank, R, id, 0, 30, 1))
        return 1;
    f.p.da.return_recv_hook = 1;
    time_busy(f.sink, 2 * f.sms, f.busy); /* warm-up */
    float alone = time_busy(f.sink, 2 * f.sms, f.busy);
    ep_ll_handle_t h = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS); /* the sends are done */
    float between = time_busy(f.sink, 2 * f.sms, f.busy);                /* before the hook */
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(f.g, h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(f.g, &f.p.ca, h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS);
    failures += check_pair(rank, R, &f.in, &f.p, "hooked dispatch");
    if (between > alone * 1.10f + 0.05f)
        MP_FAIL(rank, "a busy kernel took %.3f ms between send and hook, %.3f ms alone", between, alone);
    if (rank == 0)
        printf("     busy kernel on all SMs: %.3f ms alone, %.3f ms between a send and its hook\n", alone, between);
    ep_ll_handle_destroy(h);
    return failures + fixture_free(&f, rank, R);
}

static int fused_beside_busy_stream(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    fixture_t f;
    if (fixture_init(&f, rank, R, id, 0, 50, 1))
        return 1;
    for (int round = 0; round < 3; round++) {
        MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS);
        cudaMemset(f.p.out, 0, (size_t)T * H * 2);
        test_busy_kernel(f.sink, f.sms, 400000, f.busy); /* half of every SM's threads, for milliseconds */
        ep_ll_handle_t h = NULL;
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_low_latency_combine(f.g, &f.p.ca, h, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS);
        cudaStreamSynchronize(f.busy);
        failures += check_pair(rank, R, &f.in, &f.p, "fused call beside a busy stream");
        ep_ll_handle_destroy(h);
    }
    return failures + fixture_free(&f, rank, R);
}

/* The last rank never arrives: in the dispatch (arg NULL), or after a dispatch that every rank completed, in the
 * combine (arg non-NULL). The others time out naming it and the stage, and every rank can destroy the group. */
static int missing_peer(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    const int in_combine = arg != NULL;
    const int64_t timeout_ms = R > 4 ? 4000 : 1500; /* creation at R=8 takes ~2 s */
    fixture_t f;
    if (fixture_init(&f, rank, R, id, timeout_ms, 40, 0))
        return 1;
    ep_ll_handle_t h = NULL;
    if (in_combine) {
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS);
    }
    if (rank == R - 1) {
        struct timespec nap = {(time_t)(2 * timeout_ms + 1000) / 1000, 0};
        nanosleep(&nap, NULL);
    } else {
        if (in_combine)
            MP_EXPECT_STATUS(rank, ep_low_latency_combine(f.g, &f.p.ca, h, NULL), EP_SUCCESS); /* enqueued */
        else
            MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS); /* enqueued */
        MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_ERROR_TIMEOUT);
        failures += mp_check_timeout_message(rank, R - 1, in_combine ? "low-latency combine" : "low-latency dispatch");
    }
    ep_ll_handle_destroy(h);
    return failures + fixture_free(&f, rank, R);
}

/* A rank two calls behind. Every rank dispatches twice with hooks; every rank but 0 receives both, then (after
 * a group barrier, so all of them have) sends a third dispatch into the half whose first dispatch rank 0 has not
 * received yet; a second barrier, after those sends, lets rank 0 go on. Rank 0 (its barriers on a side stream,
 * so its own low-latency work is not held) then receives the first: the flags already carry the third call,
 * and the receive reports it, naming a rank that ran ahead, instead of packing whatever the half holds. */
static int overrun_is_reported(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = make_group(rank, R, id, R > 4 ? 4000 : 1500);
    if (!g)
        return 1;
    inputs_t in;
    make_inputs(&in, R, 60);
    pair_t a, b;
    pair_init(&a, R), pair_init(&b, R);
    pair_load(&a, &in, rank, R), pair_load(&b, &in, rank, R);
    a.da.return_recv_hook = b.da.return_recv_hook = 1;
    ep_ll_handle_t h1 = NULL, h2 = NULL, h3 = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &a.da, &h1, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &b.da, &h2, NULL), EP_SUCCESS);
    if (rank != 0) {
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, h1, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, h2, NULL), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS); /* after both receives, on every rank */
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(g, &a.da, &h3, NULL), EP_SUCCESS); /* send only */
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, NULL), EP_SUCCESS);                    /* after the send */
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    } else {
        cudaStream_t side;
        cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, side), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_barrier(g, side), EP_SUCCESS);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, side), EP_SUCCESS);             /* every third send has landed */
        MP_EXPECT_STATUS(rank, ep_low_latency_dispatch_hook(g, h1, NULL), EP_SUCCESS); /* enqueued */
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_ERROR_DEVICE_INPUT);
        if (!strstr(ep_last_error(), "had already sent a later call's data"))
            MP_FAIL(rank, "overrun message: %s", ep_last_error());
        printf("     rank 0 saw: %s\n", ep_last_error());
        cudaStreamDestroy(side);
    }
    ep_ll_handle_destroy(h1), ep_ll_handle_destroy(h2), ep_ll_handle_destroy(h3);
    free_inputs(&in, R);
    pair_free(&a), pair_free(&b);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

/* The last rank dispatches with num_topk 6 where the others pass 8 (its topk_idx a [n, 6] view of the same ids):
 * each call is valid on its own, so it is launched; every rank's receive finds a peer whose sizes differ from its
 * own and reports it, naming the peer and both sets of sizes, instead of reading rows that are not where it looks. */
static int mismatched_sizes_are_reported(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    fixture_t f;
    if (fixture_init(&f, rank, R, id, R > 4 ? 4000 : 1500, 70, 0))
        return 1;
    if (rank == R - 1)
        f.p.da.topk_idx.shape[1] = K - 2; /* rows keep their stride of K */
    ep_ll_handle_t h = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS); /* enqueued */
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_ERROR_INVALID_ARGUMENT);
    char want[160];
    snprintf(want, sizeof(want),
             "num_topk=%d, num_experts=%d, use_fp8=0, round_scale=0, use_ue8m0=0, this rank with %d, %d, %d, %d",
             rank == R - 1 ? K : K - 2, E, T, H, rank == R - 1 ? K - 2 : K, E);
    if (!strstr(ep_last_error(), "called the low-latency dispatch with") || !strstr(ep_last_error(), want))
        MP_FAIL(rank, "mismatch message: %s (wanted \"%s\")", ep_last_error(), want);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    ep_ll_handle_destroy(h);
    return failures + fixture_free(&f, rank, R);
}

static int argument_errors(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    fixture_t f;
    if (fixture_init(&f, rank, R, id, 0, 50, 0))
        return 1;
    ep_ll_handle_t h = NULL;
    ep_low_latency_dispatch_args_t a = f.p.da;
    a.max_tokens = f.in.in[rank].num_tokens - 1; /* N > T */
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &a, &h, NULL), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "x.shape[0]"))
        MP_FAIL(rank, "N > T message: %s", ep_last_error());
    a = f.p.da;
    a.x.shape[1] = H - 64;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &a, &h, NULL), EP_ERROR_INVALID_ARGUMENT);
    a = f.p.da;
    a.use_fp8 = 1, a.use_ue8m0 = 1;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &a, &h, NULL), EP_ERROR_INVALID_ARGUMENT);
    a = f.p.da;
    a.topk_idx.shape[1] = 17;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &a, &h, NULL), EP_ERROR_INVALID_ARGUMENT);
    a = f.p.da;
    a.max_tokens = 4 * T; /* a larger T than the buffer was made for */
    a.recv_x.shape[1] = (int64_t)R * 4 * T, a.recv_x.strides[0] = (int64_t)R * 4 * T * H;
    a.src_info.shape[1] = (int64_t)R * 4 * T, a.src_info.strides[0] = (int64_t)R * 4 * T;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &a, &h, NULL), EP_ERROR_BUFFER_TOO_SMALL);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    if (h != NULL)
        MP_FAIL(rank, "a refused dispatch returned a handle");
    /* Nothing was launched: a good dispatch still works. */
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(f.g, &f.p.ca, h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS);
    failures += check_pair(rank, R, &f.in, &f.p, "after refusals");
    ep_ll_handle_destroy(h);
    /* An expert id out of range (token 0, k = 2): the dispatch skips it and reports it after the call. */
    const int64_t out_of_range = E + 3;
    cudaMemcpy((int64_t *)f.p.idx + 2, &out_of_range, 8, cudaMemcpyHostToDevice);
    h = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_ERROR_DEVICE_INPUT);
    char want[64];
    snprintf(want, sizeof(want), "topk_idx[0, 2] = %d is outside [-1, num_experts)", E + 3);
    if (!strstr(ep_last_error(), want) || !strstr(ep_last_error(), "low-latency dispatch (send)"))
        MP_FAIL(rank, "bad expert id message: %s (wanted \"%s\")", ep_last_error(), want);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS); /* reported once; the group goes on */
    ep_ll_handle_destroy(h);
    return failures + fixture_free(&f, rank, R);
}

/* Ranks as processes: the last rank flips EPCOMM_LL_COMBINE_PER_RANK in its own environment, so its combine and
 * the others' send different kinds of rows. Each side notices (the per-rank rank when a peer's flag arrives
 * before its weights, the others when the per-rank rank's flag arrives): every rank fails with a message naming
 * the setting, well before the timeout. */
static int per_rank_setting_differs(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    fixture_t f;
    if (fixture_init(&f, rank, R, id, 20000, 80, 0))
        return 1;
    ep_ll_handle_t h = NULL;
    MP_EXPECT_STATUS(rank, ep_low_latency_dispatch(f.g, &f.p.da, &h, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_SUCCESS);
    if (rank == R - 1)
        setenv("EPCOMM_LL_COMBINE_PER_RANK", per_rank_combine ? "0" : "1", 1);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    MP_EXPECT_STATUS(rank, ep_low_latency_combine(f.g, &f.p.ca, h, NULL), EP_SUCCESS); /* enqueued */
    MP_EXPECT_STATUS(rank, ep_group_synchronize(f.g, NULL), EP_ERROR_INVALID_ARGUMENT);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!strstr(ep_last_error(), "EPCOMM_LL_COMBINE_PER_RANK must be set alike on every rank"))
        MP_FAIL(rank, "per-rank setting differing: unexpected message: %s", ep_last_error());
    const double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (s > 10.0)
        MP_FAIL(rank, "the mismatch took %.1f s to report (timeout 20 s): it should not wait for a timeout", s);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    ep_ll_handle_destroy(h);
    return failures + fixture_free(&f, rank, R);
}

int main(int argc, char **argv) {
    int ranks = mp_arg_int(argc, argv, "--ranks", 2);
    E = mp_experts(E, ranks);
    per_rank_combine = ep_env_ll_combine_per_rank(); /* as the library reads it */
    if (per_rank_combine)
        printf("     combines as per-rank sums (EPCOMM_LL_COMBINE_PER_RANK=1)\n");
    int failed = 0;
    failed += mp_run("ll.double_buffering", ranks, double_buffering, NULL, 120) != 0;
    failed += mp_run("ll.graph_replay", ranks, graph_replay, NULL, 120) != 0;
    failed += mp_run("ll.hook_frees_sms", ranks, hook_frees_sms, NULL, 120) != 0;
    failed += mp_run("ll.fused_beside_busy_stream", ranks, fused_beside_busy_stream, NULL, 120) != 0;
    failed += mp_run("ll.missing_peer_times_out", ranks, missing_peer, NULL, 60) != 0;
    static int in_combine = 1;
    failed += mp_run("ll.missing_peer_in_combine_times_out", ranks, missing_peer, &in_combine, 60) != 0;
    failed += mp_run("ll.overrun_is_reported", ranks, overrun_is_reported, NULL, 60) != 0;
    failed += mp_run("ll.mismatched_sizes_are_reported", ranks, mismatched_sizes_are_reported, NULL, 60) != 0;
    failed += mp_run("ll.argument_errors", ranks, argument_errors, NULL, 60) != 0;
    int cases = 9;
    if (!mp_local()) { /* a rank's own environment needs ranks as processes */
        failed += mp_run("ll.per_rank_setting_differs", ranks, per_rank_setting_differs, NULL, 60) != 0;
        cases++;
    }
    printf("%d passed, %d failed\n", cases - failed, failed);
    return failed;
}
