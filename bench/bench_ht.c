/* High-throughput benchmark. Each configuration is timed with CUDA events on the caller's stream after a
 * warm-up, median over iterations, and the slowest rank's median is reported. Logical bytes are the bytes of
 * every row a rank receives (its own included; FP8 counts data + scales); link bytes leave out the rank's own
 * rows. Combine moves the same bytes back. The NCCL baseline sends the same rows, already packed per
 * destination, with grouped ncclSend/ncclRecv. Correctness of the measured ops is checked in the same run:
 * dispatch against the CPU reference (bytes), combine of the received rows against x times the number of
 * ranks each token went to (exact in float32). */
#define _DEFAULT_SOURCE
#include "bench_ht.h"
#include "epcomm.h"
#include "epref.h"
#include "fork_ranks.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ROWS 96
#define WARMUP   5
#define ITERS    30

typedef struct {
    char op[24];
    char dtype[8];
    int tokens, sms;
    double time_us, logical_bytes, link_bytes;
    int correct;
} row_t;

typedef struct {
    int n;
    int failed;
    row_t rows[MAX_ROWS];
} rank_rows_t;

typedef struct {
    const bench_ht_args_t *a;
    int rank, R;
    ep_unique_id_t ep_id;
    ncclUniqueId nccl_id;
    ep_group_t g;
    ncclComm_t comm;
    cudaStream_t stream;
    cudaEvent_t ev0, ev1;
    rank_rows_t *out;
} ctx_t;

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

/* Times `fn` (which enqueues one op on ctx->stream), returns the median in microseconds. */
typedef int (*op_fn)(ctx_t *c, void *arg);
static double time_op(ctx_t *c, op_fn fn, void *arg) {
    double t[ITERS];
    for (int i = 0; i < WARMUP + ITERS; i++) {
        cudaEventRecord(c->ev0, c->stream);
        if (fn(c, arg) != 0)
            return -1;
        cudaEventRecord(c->ev1, c->stream);
        cudaEventSynchronize(c->ev1);
        float ms = 0;
        cudaEventElapsedTime(&ms, c->ev0, c->ev1);
        if (i >= WARMUP)
            t[i - WARMUP] = ms * 1e3;
    }
    qsort(t, ITERS, sizeof(double), cmp_double);
    return t[ITERS / 2];
}

static void add_row(ctx_t *c, const char *op, const char *dtype, int tokens, int sms, double us, double logical,
                    double link, int correct) {
    if (c->out->n >= MAX_ROWS)
        return;
    row_t *r = &c->out->rows[c->out->n++];
    snprintf(r->op, sizeof(r->op), "%s", op);
    snprintf(r->dtype, sizeof(r->dtype), "%s", dtype);
    r->tokens = tokens, r->sms = sms, r->time_us = us, r->logical_bytes = logical, r->link_bytes = link;
    r->correct = correct;
}

/* ---- one workload: routing and data for all ranks (drawn from (seed, rank)), device copies of ours ---- */
typedef struct {
    int N, H, K, E, fp8;
    int64_t *idx_all[8];
    float *w_all[8];
    uint8_t *x_all[8]; /* only filled when checking */
    int32_t counts[8][8];
    void *x, *scales, *idx, *w, *per_rank, *in_rank, *per_expert;
    ep_dispatch_args_t da;
    ep_handle_t handle;
    ep_dispatch_result_t res;
    int sms;
} work_t;

static void gen_rank(const ctx_t *c, work_t *w, int r, int with_x) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 42 + (uint64_t)w->N, (uint64_t)r);
    size_t n = (size_t)w->N;
    w->idx_all[r] = malloc(n * w->K * 8);
    w->w_all[r] = malloc(n * w->K * 4);
    epref_random_routing(&rng, w->N, w->K, w->E, 0.0f, w->idx_all[r], w->w_all[r]);
    if (!with_x)
        return;
    size_t row = (size_t)w->H * (w->fp8 ? 1 : 2);
    w->x_all[r] = malloc(n * row + (size_t)w->H / 128 * 4 * n);
    for (size_t i = 0; i < n * w->H; i++) {
        if (w->fp8)
            w->x_all[r][i] = (uint8_t)(epref_rng_next(&rng) & 0x7e);
        else
            ((uint16_t *)w->x_all[r])[i] = epref_float_to_bf16(epref_rng_normal(&rng));
    }
    float *s = (float *)(w->x_all[r] + n * row);
    for (size_t i = 0; i < n * (size_t)w->H / 128; i++)
        s[i] = 0.5f + epref_rng_uniform(&rng);
}

static void *upload(const void *h, size_t bytes) {
    void *p = NULL;
    cudaMalloc(&p, bytes ? bytes : 16);
    if (h && bytes)
        cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice);
    return p;
}

static int setup_work(ctx_t *c, work_t *w, int check) {
    int R = c->R;
    for (int r = 0; r < R; r++) {
        gen_rank(c, w, r, check || r == c->rank);
        int32_t per_rank[8];
        epref_dispatch_layout(w->idx_all[r], w->N, w->K, R, w->E, per_rank, NULL, NULL);
        for (int d = 0; d < R; d++)
            w->counts[r][d] = per_rank[d];
    }
    size_t n = (size_t)w->N, row = (size_t)w->H * (w->fp8 ? 1 : 2), S = (size_t)w->H / 128;
    w->x = upload(w->x_all[c->rank], n * row);
    w->scales = upload(w->x_all[c->rank] + n * row, n * S * 4);
    w->idx = upload(w->idx_all[c->rank], n * w->K * 8);
    w->w = upload(w->w_all[c->rank], n * w->K * 4);
    w->per_rank = upload(NULL, (size_t)R * 4);
    w->in_rank = upload(NULL, n * R);
    w->per_expert = upload(NULL, (size_t)w->E * 4);
    ep_tensor_t t_idx = ep_tensor_2d(w->idx, EP_DTYPE_INT64, w->N, w->K);
    ep_tensor_t t_rank = ep_tensor_1d(w->per_rank, EP_DTYPE_INT32, R);
    ep_tensor_t t_exp = ep_tensor_1d(w->per_expert, EP_DTYPE_INT32, w->E);
    ep_tensor_t t_in = ep_tensor_2d(w->in_rank, EP_DTYPE_BOOL, w->N, R);
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = c->stream;
    if (ep_get_dispatch_layout(c->g, &t_idx, w->E, &t_rank, NULL, &t_exp, &t_in, &l) != EP_SUCCESS ||
        ep_group_synchronize(c->g, c->stream) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: layout: %s\n", c->rank, ep_last_error());
        return 1;
    }
    ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
    da.x = ep_tensor_2d(w->x, w->fp8 ? EP_DTYPE_FLOAT8_E4M3 : EP_DTYPE_BFLOAT16, w->N, w->H);
    if (w->fp8)
        da.x_scales = ep_tensor_2d(w->scales, EP_DTYPE_FLOAT32, w->N, (int64_t)S);
    da.topk_idx = t_idx;
    da.topk_weights = ep_tensor_2d(w->w, EP_DTYPE_FLOAT32, w->N, w->K);
    da.num_tokens_per_rank = t_rank;
    da.is_token_in_rank = t_in;
    da.num_tokens_per_expert = t_exp;
    da.num_experts = w->E;
    da.expert_alignment = 1;
    w->da = da;
    return 0;
}

static void free_work(ctx_t *c, work_t *w) {
    if (w->handle)
        ep_handle_destroy(w->handle);
    cudaFree(w->x), cudaFree(w->scales), cudaFree(w->idx), cudaFree(w->w), cudaFree(w->per_rank);
    cudaFree(w->in_rank), cudaFree(w->per_expert);
    for (int r = 0; r < c->R; r++)
        free(w->idx_all[r]), free(w->w_all[r]), free(w->x_all[r]);
}

static int op_dispatch(ctx_t *c, void *arg) {
    work_t *w = arg;
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = c->stream;
    w->da.num_sms = w->sms;
    w->da.cached_handle = NULL;
    ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
    if (ep_dispatch(c->g, &w->da, &res, &l) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: dispatch: %s\n", c->rank, ep_last_error());
        return 1;
    }
    if (w->handle)
        ep_handle_destroy(w->handle);
    w->handle = res.handle;
    w->res = res;
    return 0;
}

static int op_cached_dispatch(ctx_t *c, void *arg) {
    work_t *w = arg;
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = c->stream;
    ep_dispatch_args_t da = w->da;
    da.num_sms = w->sms;
    da.cached_handle = w->handle;
    memset(&da.topk_idx, 0, sizeof(da.topk_idx));
    memset(&da.topk_weights, 0, sizeof(da.topk_weights));
    ep_dispatch_result_t res = EP_DISPATCH_RESULT_INIT;
    if (ep_dispatch(c->g, &da, &res, &l) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: cached dispatch: %s\n", c->rank, ep_last_error());
        return 1;
    }
    w->res = res;
    return 0;
}

typedef struct {
    work_t *w;
    void *out;
    void *x; /* combine input: a copy of the received rows */
} combine_arg_t;

static int op_combine(ctx_t *c, void *arg) {
    combine_arg_t *ca = arg;
    ep_launch_t l = EP_LAUNCH_INIT;
    l.stream = c->stream;
    ep_combine_args_t a = EP_COMBINE_ARGS_INIT;
    a.x = ep_tensor_2d(ca->x, EP_DTYPE_BFLOAT16, ca->w->res.num_rows, ca->w->H);
    a.out = ep_tensor_2d(ca->out, EP_DTYPE_BFLOAT16, ca->w->N, ca->w->H);
    a.handle = ca->w->handle;
    a.num_sms = ca->w->sms;
    if (ep_combine(c->g, &a, &l) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: combine: %s\n", c->rank, ep_last_error());
        return 1;
    }
    return 0;
}

/* ---- the NCCL baseline: rows packed per destination, grouped send/recv ---- */
typedef struct {
    void *send, *recv;
    size_t send_off[8], recv_off[8], send_bytes[8], recv_bytes[8];
} nccl_arg_t;

static int op_nccl(ctx_t *c, void *arg) {
    nccl_arg_t *n = arg;
    ncclGroupStart();
    for (int p = 0; p < c->R; p++) {
        ncclSend((char *)n->send + n->send_off[p], n->send_bytes[p], ncclUint8, p, c->comm, c->stream);
        ncclRecv((char *)n->recv + n->recv_off[p], n->recv_bytes[p], ncclUint8, p, c->comm, c->stream);
    }
    return ncclGroupEnd() != ncclSuccess;
}

static void bytes_moved(const ctx_t *c, const work_t *w, size_t row, double *logical, double *link) {
    double all = 0, own = (double)w->counts[c->rank][c->rank];
    for (int s = 0; s < c->R; s++)
        all += w->counts[s][c->rank];
    *logical = all * (double)row;
    *link = (all - own) * (double)row;
}

static int check_dispatch(ctx_t *c, work_t *w) {
    epref_rank_input_t in[8];
    size_t row = (size_t)w->H * (w->fp8 ? 1 : 2), S = (size_t)w->H / 128;
    for (int r = 0; r < c->R; r++) {
        memset(&in[r], 0, sizeof(in[r]));
        in[r].num_tokens = w->N;
        in[r].x = w->x_all[r];
        in[r].row_bytes = row;
        in[r].stride_bytes = row;
        in[r].scales = w->fp8 ? (const uint32_t *)(w->x_all[r] + (size_t)w->N * row) : NULL;
        in[r].num_scales = w->fp8 ? (int)S : 0;
        in[r].scales_stride = S;
        in[r].topk = w->K;
        in[r].topk_idx = w->idx_all[r];
        in[r].topk_weights = w->w_all[r];
    }
    epref_dispatch_result_t ref;
    if (epref_dispatch(in, c->R, w->E, c->rank, 1, 0, &ref) != EPREF_OK)
        return 0;
    size_t bytes = (size_t)ref.num_recv * row;
    uint8_t *got = malloc(bytes + 16);
    cudaMemcpy(got, w->res.recv_x.data, bytes, cudaMemcpyDeviceToHost);
    int ok = w->res.num_rows == ref.num_recv && memcmp(got, ref.x, bytes) == 0;
    if (ok && w->fp8) {
        size_t sb = (size_t)ref.num_recv * S * 4;
        uint8_t *gs = malloc(sb + 16);
        cudaMemcpy(gs, w->res.recv_x_scales.data, sb, cudaMemcpyDeviceToHost);
        ok = memcmp(gs, ref.scales, sb) == 0;
        free(gs);
    }
    free(got);
    epref_dispatch_result_free(&ref);
    return ok;
}

/* Combine of the received rows themselves: token t must come back as bf16(x_t * copies_t). */
static int check_combine(ctx_t *c, work_t *w, void *dout) {
    size_t n = (size_t)w->N * w->H;
    uint16_t *got = malloc(n * 2 + 16);
    cudaMemcpy(got, dout, n * 2, cudaMemcpyDeviceToHost);
    uint8_t *in_rank = malloc((size_t)w->N * c->R + 1);
    epref_dispatch_layout(w->idx_all[c->rank], w->N, w->K, c->R, w->E, NULL, NULL, in_rank);
    const uint16_t *x = (const uint16_t *)w->x_all[c->rank];
    int ok = 1;
    for (int t = 0; t < w->N && ok; t++) {
        int copies = 0;
        for (int d = 0; d < c->R; d++)
            copies += in_rank[(size_t)t * c->R + d];
        for (int h = 0; h < w->H && ok; h++) {
            uint16_t want = epref_float_to_bf16(epref_bf16_to_float(x[(size_t)t * w->H + h]) * (float)copies);
            ok = got[(size_t)t * w->H + h] == want;
        }
    }
    free(got), free(in_rank);
    return ok;
}

static void run_nccl(ctx_t *c, work_t *w, const char *dtype, size_t row) {
    nccl_arg_t n;
    memset(&n, 0, sizeof(n));
    size_t so = 0, ro = 0;
    for (int p = 0; p < c->R; p++) {
        n.send_off[p] = so, n.send_bytes[p] = (size_t)w->counts[c->rank][p] * row, so += n.send_bytes[p];
        n.recv_off[p] = ro, n.recv_bytes[p] = (size_t)w->counts[p][c->rank] * row, ro += n.recv_bytes[p];
    }
    cudaMalloc(&n.send, so + 16);
    cudaMalloc(&n.recv, ro + 16);
    cudaMemset(n.send, 0x3c, so);
    double us = time_op(c, op_nccl, &n);
    double logical, link;
    bytes_moved(c, w, row, &logical, &link);
    add_row(c, "nccl_dispatch", dtype, w->N, 0, us, logical, link, -1);
    cudaFree(n.send), cudaFree(n.recv);
}

/* The same dispatch with its rows moved by bulk copies (EPCOMM_HT_DISPATCH_TMA=1, experimental), checked. */
static int run_dispatch_tma(ctx_t *c, work_t *w, const char *dtype, double logical, double link, int check) {
    setenv("EPCOMM_HT_DISPATCH_TMA", "1", 1);
    double t_full = time_op(c, op_dispatch, w);
    int ok = check ? check_dispatch(c, w) : -1;
    double t_cached = time_op(c, op_cached_dispatch, w);
    unsetenv("EPCOMM_HT_DISPATCH_TMA");
    add_row(c, "dispatch_tma", dtype, w->N, w->sms, t_full, logical, link, ok);
    add_row(c, "cached_dispatch_tma", dtype, w->N, w->sms, t_cached, logical, link, -1);
    return t_full < 0 || t_cached < 0 || ok == 0;
}

/* The same combine with the reduction overlapped with the transfer (EPCOMM_HT_COMBINE_OVERLAP=W, experimental),
 * for W = 4 and 8 reducing warps per block, checked. */
static int run_combine_overlap(ctx_t *c, combine_arg_t *ca, const char *dtype, double logical, double link,
                               int check) {
    static const char *warps[] = {"4", "8"};
    int failed = 0;
    for (int i = 0; i < 2; i++) {
        setenv("EPCOMM_HT_COMBINE_OVERLAP", warps[i], 1);
        double t = time_op(c, op_combine, ca);
        int ok = check ? check_combine(c, ca->w, ca->out) : -1;
        unsetenv("EPCOMM_HT_COMBINE_OVERLAP");
        char op[24];
        snprintf(op, sizeof(op), "combine_overlap%s", warps[i]);
        add_row(c, op, dtype, ca->w->N, ca->w->sms, t, logical, link, ok);
        failed |= t < 0 || ok == 0;
    }
    return failed;
}

static void run_workload(ctx_t *c, int N, int fp8, const int *sms_list, int num_sms, int check) {
    work_t w;
    memset(&w, 0, sizeof(w));
    w.N = N, w.H = c->a->hidden, w.K = c->a->topk, w.E = c->a->experts, w.fp8 = fp8;
    if (setup_work(c, &w, check) != 0) {
        c->out->failed = 1;
        free_work(c, &w);
        return;
    }
    const char *dtype = fp8 ? "fp8" : "bf16";
    size_t row = (size_t)w.H * (fp8 ? 1 : 2) + (fp8 ? (size_t)w.H / 128 * 4 : 0);
    double logical, link;
    bytes_moved(c, &w, row, &logical, &link);
    for (int i = 0; i < num_sms; i++) {
        w.sms = sms_list[i];
        double t_full = time_op(c, op_dispatch, &w);
        int ok = check ? check_dispatch(c, &w) : -1;
        add_row(c, "dispatch", dtype, N, w.sms, t_full, logical, link, ok);
        double t_cached = time_op(c, op_cached_dispatch, &w);
        add_row(c, "cached_dispatch", dtype, N, w.sms, t_cached, logical, link, -1);
        if (run_dispatch_tma(c, &w, dtype, logical, link, check) != 0)
            c->out->failed = 1;
        if (fp8)
            continue;
        combine_arg_t ca = {&w, NULL, NULL};
        size_t xb = (size_t)w.res.num_rows * w.H * 2;
        cudaMalloc(&ca.out, (size_t)N * w.H * 2 + 16);
        cudaMalloc(&ca.x, xb + 16);
        cudaMemcpy(ca.x, w.res.recv_x.data, xb, cudaMemcpyDeviceToDevice);
        double t_comb = time_op(c, op_combine, &ca);
        int cok = check ? check_combine(c, &w, ca.out) : -1;
        add_row(c, "combine", dtype, N, w.sms, t_comb, logical, link, cok);
        if (run_combine_overlap(c, &ca, dtype, logical, link, check) != 0)
            c->out->failed = 1;
        if (i == 0) { /* the copy-engine transfer does not depend on the SM budget: measure it once */
            setenv("EPCOMM_HT_COMBINE_CE", "1", 1);
            double t_ce = time_op(c, op_combine, &ca);
            int ceok = check ? check_combine(c, &w, ca.out) : -1;
            unsetenv("EPCOMM_HT_COMBINE_CE");
            add_row(c, "combine_ce", dtype, N, 0, t_ce, logical, link, ceok);
            if (t_ce < 0)
                c->out->failed = 1;
        }
        cudaFree(ca.out), cudaFree(ca.x);
        if (t_full < 0 || t_cached < 0 || t_comb < 0)
            c->out->failed = 1;
    }
    run_nccl(c, &w, dtype, row);
    free_work(c, &w);
}

static int worker(ctx_t *c) {
    cudaSetDevice(c->rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    int max_n = c->a->quick ? 4096 : 8192;
    cfg.num_nvl_bytes = ep_normal_buffer_bytes(c->R, max_n, c->a->hidden, 2, 0, c->a->topk);
    if (ep_group_create(&c->ep_id, c->R, c->rank, c->rank, &cfg, &c->g) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", c->rank, ep_last_error());
        return 1;
    }
    if (ncclCommInitRank(&c->comm, c->R, c->nccl_id, c->rank) != ncclSuccess) {
        fprintf(stderr, "rank %d: ncclCommInitRank failed\n", c->rank);
        return 1;
    }
    cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    cudaEventCreate(&c->ev0);
    cudaEventCreate(&c->ev1);
    static const int sweep[] = {8, 16, 24, 32};
    static const int one[] = {24};
    static const int fp8_sms[] = {16, 24};
    run_workload(c, 4096, 0, sweep, 4, 1);
    run_workload(c, 4096, 1, fp8_sms, 2, 1);
    if (!c->a->quick) {
        run_workload(c, 1024, 0, one, 1, 0);
        run_workload(c, 8192, 0, one, 1, 0);
    }
    ncclCommDestroy(c->comm);
    if (ep_group_destroy(c->g) != EP_SUCCESS) {
        fprintf(stderr, "rank %d: destroy: %s\n", c->rank, ep_last_error());
        return 1;
    }
    return c->out->failed;
}

static void print_and_record(const bench_ht_args_t *a, rank_rows_t *all) {
    FILE *js = a->jsonl ? fopen(a->jsonl, "a") : NULL;
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    printf("\nhigh-throughput, EP%d, H=%d, top-%d of %d experts (time: slowest rank's median of %d; GB/s: mean "
           "bytes per rank / that time)\n",
           a->ranks, a->hidden, a->topk, a->experts, ITERS);
    printf("| %-19s | %-5s | %6s | %4s | %9s | %12s | %9s | %8s | %7s |\n", "op", "dtype", "tokens", "SMs", "time us",
           "logical GB/s", "link GB/s", "vs NCCL", "correct");
    printf("|---------------------|-------|--------|------|-----------|--------------|-----------|----------|---------|"
           "\n");
    for (int i = 0; i < all[0].n; i++) {
        row_t r = all[0].rows[i];
        double logical = 0, link = 0;
        int correct = r.correct;
        for (int k = 0; k < a->ranks; k++) {
            const row_t *o = &all[k].rows[i];
            r.time_us = o->time_us > r.time_us ? o->time_us : r.time_us;
            logical += o->logical_bytes / a->ranks;
            link += o->link_bytes / a->ranks;
            if (o->correct == 0)
                correct = 0;
        }
        double nccl_us = 0;
        for (int j = 0; j < all[0].n; j++) {
            const row_t *o = &all[0].rows[j];
            if (strcmp(o->op, "nccl_dispatch") == 0 && o->tokens == r.tokens && strcmp(o->dtype, r.dtype) == 0)
                for (int k = 0; k < a->ranks; k++)
                    nccl_us = all[k].rows[j].time_us > nccl_us ? all[k].rows[j].time_us : nccl_us;
        }
        double lg = logical / r.time_us / 1e3, kg = link / r.time_us / 1e3;
        char ratio[16] = "-";
        if (nccl_us > 0 && strcmp(r.op, "nccl_dispatch") != 0)
            snprintf(ratio, sizeof(ratio), "%.2fx", nccl_us / r.time_us);
        printf("| %-19s | %-5s | %6d | %4d | %9.1f | %12.1f | %9.1f | %8s | %7s |\n", r.op, r.dtype, r.tokens, r.sms,
               r.time_us, lg, kg, ratio,
               correct < 0 ? "-"
               : correct   ? "yes"
                           : "NO");
        if (js)
            fprintf(js,
                    "{\"date\": \"%s\", \"commit\": \"%s\", \"machine\": \"%s\", \"gpu\": \"%s\", \"mode\": \"ht\", "
                    "\"op\": \"%s\", \"ep\": %d, \"tokens\": %d, \"hidden\": %d, \"topk\": %d, \"experts\": %d, "
                    "\"dtype\": \"%s\", \"sms\": %d, \"time_us\": %.2f, \"logical_gbps\": %.2f, \"link_gbps\": %.2f, "
                    "\"correct\": %s}\n",
                    date, a->commit ? a->commit : "unknown", a->machine ? a->machine : "unknown", a->gpu ? a->gpu : "unknown", r.op, a->ranks,
                    r.tokens, a->hidden, a->topk, a->experts, r.dtype, r.sms, r.time_us, lg, kg,
                    correct < 0 ? "null"
                    : correct   ? "true"
                                : "false");
    }
    if (js)
        fclose(js);
}

typedef struct {
    const ctx_t *base;
    rank_rows_t *shared;
} ht_fork_ctx_t;

static int ht_rank_main(int rank, void *arg) {
    const ht_fork_ctx_t *f = arg;
    ctx_t c = *f->base;
    c.rank = rank;
    c.out = &f->shared[rank];
    return worker(&c);
}

int bench_ht_run(const bench_ht_args_t *a) {
    ctx_t base;
    memset(&base, 0, sizeof(base));
    base.a = a;
    base.R = a->ranks;
    if (a->ranks > 8 || ep_get_unique_id(&base.ep_id) != EP_SUCCESS || ncclGetUniqueId(&base.nccl_id) != ncclSuccess) {
        fprintf(stderr, "bench: setup failed: %s\n", ep_last_error());
        return 1;
    }
    rank_rows_t *shared =
        mmap(NULL, sizeof(rank_rows_t) * (size_t)a->ranks, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        return 1;
    memset(shared, 0, sizeof(rank_rows_t) * (size_t)a->ranks);
    ht_fork_ctx_t fc = {&base, shared};
    int failed = bench_fork_ranks(a->ranks, ht_rank_main, &fc);
    if (!failed)
        print_and_record(a, shared);
    munmap(shared, sizeof(rank_rows_t) * (size_t)a->ranks);
    return failed;
}
