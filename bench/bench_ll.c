/* Low-latency benchmark: for T in {1, 32, 128, 256} tokens per rank, dispatch (FP8, one call including its
 * receive) and combine (BF16), beside NCCL grouped send/recv baselines: the dispatch's bytes (each token once
 * per destination rank, FP8 row + scales) and, for combine, the same rows in bf16.
 * Timing: each call is enqueued behind a launch gate and a device barrier, so the CUDA events measure the
 * device time of the call with the ranks aligned and no host launch gap in front of it (the gate opens once
 * everything is enqueued); the call's own CPU time is reported beside it. Median and p99 of 200 calls after
 * warm-up, slowest rank. Bytes: what this rank receives from other ranks. */
#define _DEFAULT_SOURCE
#include "bench_ll.h"
#include "epcomm.h"
#include "epref.h"
#include "fork_ranks.h"
#include "gate.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LL_WARMUP 20
#define LL_ITERS  200
#define NUM_T     4

static const int token_counts[NUM_T] = {1, 32, 128, 256};

/* EPCOMM_BENCH_LL_TOKENS=T measures only that row (e.g. for a profiler); unset: every row. */
static int row_wanted(int T) {
    const char *only = getenv("EPCOMM_BENCH_LL_TOKENS");
    return only == NULL || *only == '\0' || atoi(only) == T;
}

/* The ops timed. After the four headline ones, a breakdown: each half of a hooked dispatch and combine
 * (the send alone; the receive alone once the sends are done) and the floor of the timing itself (an empty
 * kernel between the two events). */
enum {
    OP_DISPATCH,
    OP_COMBINE,
    OP_NCCL_DISPATCH,
    OP_NCCL_COMBINE,
    OP_DISPATCH_SEND,
    OP_DISPATCH_RECV,
    OP_COMBINE_SEND,
    OP_COMBINE_RECV,
    OP_FLOOR,
    OP_COMBINE_LOGFMT,
    OP_LOGFMT_SEND,
    OP_LOGFMT_RECV,
    OP_COMBINE_PER_RANK, /* the combine and its send alone with EPCOMM_LL_COMBINE_PER_RANK=1 (experimental) */
    OP_PER_RANK_SEND,
    NUM_OPS
};
static const char *op_names[NUM_OPS] = {
    "ll_dispatch",      "ll_combine",      "nccl_dispatch",       "nccl_combine",    "ll_dispatch_send",
    "ll_dispatch_recv", "ll_combine_send", "ll_combine_recv",     "timing_floor",    "ll_combine_logfmt",
    "ll_logfmt_send",   "ll_logfmt_recv",  "ll_combine_per_rank", "ll_per_rank_send"};

static int per_rank_op(int op) {
    return op == OP_COMBINE_PER_RANK || op == OP_PER_RANK_SEND;
}

typedef struct {
    ep_group_t g;
    const ep_low_latency_dispatch_args_t *dispatch, *dispatch_hooked;
    const ep_low_latency_combine_args_t *combine, *combine_hooked, *combine_logfmt, *logfmt_hooked;
    const ep_launch_t *launch;
} ll_calls_t;

typedef struct {
    ncclComm_t comm;
    cudaStream_t s;
    int R, rank, T;
    size_t fp8_row, bf16_row;
    const int32_t *per_rank;
    int32_t (*counts)[8];
    void *nsend, *nrecv;
    const uint32_t *gate_dev;
} nccl_ctx_t;

enum { PHASE_BEFORE, PHASE_TIMED, PHASE_AFTER };

typedef struct {
    double med[NUM_T][NUM_OPS], p99[NUM_T][NUM_OPS]; /* device time in us */
    double host[NUM_T][NUM_OPS];                     /* median host time of the call itself, us */
    double bytes[NUM_T][NUM_OPS];                    /* bytes this rank receives from other ranks, per op */
    int failed;
} ll_rank_out_t;

static int cmpd(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static void stats(double *t, int n, double *med, double *p99) {
    qsort(t, (size_t)n, sizeof(double), cmpd);
    *med = t[n / 2];
    *p99 = t[(n * 99) / 100];
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

/* NCCL baseline: every rank sends each token once to every rank it has an expert on (per_rank[d] rows of
 * row_bytes to d) and receives what the others send it, as grouped send/recv. */
static ncclResult_t nccl_exchange(ncclComm_t comm, cudaStream_t s, int R, int rank, int T, size_t row_bytes,
                                  const int32_t *per_rank, int32_t (*counts)[8], void *nsend, void *nrecv) {
    ncclGroupStart();
    for (int p = 0; p < R; p++) {
        ncclSend((char *)nsend + (size_t)p * T * row_bytes, (size_t)per_rank[p] * row_bytes, ncclUint8, p, comm, s);
        ncclRecv((char *)nrecv + (size_t)p * T * row_bytes, (size_t)counts[p][rank] * row_bytes, ncclUint8, p, comm, s);
    }
    return ncclGroupEnd();
}

/* One op in three phases: what must run before it (untimed), the op, and what keeps the buffer halves in
 * step after it (every dispatch is followed by its combine). */
static int run_phase(int op, int phase, const ll_calls_t *c, const nccl_ctx_t *n, ep_ll_handle_t *h) {
    ep_group_t g = c->g;
    const ep_launch_t *l = c->launch;
    int bad = 0;
#define OK(call) (bad |= (call) != EP_SUCCESS)
    switch (op) {
    case OP_DISPATCH:
        if (phase == PHASE_TIMED)
            OK(ep_low_latency_dispatch(g, c->dispatch, h, l));
        else if (phase == PHASE_AFTER)
            OK(ep_low_latency_combine(g, c->combine, *h, l));
        break;
    case OP_COMBINE:
        if (phase == PHASE_BEFORE)
            OK(ep_low_latency_dispatch(g, c->dispatch, h, l));
        else if (phase == PHASE_TIMED)
            OK(ep_low_latency_combine(g, c->combine, *h, l));
        break;
    case OP_DISPATCH_SEND:
        if (phase == PHASE_TIMED)
            OK(ep_low_latency_dispatch(g, c->dispatch_hooked, h, l));
        else if (phase == PHASE_AFTER) {
            OK(ep_low_latency_dispatch_hook(g, *h, l));
            OK(ep_low_latency_combine(g, c->combine, *h, l));
        }
        break;
    case OP_DISPATCH_RECV:
        if (phase == PHASE_BEFORE)
            OK(ep_low_latency_dispatch(g, c->dispatch_hooked, h, l));
        else if (phase == PHASE_TIMED)
            OK(ep_low_latency_dispatch_hook(g, *h, l));
        else
            OK(ep_low_latency_combine(g, c->combine, *h, l));
        break;
    case OP_COMBINE_SEND:
    case OP_LOGFMT_SEND:
    case OP_PER_RANK_SEND:
        if (phase == PHASE_BEFORE)
            OK(ep_low_latency_dispatch(g, c->dispatch, h, l));
        else if (phase == PHASE_TIMED)
            OK(ep_low_latency_combine(g, op == OP_LOGFMT_SEND ? c->logfmt_hooked : c->combine_hooked, *h, l));
        else
            OK(ep_low_latency_combine_hook(g, *h, l));
        break;
    case OP_COMBINE_RECV:
    case OP_LOGFMT_RECV:
        if (phase == PHASE_BEFORE) {
            OK(ep_low_latency_dispatch(g, c->dispatch, h, l));
            OK(ep_low_latency_combine(g, op == OP_LOGFMT_RECV ? c->logfmt_hooked : c->combine_hooked, *h, l));
        } else if (phase == PHASE_TIMED)
            OK(ep_low_latency_combine_hook(g, *h, l));
        break;
    case OP_COMBINE_LOGFMT:
    case OP_COMBINE_PER_RANK:
        if (phase == PHASE_BEFORE)
            OK(ep_low_latency_dispatch(g, c->dispatch, h, l));
        else if (phase == PHASE_TIMED)
            OK(ep_low_latency_combine(g, op == OP_COMBINE_LOGFMT ? c->combine_logfmt : c->combine, *h, l));
        break;
    case OP_FLOOR:
        if (phase == PHASE_TIMED)
            bad |= bench_gate_launch(n->gate_dev, 0, n->s) != cudaSuccess; /* an open gate: an empty kernel */
        break;
    default: /* the NCCL baselines */
        if (phase == PHASE_TIMED)
            bad |= nccl_exchange(n->comm, n->s, n->R, n->rank, n->T, op == OP_NCCL_DISPATCH ? n->fp8_row : n->bf16_row,
                                 n->per_rank, n->counts, n->nsend, n->nrecv) != ncclSuccess;
        break;
    }
#undef OK
    return bad;
}

/* The inputs of rank r at T tokens: bf16 rows and top-k routing of |randn| + 1 scores. */
static void draw_rank(int T, int H, int K, int E, int r, uint16_t *x, int64_t *idx, float *w) {
    epref_rng_t rng;
    epref_rng_seed(&rng, 5 + (uint64_t)T, (uint64_t)r);
    for (size_t i = 0; i < (size_t)T * H; i++)
        x[i] = epref_float_to_bf16(epref_rng_normal(&rng));
    epref_random_routing(&rng, T, K, E, 0.0f, idx, w);
}

static int worker(const bench_ll_args_t *a, int rank, const ep_unique_id_t *id, const ncclUniqueId *nid,
                  ll_rank_out_t *out) {
    const int R = a->ranks, H = a->hidden, K = a->topk, E = a->experts, L = E / R, Tmax = 256;
    cudaSetDevice(rank);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    cfg.num_nvl_bytes = ep_low_latency_buffer_bytes(R, Tmax, H, K, E);
    ep_group_t g = NULL;
    ncclComm_t comm;
    if (ep_group_create(id, R, rank, rank, &cfg, &g) != EP_SUCCESS ||
        ncclCommInitRank(&comm, R, *nid, rank) != ncclSuccess) {
        fprintf(stderr, "rank %d: setup: %s\n", rank, ep_last_error());
        return 1;
    }
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    const int64_t RT = (int64_t)R * Tmax;
    void *dx, *didx, *dw, *rx, *rs, *rc, *si, *lr, *dy, *dout, *nsend, *nrecv;
    cudaMalloc(&dx, (size_t)Tmax * H * 2);
    cudaMalloc(&didx, (size_t)Tmax * K * 8);
    cudaMalloc(&dw, (size_t)Tmax * K * 4);
    cudaMalloc(&rx, (size_t)L * RT * H);
    cudaMalloc(&rs, (size_t)L * (H / 128) * RT * 4);
    cudaMalloc(&rc, (size_t)L * 4);
    cudaMalloc(&si, (size_t)L * RT * 4);
    cudaMalloc(&lr, (size_t)L * R * 8);
    cudaMalloc(&dy, (size_t)L * RT * H * 2);
    cudaMalloc(&dout, (size_t)Tmax * H * 2);
    size_t row = (size_t)H + (size_t)H / 128 * 4;
    cudaMalloc(&nsend, (size_t)Tmax * R * 2 * H); /* room for bf16 rows too (the combine baseline) */
    cudaMalloc(&nrecv, (size_t)Tmax * R * 2 * H);
    /* Expert outputs below 1 in magnitude, as after an expert's down projection: LogFMT's log groups. */
    bench_fill_bf16((uint16_t *)dy, (size_t)L * RT * H, 7u, 0.5f, NULL);
    cudaDeviceSynchronize();
    double *t = malloc(sizeof(double) * LL_ITERS), *host = malloc(sizeof(double) * LL_ITERS);
    uint32_t *gate_host = NULL, *gate_dev = NULL, tickets = 0;
    cudaHostAlloc((void **)&gate_host, sizeof(uint32_t), cudaHostAllocMapped);
    *gate_host = 0;
    cudaHostGetDevicePointer((void **)&gate_dev, gate_host, 0);
    for (int ti = 0; ti < NUM_T; ti++) {
        int T = token_counts[ti], N = T;
        if (!row_wanted(T))
            continue;
        /* Every rank's inputs come from (seed, rank): draw all of them, so the NCCL baseline knows what each
         * peer sends; keep our own. */
        int32_t counts[8][8];
        uint16_t *x = malloc((size_t)N * H * 2);
        int64_t *idx = malloc((size_t)N * K * 8);
        float *w = malloc((size_t)N * K * 4);
        for (int r = 0; r < R; r++) {
            draw_rank(T, H, K, E, r, x, idx, w);
            epref_dispatch_layout(idx, N, K, R, E, counts[r], NULL, NULL);
        }
        draw_rank(T, H, K, E, rank, x, idx, w);
        int32_t *per_rank = counts[rank];
        double remote = 0;
        for (int d = 0; d < R; d++)
            remote += d == rank ? 0 : per_rank[d];
        /* Our combine returns one bf16 row per (token, k) whose expert lives elsewhere; the NCCL combine
         * baseline returns one bf16 row per (token, rank), i.e. the dispatch's rows in bf16. */
        double remote_pairs = 0;
        for (int i = 0; i < N * K; i++)
            remote_pairs += idx[i] >= 0 && idx[i] / L != rank;
        out->bytes[ti][OP_DISPATCH] = out->bytes[ti][OP_NCCL_DISPATCH] = remote * (double)row;
        out->bytes[ti][OP_COMBINE] = remote_pairs * 2.0 * H;
        out->bytes[ti][OP_NCCL_COMBINE] = remote * 2.0 * H;
        out->bytes[ti][OP_DISPATCH_SEND] = out->bytes[ti][OP_DISPATCH_RECV] = out->bytes[ti][OP_DISPATCH];
        out->bytes[ti][OP_COMBINE_SEND] = out->bytes[ti][OP_COMBINE_RECV] = out->bytes[ti][OP_COMBINE];
        out->bytes[ti][OP_COMBINE_LOGFMT] = remote_pairs * (H / 128) * (160.0 + 4.0); /* all log groups here */
        out->bytes[ti][OP_LOGFMT_SEND] = out->bytes[ti][OP_LOGFMT_RECV] = out->bytes[ti][OP_COMBINE_LOGFMT];
        /* per-rank sums: one bf16 row per (token, rank), and the weights (T * K floats to each peer) */
        out->bytes[ti][OP_COMBINE_PER_RANK] = remote * 2.0 * H + (double)(R - 1) * N * K * 4;
        out->bytes[ti][OP_PER_RANK_SEND] = out->bytes[ti][OP_COMBINE_PER_RANK];
        cudaMemcpy(dx, x, (size_t)N * H * 2, cudaMemcpyHostToDevice);
        cudaMemcpy(didx, idx, (size_t)N * K * 8, cudaMemcpyHostToDevice);
        cudaMemcpy(dw, w, (size_t)N * K * 4, cudaMemcpyHostToDevice);
        const int64_t RTt = (int64_t)R * T;
        ep_low_latency_dispatch_args_t da = EP_LOW_LATENCY_DISPATCH_ARGS_INIT;
        da.x = ep_tensor_2d(dx, EP_DTYPE_BFLOAT16, N, H);
        da.topk_idx = ep_tensor_2d(didx, EP_DTYPE_INT64, N, K);
        da.max_tokens = T, da.num_experts = E, da.use_fp8 = 1;
        da.recv_x = ep_tensor_3d(rx, EP_DTYPE_FLOAT8_E4M3, L, RTt, H);
        da.recv_x_scales = ep_tensor_3d(rs, EP_DTYPE_FLOAT32, L, H / 128, RTt);
        da.recv_count = ep_tensor_1d(rc, EP_DTYPE_INT32, L);
        da.src_info = ep_tensor_2d(si, EP_DTYPE_INT32, L, RTt);
        da.layout_range = ep_tensor_2d(lr, EP_DTYPE_INT64, L, R);
        ep_low_latency_combine_args_t ca = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
        ca.x = ep_tensor_3d(dy, EP_DTYPE_BFLOAT16, L, RTt, H);
        ca.topk_idx = da.topk_idx;
        ca.topk_weights = ep_tensor_2d(dw, EP_DTYPE_FLOAT32, N, K);
        ca.out = ep_tensor_2d(dout, EP_DTYPE_BFLOAT16, N, H);
        ep_launch_t l = EP_LAUNCH_INIT;
        l.stream = s;
        /* T changes the buffer's layout: clear it so no stale bytes can pass for a header. */
        if (ep_clean_low_latency_buffer(g, T, H, K, E, s) != EP_SUCCESS) {
            fprintf(stderr, "rank %d: clean: %s\n", rank, ep_last_error());
            out->failed = 1;
        }
        ep_low_latency_dispatch_args_t dh = da; /* the same dispatch, split by its hook */
        dh.return_recv_hook = 1;
        ep_low_latency_combine_args_t ch = ca;
        ch.return_recv_hook = 1;
        ep_low_latency_combine_args_t cl = ca;
        cl.use_logfmt = 1;
        ep_low_latency_combine_args_t clh = cl;
        clh.return_recv_hook = 1;
        const ll_calls_t calls = {g, &da, &dh, &ca, &ch, &cl, &clh, &l};
        const nccl_ctx_t nc = {comm, s, R, rank, T, row, 2 * (size_t)H, per_rank, counts, nsend, nrecv, gate_dev};
        for (int op = 0; op < NUM_OPS; op++) {
            if (per_rank_op(op)) /* this rank is a process of its own (bench_fork_ranks): no other thread reads it */
                setenv("EPCOMM_LL_COMBINE_PER_RANK", "1", 1);
            for (int i = 0; i < LL_WARMUP + LL_ITERS; i++) {
                ep_ll_handle_t h = NULL;
                int bad = run_phase(op, PHASE_BEFORE, &calls, &nc, &h);
                /* Hold the stream, align the ranks, then run the timed op with no host gap in front of it. */
                const uint32_t ticket = ++tickets;
                bad |= bench_gate_launch(gate_dev, ticket, s) != cudaSuccess;
                bad |= ep_group_barrier(g, s) != EP_SUCCESS;
                cudaEventRecord(e0, s);
                const double h0 = now_us();
                bad |= run_phase(op, PHASE_TIMED, &calls, &nc, &h);
                const double h1 = now_us();
                cudaEventRecord(e1, s);
                bad |= run_phase(op, PHASE_AFTER, &calls, &nc, &h);
                __atomic_store_n(gate_host, ticket, __ATOMIC_SEQ_CST);
                cudaEventSynchronize(e1);
                ep_ll_handle_destroy(h);
                float ms = 0;
                cudaEventElapsedTime(&ms, e0, e1);
                if (bad) {
                    fprintf(stderr, "rank %d: T=%d op %d: %s\n", rank, T, op, ep_last_error());
                    out->failed = 1;
                    break;
                }
                if (i >= LL_WARMUP) {
                    t[i - LL_WARMUP] = ms * 1e3;
                    host[i - LL_WARMUP] = h1 - h0;
                }
                cudaStreamSynchronize(s);
            }
            unsetenv("EPCOMM_LL_COMBINE_PER_RANK");
            stats(t, LL_ITERS, &out->med[ti][op], &out->p99[ti][op]);
            double unused;
            stats(host, LL_ITERS, &out->host[ti][op], &unused);
        }
        free(x), free(idx), free(w);
    }
    if (ep_group_synchronize(g, s) != EP_SUCCESS)
        out->failed = 1;
    ncclCommDestroy(comm);
    ep_group_destroy(g);
    cudaFreeHost(gate_host);
    free(t), free(host);
    return out->failed;
}

typedef struct {
    const bench_ll_args_t *a;
    const ep_unique_id_t *id;
    const ncclUniqueId *nid;
    ll_rank_out_t *out;
} ll_fork_ctx_t;

static int ll_rank_main(int rank, void *arg) {
    const ll_fork_ctx_t *f = arg;
    return worker(f->a, rank, f->id, f->nid, &f->out[rank]);
}

int bench_ll_run(const bench_ll_args_t *a) {
    ep_unique_id_t id;
    ncclUniqueId nid;
    if (a->ranks > 8 || ep_get_unique_id(&id) != EP_SUCCESS || ncclGetUniqueId(&nid) != ncclSuccess)
        return 1;
    ll_rank_out_t *sh =
        mmap(NULL, sizeof(ll_rank_out_t) * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    memset(sh, 0, sizeof(ll_rank_out_t) * 8);
    ll_fork_ctx_t fc = {a, &id, &nid, sh};
    int failed = bench_fork_ranks(a->ranks, ll_rank_main, &fc);
    if (!failed) {
        FILE *js = a->jsonl ? fopen(a->jsonl, "a") : NULL;
        char date[32];
        time_t now = time(NULL);
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
        printf("\nlow-latency, EP%d, H=%d, top-%d of %d experts, FP8 dispatch, BF16 combine (device time per call, "
               "ranks aligned by a device barrier and no host gap before the call: slowest rank's median and p99 of "
               "%d; host us: the call's own CPU time, median)\n",
               a->ranks, a->hidden, a->topk, a->experts, LL_ITERS);
        printf("| %-16s | %6s | %9s | %9s | %7s | %12s |\n", "op", "tokens", "median us", "p99 us", "host us",
               "remote MB");
        printf("|------------------|--------|-----------|-----------|---------|--------------|\n");
        for (int ti = 0; ti < NUM_T; ti++)
            for (int op = 0; op < NUM_OPS && row_wanted(token_counts[ti]); op++) {
                double med = 0, p99 = 0, host = 0, bytes = 0;
                for (int r = 0; r < a->ranks; r++) {
                    med = sh[r].med[ti][op] > med ? sh[r].med[ti][op] : med;
                    p99 = sh[r].p99[ti][op] > p99 ? sh[r].p99[ti][op] : p99;
                    host = sh[r].host[ti][op] > host ? sh[r].host[ti][op] : host;
                    bytes += sh[r].bytes[ti][op] / a->ranks;
                }
                printf("| %-16s | %6d | %9.1f | %9.1f | %7.1f | %12.2f |\n", op_names[op], token_counts[ti], med, p99,
                       host, bytes / 1e6);
                if (js)
                    fprintf(
                        js,
                        "{\"date\": \"%s\", \"commit\": \"%s\", \"machine\": \"%s\", \"gpu\": \"%s\", "
                        "\"mode\": \"ll\", \"op\": \"%s\", \"ep\": %d, \"tokens\": %d, \"hidden\": %d, \"topk\": %d, "
                        "\"experts\": %d, \"dtype\": \"%s\", \"sms\": 0, \"time_us\": %.2f, \"p99_us\": %.2f, "
                        "\"link_gbps\": %.2f, \"correct\": null}\n",
                        date, a->commit ? a->commit : "unknown", a->machine ? a->machine : "unknown",
                        a->gpu ? a->gpu : "unknown", op_names[op], a->ranks, token_counts[ti], a->hidden, a->topk,
                        a->experts,
                        op >= OP_COMBINE_LOGFMT && !per_rank_op(op)                    ? "logfmt"
                        : op == OP_COMBINE || op == OP_NCCL_COMBINE || per_rank_op(op) ? "bf16"
                                                                                       : "fp8",
                        med, p99, bytes / med / 1e3);
            }
        if (js)
            fclose(js);
    }
    munmap(sh, sizeof(ll_rank_out_t) * 8);
    return failed;
}
