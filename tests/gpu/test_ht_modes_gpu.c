/* High-throughput mode beyond plain calls, one process per GPU:
 *  - graph_replay: layout + worst-token dispatch + combine captured once in a CUDA graph, replayed with new
 *    inputs (new x and new routing written into the same buffers) and checked after every replay;
 *  - events_and_async: a cached dispatch ordered after a slow producer by previous_event (so it must wait
 *    for the new x), with async_finish and a finish event;
 *  - missing_peer_times_out: a rank that never dispatches makes the others fail with EP_ERROR_TIMEOUT naming
 *    it and the stage; every rank can then destroy the group;
 *  - autotune: every rank gets the same best SM count, one of the candidates;
 *  - argument errors: capture of a host-waiting dispatch, weights without ids, a too-small buffer, a layout
 *    that contradicts is_token_in_rank on rank 0 (found on the device: every rank's dispatch is abandoned), a
 *    cached dispatch with another worst-token count than its handle's, destroying a group a handle still uses;
 *    a cached dispatch and a combine whose hidden size differs on one rank (reported at the next synchronize).
 * Dispatch outputs are compared with the CPU reference; combine of the received rows must give x times the
 * number of ranks each token reached (exact in float32). */
#define _DEFAULT_SOURCE
#include "epref.h"
#include "group.h"
#include "mp.h"
#include "pattern.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define H    2048
#define K    8
#define NMAX 600

static int E = 64; /* experts: 64 rounded up to a multiple of the rank count (main) */

typedef struct {
    uint16_t *x[8];
    int64_t *idx[8];
    float *w[8];
    int n[8];
    epref_rank_input_t in[8];
} inputs_t;

static void make_inputs(inputs_t *in, int R, uint64_t seed) {
    for (int r = 0; r < R; r++) {
        epref_rng_t rng;
        epref_rng_seed(&rng, seed, (uint64_t)r);
        int n = 400 + (int)(epref_rng_next(&rng) % 200);
        in->n[r] = n;
        in->x[r] = malloc((size_t)n * H * 2 + 16);
        in->idx[r] = malloc((size_t)n * K * 8 + 16);
        in->w[r] = malloc((size_t)n * K * 4 + 16);
        for (size_t i = 0; i < (size_t)n * H; i++)
            in->x[r][i] = epref_float_to_bf16(epref_rng_normal(&rng));
        epref_random_routing(&rng, n, K, E, 0.05f, in->idx[r], in->w[r]);
        for (int k = 0; k < K; k++) /* the last token goes nowhere */
            in->idx[r][(size_t)(n - 1) * K + k] = -1, in->w[r][(size_t)(n - 1) * K + k] = 0.0f;
        memset(&in->in[r], 0, sizeof(in->in[r]));
        in->in[r].num_tokens = n;
        in->in[r].x = (const uint8_t *)in->x[r];
        in->in[r].row_bytes = H * 2;
        in->in[r].stride_bytes = H * 2;
        in->in[r].topk = K;
        in->in[r].topk_idx = in->idx[r];
        in->in[r].topk_weights = in->w[r];
    }
}

static void free_inputs(inputs_t *in, int R) {
    for (int r = 0; r < R; r++)
        free(in->x[r]), free(in->idx[r]), free(in->w[r]);
}

typedef struct {
    void *x, *idx, *w, *per_rank, *in_rank, *per_expert, *out;
} devbufs_t;

static void dev_alloc(devbufs_t *d, int R) {
    mp_malloc(&d->x, (size_t)NMAX * H * 2);
    mp_malloc(&d->idx, (size_t)NMAX * K * 8);
    mp_malloc(&d->w, (size_t)NMAX * K * 4);
    mp_malloc(&d->per_rank, (size_t)R * 4);
    mp_malloc(&d->in_rank, (size_t)NMAX * R);
    mp_malloc(&d->per_expert, (size_t)E * 4);
    mp_malloc(&d->out, (size_t)NMAX * H * 2);
}

static void dev_free(devbufs_t *d) {
    mp_free(d->x), mp_free(d->idx), mp_free(d->w), mp_free(d->per_rank), mp_free(d->in_rank);
    mp_free(d->per_expert), mp_free(d->out);
}

static void upload(devbufs_t *d, const inputs_t *in, int rank) {
    int n = in->n[rank];
    cudaMemcpy(d->x, in->x[rank], (size_t)n * H * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(d->idx, in->idx[rank], (size_t)n * K * 8, cudaMemcpyHostToDevice);
    cudaMemcpy(d->w, in->w[rank], (size_t)n * K * 4, cudaMemcpyHostToDevice);
    cudaMemset(d->out, 0xFF, (size_t)NMAX * H * 2);
}

static ep_dispatch_args_t dispatch_args(const devbufs_t *d, int n, int R) {
    ep_dispatch_args_t a = EP_DISPATCH_ARGS_INIT;
    a.x = ep_tensor_2d(d->x, EP_DTYPE_BFLOAT16, n, H);
    a.topk_idx = ep_tensor_2d(d->idx, EP_DTYPE_INT64, n, K);
    a.topk_weights = ep_tensor_2d(d->w, EP_DTYPE_FLOAT32, n, K);
    a.num_tokens_per_rank = ep_tensor_1d(d->per_rank, EP_DTYPE_INT32, R);
    a.is_token_in_rank = ep_tensor_2d(d->in_rank, EP_DTYPE_BOOL, n, R);
    a.num_tokens_per_expert = ep_tensor_1d(d->per_expert, EP_DTYPE_INT32, E);
    a.num_experts = E;
    a.expert_alignment = 1;
    return a;
}

static ep_status_t layout(ep_group_t g, const ep_dispatch_args_t *a, cudaStream_t s) {
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = s;
    ep_tensor_t r = a->num_tokens_per_rank, e = a->num_tokens_per_expert, in = a->is_token_in_rank;
    return ep_get_dispatch_layout(g, &a->topk_idx, E, &r, NULL, &e, &in, &l);
}

/* Compares this rank's received rows (first nr) and topk ids (all rows) with the reference. */
static int check_dispatch(int rank, int R, const inputs_t *in, const ep_dispatch_result_t *res, int worst,
                          const char *what) {
    int failures = 0;
    epref_dispatch_result_t ref;
    if (epref_dispatch(in->in, R, E, rank, 1, worst, &ref) != EPREF_OK) {
        MP_FAIL(rank, "%s: reference: %s", what, epref_last_error());
        return failures;
    }
    size_t xb = (size_t)ref.num_recv * H * 2;
    uint8_t *gx = malloc(xb + 16);
    cudaMemcpy(gx, res->recv_x.data, xb, cudaMemcpyDeviceToHost);
    if (memcmp(gx, ref.x, xb) != 0)
        MP_FAIL(rank, "%s: recv_x differs from the reference (%d rows)", what, ref.num_recv);
    if (res->recv_topk_idx.data) {
        size_t ib = (size_t)ref.num_rows * K * 8;
        int64_t *gi = malloc(ib + 16);
        cudaMemcpy(gi, res->recv_topk_idx.data, ib, cudaMemcpyDeviceToHost);
        if (memcmp(gi, ref.topk_idx, ib) != 0)
            MP_FAIL(rank, "%s: recv_topk_idx differs from the reference (%d rows)", what, ref.num_rows);
        free(gi);
    }
    free(gx);
    epref_dispatch_result_free(&ref);
    return failures;
}

/* Combine of the received rows: token t comes back as bf16(x_t * copies_t), or +0 when it went nowhere. */
static int check_combine(int rank, int R, const inputs_t *in, const void *dout, const char *what) {
    int failures = 0, n = in->n[rank];
    uint16_t *got = malloc((size_t)n * H * 2 + 16);
    cudaMemcpy(got, dout, (size_t)n * H * 2, cudaMemcpyDeviceToHost);
    uint8_t *in_rank = malloc((size_t)n * R + 1);
    epref_dispatch_layout(in->idx[rank], n, K, R, E, NULL, NULL, in_rank);
    for (int t = 0; t < n && !failures; t++) {
        int copies = 0;
        for (int d = 0; d < R; d++)
            copies += in_rank[(size_t)t * R + d];
        for (int h = 0; h < H && !failures; h++) {
            /* a token sent nowhere sums nothing: +0 (x * 0 would be -0 for a negative x) */
            uint16_t want =
                copies ? epref_float_to_bf16(epref_bf16_to_float(in->x[rank][(size_t)t * H + h]) * (float)copies) : 0;
            if (got[(size_t)t * H + h] != want)
                MP_FAIL(rank, "%s: out[%d, %d] = 0x%04x, want 0x%04x", what, t, h, got[(size_t)t * H + h], want);
        }
    }
    free(got), free(in_rank);
    return failures;
}

static ep_group_t make_group(int rank, int R, const ep_unique_id_t *id, int64_t timeout_ms) {
    mp_enter_device(rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = ep_normal_buffer_bytes(R, NMAX, H, 2, 0, K);
    cfg.timeout_ms = timeout_ms;
    ep_group_t g = NULL;
    if (ep_group_create(id, R, rank, mp_device(rank), &cfg, &g) != EP_SUCCESS)
        fprintf(stderr, "[rank %d] create: %s\n", rank, ep_last_error());
    return g;
}

static int graph_replay(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = make_group(rank, R, id, 0);
    if (!g)
        return 1;
    devbufs_t d;
    dev_alloc(&d, R);
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    /* Every rank captures with the same N (the buffers' capacity); token counts per replay vary below it by
     * routing tokens past n nowhere. */
    int n = NMAX, worst = R * NMAX;
    inputs_t in;
    make_inputs(&in, R, 1);
    ep_dispatch_args_t a = dispatch_args(&d, n, R);
    a.num_worst_tokens = worst;
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = s;
    ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
    cudaGraph_t graph;
    cudaGraphExec_t exec = NULL;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal); /* ranks may be threads */
    MP_EXPECT_STATUS(rank, layout(g, &a, s), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &a, &res, &l), EP_SUCCESS);
    ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
    ca.x = res.recv_x;
    ca.out = ep_tensor_2d(d.out, EP_DTYPE_BFLOAT16, n, H);
    ca.handle = res.handle;
    MP_EXPECT_STATUS(rank, ep_combine(g, &ca, &l), EP_SUCCESS);
    if (cudaStreamEndCapture(s, &graph) != cudaSuccess || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
        MP_FAIL(rank, "capture failed: %s", cudaGetErrorString(cudaGetLastError()));
        return failures;
    }
    free_inputs(&in, R);
    for (int replay = 0; replay < 4 && !failures; replay++) {
        make_inputs(&in, R, 100 + (uint64_t)replay);
        for (int r = 0; r < R; r++) { /* pad every rank to n tokens that go nowhere */
            int m = in.n[r];
            in.x[r] = realloc(in.x[r], (size_t)n * H * 2);
            in.idx[r] = realloc(in.idx[r], (size_t)n * K * 8);
            in.w[r] = realloc(in.w[r], (size_t)n * K * 4);
            memset(in.x[r] + (size_t)m * H, 0, (size_t)(n - m) * H * 2);
            for (size_t i = (size_t)m * K; i < (size_t)n * K; i++)
                in.idx[r][i] = -1, in.w[r][i] = 0;
            in.n[r] = n;
            in.in[r].num_tokens = n;
            in.in[r].x = (const uint8_t *)in.x[r];
            in.in[r].topk_idx = in.idx[r];
            in.in[r].topk_weights = in.w[r];
        }
        upload(&d, &in, rank);
        cudaGraphLaunch(exec, s);
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS);
        char what[32];
        snprintf(what, sizeof(what), "graph replay %d", replay);
        failures += check_dispatch(rank, R, &in, &res, worst, what);
        failures += check_combine(rank, R, &in, d.out, what);
        free_inputs(&in, R);
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    MP_EXPECT_STATUS(rank, ep_handle_destroy(res.handle), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    dev_free(&d);
    cudaStreamDestroy(s);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

static int events_and_async(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = make_group(rank, R, id, 0);
    if (!g)
        return 1;
    devbufs_t d;
    dev_alloc(&d, R);
    cudaStream_t producer, consumer;
    cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking);
    cudaStreamCreateWithFlags(&consumer, cudaStreamNonBlocking);
    cudaEvent_t produced, finished;
    cudaEventCreateWithFlags(&produced, cudaEventDisableTiming);
    cudaEventCreateWithFlags(&finished, cudaEventDisableTiming);
    inputs_t in;
    make_inputs(&in, R, 7);
    upload(&d, &in, rank);
    int n = in.n[rank];
    ep_dispatch_args_t a = dispatch_args(&d, n, R);
    MP_EXPECT_STATUS(rank, layout(g, &a, NULL), EP_SUCCESS);
    ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &a, &res, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    failures += check_dispatch(rank, R, &in, &res, 0, "plain dispatch");

    /* New x arrives late from the producer; the cached dispatch must wait for it via previous_event. */
    for (int r = 0; r < R; r++)
        for (size_t i = 0; i < (size_t)in.n[r] * H; i++)
            in.x[r][i] ^= 0x0101;
    void *staging;
    mp_malloc(&staging, (size_t)n * H * 2);
    cudaMemcpy(staging, in.x[rank], (size_t)n * H * 2, cudaMemcpyHostToDevice);
    test_delay_copy(d.x, staging, (size_t)n * H * 2, 200, producer);
    cudaEventRecord(produced, producer);
    ep_dispatch_args_t c = a;
    c.cached_handle = res.handle;
    memset(&c.topk_idx, 0, sizeof(c.topk_idx));
    memset(&c.topk_weights, 0, sizeof(c.topk_weights));
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = consumer;
    l.previous_event = produced;
    l.async_finish = 1;
    l.finish_event = finished;
    ep_dispatch_result_t res2 = EP_DISPATCH_RESULT_INIT;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &c, &res2, &l), EP_SUCCESS);
    cudaEventSynchronize(finished);
    failures += check_dispatch(rank, R, &in, &res2, 0, "cached dispatch after previous_event");
    ep_launch_t bad = EP_LAUNCH_INIT;
    bad.async_finish = 1;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &c, &res2, &bad), EP_ERROR_INVALID_ARGUMENT);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_handle_destroy(res.handle), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    free_inputs(&in, R);
    mp_free(staging);
    dev_free(&d);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

/* The last rank never arrives: in the dispatch (arg NULL), or after a dispatch that every rank completed, in the
 * combine (arg non-NULL). The others fail with a timeout naming it and the stage; every rank destroys the group. */
static int missing_peer(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    const int in_combine = arg != NULL;
    const int64_t timeout_ms = R > 4 ? 4000 : 1500; /* creation at R=8 takes ~2 s */
    ep_group_t g = make_group(rank, R, id, timeout_ms);
    if (!g)
        return 1;
    devbufs_t d;
    dev_alloc(&d, R);
    inputs_t in;
    make_inputs(&in, R, 9);
    upload(&d, &in, rank);
    ep_dispatch_args_t a = dispatch_args(&d, in.n[rank], R);
    MP_EXPECT_STATUS(rank, layout(g, &a, NULL), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_SUCCESS);
    ep_dispatch_result_t done = EP_DISPATCH_RESULT_INIT;
    if (in_combine)
        MP_EXPECT_STATUS(rank, ep_dispatch(g, &a, &done, NULL), EP_SUCCESS);
    if (rank == R - 1) {
        struct timespec nap = {(time_t)(2 * timeout_ms + 1000) / 1000, 0};
        nanosleep(&nap, NULL); /* never dispatches, or never combines */
    } else if (in_combine) {
        ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
        ca.x = done.recv_x;
        ca.out = ep_tensor_2d(d.out, EP_DTYPE_BFLOAT16, in.n[rank], H);
        ca.handle = done.handle;
        MP_EXPECT_STATUS(rank, ep_combine(g, &ca, NULL), EP_SUCCESS); /* enqueued: combine never waits on the host */
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_ERROR_TIMEOUT);
        failures += mp_check_timeout_message(rank, R - 1, "combine");
    } else {
        ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
        MP_EXPECT_STATUS(rank, ep_dispatch(g, &a, &res, NULL), EP_ERROR_TIMEOUT);
        failures += mp_check_timeout_message(rank, R - 1, "dispatch");
        if (res.handle != NULL)
            MP_FAIL(rank, "a failed dispatch returned a handle");
        MP_EXPECT_STATUS(rank, ep_group_synchronize(g, NULL), EP_ERROR_TIMEOUT);
    }
    ep_handle_destroy(done.handle);
    free_inputs(&in, R);
    dev_free(&d);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

static int autotune_and_errors(int rank, int R, const ep_unique_id_t *id, void *arg) {
    int failures = 0;
    ep_group_t g = make_group(rank, R, id, 0);
    if (!g)
        return 1;
    devbufs_t d;
    dev_alloc(&d, R);
    inputs_t in;
    make_inputs(&in, R, 11);
    upload(&d, &in, rank);
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    ep_dispatch_args_t a = dispatch_args(&d, in.n[rank], R);
    MP_EXPECT_STATUS(rank, layout(g, &a, s), EP_SUCCESS);
    int candidates[3] = {8, 16, 24}, best = -1;
    float us = 0;
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = s;
    MP_EXPECT_STATUS(rank, ep_autotune_normal(g, &a, candidates, 3, &best, &us, &l), EP_SUCCESS);
    if (best != 8 && best != 16 && best != 24)
        MP_FAIL(rank, "autotune picked %d", best);
    int *all = (int *)arg;
    all[rank] = best;
    if (rank == 0)
        printf("     autotune: best %d SMs, %.1f us for dispatch + combine of ~%d tokens\n", best, us, in.n[rank]);

    /* A host-waiting dispatch cannot be captured. */
    ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal); /* ranks may be threads */
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &a, &res, &l), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "num_worst_tokens"))
        MP_FAIL(rank, "capture message: %s", ep_last_error());
    cudaGraph_t graph;
    cudaStreamEndCapture(s, &graph);
    cudaGraphDestroy(graph);
    /* Weights without ids; a worst-token count beyond the buffer. */
    ep_dispatch_args_t b = a;
    memset(&b.topk_idx, 0, sizeof(b.topk_idx));
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res, &l), EP_ERROR_INVALID_ARGUMENT);
    b = a;
    b.num_worst_tokens = 1 << 30;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res, &l), EP_ERROR_BUFFER_TOO_SMALL);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    /* Rank 0's num_tokens_per_rank disagrees with its is_token_in_rank (found on the device): the count exchange
     * abandons the dispatch on every rank; rank 0 is told what is wrong, the others that another rank's input
     * was bad, and nothing is sent. */
    int32_t per_rank[8];
    cudaStreamSynchronize(s);
    cudaMemcpy(per_rank, d.per_rank, (size_t)R * 4, cudaMemcpyDeviceToHost);
    per_rank[0] += rank == 0;
    void *bad_per_rank = NULL;
    mp_malloc(&bad_per_rank, (size_t)R * 4);
    cudaMemcpy(bad_per_rank, per_rank, (size_t)R * 4, cudaMemcpyHostToDevice);
    b = a;
    b.num_tokens_per_rank = ep_tensor_1d(bad_per_rank, EP_DTYPE_INT32, R);
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res, &l), EP_ERROR_DEVICE_INPUT);
    if (!strstr(ep_last_error(), rank == 0 ? "num_tokens_per_rank says" : "another rank's input was bad"))
        MP_FAIL(rank, "layout mismatch message: %s", ep_last_error());
    if (rank == 1)
        printf("     rank 1 saw: %s\n", ep_last_error());
    mp_free(bad_per_rank);
    /* The last rank dispatches rows of half the hidden size (a [n, H/2] view with the rows' stride): valid on its
     * own, so only the count exchange can tell. Every rank abandons, each naming a peer whose sizes differ. */
    b = a;
    if (rank == R - 1)
        b.x.shape[1] = H / 2;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res, &l), EP_ERROR_INVALID_ARGUMENT);
    char want[96];
    snprintf(want, sizeof(want), "called dispatch with hidden=%d, x bfloat16", rank == R - 1 ? H : H / 2);
    if (!strstr(ep_last_error(), want) || !strstr(ep_last_error(), "every rank must pass the same"))
        MP_FAIL(rank, "mismatched sizes message: %s (wanted \"%s\")", ep_last_error(), want);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    /* The last rank without topk_weights (its peers would receive weights 0.0 from it): also compared. */
    b = a;
    if (rank == R - 1)
        memset(&b.topk_weights, 0, sizeof(b.topk_weights));
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res, &l), EP_ERROR_INVALID_ARGUMENT);
    snprintf(want, sizeof(want), "%s topk_weights, num_experts=%d; this rank with", rank == R - 1 ? "with" : "without",
             a.num_experts);
    if (!strstr(ep_last_error(), want))
        MP_FAIL(rank, "mismatched weights message: %s (wanted \"%s\")", ep_last_error(), want);
    /* Worst-token mode with another row count on the last rank: no host waits, so every call returns, and the
     * abandon is reported when the group is synchronised, on every rank. */
    b = a;
    const int worst = R * NMAX - 16;
    b.num_worst_tokens = rank == R - 1 ? worst + 8 : worst;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res, &l), EP_SUCCESS);
    ep_handle_t abandoned = res.handle;
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_ERROR_INVALID_ARGUMENT);
    snprintf(want, sizeof(want), "called dispatch with num_worst_tokens=%d, this rank with %d",
             rank == R - 1 ? worst : worst + 8, rank == R - 1 ? worst + 8 : worst);
    if (!strstr(ep_last_error(), want))
        MP_FAIL(rank, "mismatched num_worst_tokens message: %s (wanted \"%s\")", ep_last_error(), want);
    MP_EXPECT_STATUS(rank, ep_handle_destroy(abandoned), EP_SUCCESS);
    /* Nothing was sent: a normal dispatch still works (every rank turned to the next parity, whether its host
     * saw the abandon or not). */
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &a, &res, &l), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS);
    failures += check_dispatch(rank, R, &in, &res, 0, "dispatch after errors");
    /* A cached dispatch with topk_idx holding ids out of range (no layout kernel sees these ids): token 0's (sent
     * somewhere) and the last token's (sent nowhere by the handle's routing) are both skipped and counted; the
     * report names one of them. */
    void *bad_idx = NULL;
    mp_malloc(&bad_idx, (size_t)in.n[rank] * K * 8);
    cudaMemcpy(bad_idx, d.idx, (size_t)in.n[rank] * K * 8, cudaMemcpyDeviceToDevice);
    const int64_t out_of_range = E + 5;
    cudaMemcpy((int64_t *)bad_idx + 1, &out_of_range, 8, cudaMemcpyHostToDevice); /* token 0, k = 1 */
    cudaMemcpy((int64_t *)bad_idx + (size_t)(in.n[rank] - 1) * K + 1, &out_of_range, 8, cudaMemcpyHostToDevice);
    b = a;
    b.cached_handle = res.handle;
    b.topk_idx.data = bad_idx;
    ep_dispatch_result_t res3 = EP_DISPATCH_RESULT_INIT;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res3, &l), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_ERROR_DEVICE_INPUT);
    char bad_first[96], bad_last[96];
    snprintf(bad_first, sizeof(bad_first), "topk_idx[0, 1] = %d is outside [-1, num_experts)", E + 5);
    snprintf(bad_last, sizeof(bad_last), "topk_idx[%d, 1] = %d is outside [-1, num_experts)", in.n[rank] - 1, E + 5);
    if (!strstr(ep_last_error(), "dispatch (send)") ||
        (!strstr(ep_last_error(), bad_first) && !strstr(ep_last_error(), bad_last)) ||
        !strstr(ep_last_error(), "(2 bad entries, skipped)"))
        MP_FAIL(rank, "cached bad id message: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS); /* reported once; the group goes on */
    mp_free(bad_idx);
    /* Sizes that differ across ranks where no count exchange compares them: a cached dispatch, then a combine, in
     * which the last rank passes half the hidden size. Both go out (no host can tell) and the barrier after the
     * send finds the difference: every rank is told at its next synchronize, naming a peer. Then the same calls
     * with equal sizes are right again. */
    b = a;
    b.cached_handle = res.handle;
    if (rank == R - 1)
        b.x.shape[1] = H / 2;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res3, &l), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_ERROR_INVALID_ARGUMENT);
    snprintf(want, sizeof(want), "made a cached dispatch with hidden=%d", rank == R - 1 ? H : H / 2);
    if (!strstr(ep_last_error(), want) || !strstr(ep_last_error(), "the received rows are not valid"))
        MP_FAIL(rank, "mismatched cached dispatch message: %s (wanted \"%s\")", ep_last_error(), want);
    ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
    ca.x = res3.recv_x; /* [rows, H / 2] on the last rank */
    ca.out = ep_tensor_2d(d.out, EP_DTYPE_BFLOAT16, in.n[rank], H);
    ca.out.shape[1] = ca.x.shape[1];
    ca.handle = res.handle;
    MP_EXPECT_STATUS(rank, ep_combine(g, &ca, &l), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_ERROR_INVALID_ARGUMENT);
    snprintf(want, sizeof(want), "combined rows of hidden=%d without topk_weights, this rank hidden=%d",
             rank == R - 1 ? H : H / 2, rank == R - 1 ? H / 2 : H);
    if (!strstr(ep_last_error(), want) || !strstr(ep_last_error(), "the combined output is not valid"))
        MP_FAIL(rank, "mismatched combine message: %s (wanted \"%s\")", ep_last_error(), want);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    b.x.shape[1] = H;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res3, &l), EP_SUCCESS);
    ca.x = res3.recv_x;
    ca.out.shape[1] = H;
    MP_EXPECT_STATUS(rank, ep_combine(g, &ca, &l), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS);
    failures += check_dispatch(rank, R, &in, &res3, 0, "cached dispatch after mismatched sizes");
    failures += check_combine(rank, R, &in, d.out, "combine after mismatched sizes");
    /* A cached dispatch asking for another worst-token count than its handle was made with; a group destroyed
     * while a handle still refers to it. Both refused on the host, with nothing launched or torn down. */
    b = a;
    b.cached_handle = res.handle;
    b.num_worst_tokens = 8;
    ep_dispatch_result_t res2 = EP_DISPATCH_RESULT_INIT;
    MP_EXPECT_STATUS(rank, ep_dispatch(g, &b, &res2, &l), EP_ERROR_INVALID_ARGUMENT);
    if (!strstr(ep_last_error(), "num_worst_tokens: the cached handle"))
        MP_FAIL(rank, "cached worst-token message: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_ERROR_IN_PROGRESS);
    if (!strstr(ep_last_error(), "handles still refer"))
        MP_FAIL(rank, "destroy with a live handle: %s", ep_last_error());
    MP_EXPECT_STATUS(rank, ep_handle_destroy(res.handle), EP_SUCCESS);
    MP_EXPECT_STATUS(rank, ep_group_synchronize(g, s), EP_SUCCESS);
    free_inputs(&in, R);
    dev_free(&d);
    MP_EXPECT_STATUS(rank, ep_group_destroy(g), EP_SUCCESS);
    return failures;
}

int main(int argc, char **argv) {
    int ranks = mp_arg_int(argc, argv, "--ranks", 2);
    E = mp_experts(E, ranks);
    int failed = 0;
    failed += mp_run("ht.graph_replay", ranks, graph_replay, NULL, 120) != 0;
    failed += mp_run("ht.events_and_async", ranks, events_and_async, NULL, 120) != 0;
    failed += mp_run("ht.missing_peer_times_out", ranks, missing_peer, NULL, 60) != 0;
    static int in_combine = 1;
    failed += mp_run("ht.missing_peer_in_combine_times_out", ranks, missing_peer, &in_combine, 60) != 0;
    int *best = mmap(NULL, 8 * sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    memset(best, 0, 8 * sizeof(int));
    int at_failed = mp_run("ht.autotune_and_errors", ranks, autotune_and_errors, best, 120) != 0;
    for (int r = 1; r < ranks && !at_failed; r++)
        if (best[r] != best[0]) {
            fprintf(stderr, "autotune: rank %d picked %d SMs, rank 0 picked %d\n", r, best[r], best[0]);
            at_failed = 1;
        }
    failed += at_failed;
    printf("%d passed, %d failed\n", 5 - failed, failed);
    return failed;
}
