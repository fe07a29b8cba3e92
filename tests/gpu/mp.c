#define _GNU_SOURCE
#include "mp.h"

#include "green_split.h"

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MP_MAX_RANKS 64

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* EPCOMM_TEST_ONLY="a,b": run only the cases whose names contain one of these (for short reruns). */
static int selected(const char *case_name) {
    const char *only = getenv("EPCOMM_TEST_ONLY");
    if (only == NULL || *only == '\0')
        return 1;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", only);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
        if (strstr(case_name, tok))
            return 1;
    return 0;
}

int mp_arg_int(int argc, char **argv, const char *flag, int fallback) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], flag) == 0)
            return atoi(argv[i + 1]);
    return fallback;
}

int mp_experts(int experts, int num_ranks) {
    return num_ranks > 0 ? (experts + num_ranks - 1) / num_ranks * num_ranks : experts;
}

int mp_local(void) {
    const char *v = getenv("EPCOMM_TEST_LOCAL");
    return v != NULL && *v != '\0' && strcmp(v, "0") != 0;
}

/* ---- ranks as threads: devices and green contexts ---- */

static int num_devices = 1;
static CUcontext rank_ctx[MP_MAX_RANKS]; /* green context of each rank, NULL when its device is its own */
static int rank_ctx_for = 0;             /* the rank count rank_ctx was made for */

/* Once: eager module loading (lazy loading can stall one rank's launch behind another rank's running kernel),
 * the most hardware work queues, the device count, and memory pools that keep their memory (a release could
 * wait for the whole GPU). */
static int local_init(void) {
    static int state = 0; /* 1 ready, -1 failed */
    if (state != 0)
        return state > 0 ? 0 : -1;
    state = -1;
    setenv("CUDA_MODULE_LOADING", "EAGER", 1);
    /* Streams of every context share the device's work queues (CUDA 13.0 has no per-green-context ones): with
     * few, a rank's launch can queue behind another rank's kernel that waits for it. Take the most there are. */
    setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
    if (cuInit(0) != CUDA_SUCCESS || cudaGetDeviceCount(&num_devices) != cudaSuccess || num_devices < 1)
        return -1;
    for (int d = 0; d < num_devices; d++) {
        cudaMemPool_t pool;
        uint64_t keep = UINT64_MAX;
        cudaSetDevice(d);
        cudaFree(0);
        if (cudaDeviceGetDefaultMemPool(&pool, d) == cudaSuccess)
            cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    }
    state = 1;
    return 0;
}

int mp_device(int rank) {
    if (!mp_local())
        return rank;
    local_init();
    return rank % num_devices;
}

/* In thread mode, each rank thread's own stream for its buffers (created in the rank's context). */
static __thread cudaStream_t rank_stream;

void mp_enter_device(int rank) {
    if (mp_local() && rank_ctx[rank] != NULL)
        cuCtxSetCurrent(rank_ctx[rank]);
    else
        cudaSetDevice(mp_device(rank));
    if (mp_local() && rank_stream == NULL &&
        cudaStreamCreateWithFlags(&rank_stream, cudaStreamNonBlocking) != cudaSuccess)
        fprintf(stderr, "[rank %d] cudaStreamCreateWithFlags: %s\n", rank, cudaGetErrorString(cudaGetLastError()));
}

static void leave_device(void) {
    if (rank_stream != NULL)
        cudaStreamDestroy(rank_stream);
    rank_stream = NULL;
}

/* Thread mode allocates stream-ordered: a cudaFree waits for every kernel on the device, and a peer rank's
 * kernel may be waiting for this rank. */
int mp_malloc(void **ptr, size_t bytes) {
    cudaError_t err;
    if (!mp_local()) {
        err = cudaMalloc(ptr, bytes);
    } else {
        err = cudaMallocAsync(ptr, bytes ? bytes : 16, rank_stream);
        if (err == cudaSuccess)
            err = cudaStreamSynchronize(rank_stream);
    }
    if (err != cudaSuccess) {
        fprintf(stderr, "mp_malloc(%zu bytes): %s\n", bytes, cudaGetErrorString(err));
        *ptr = NULL;
        return -1;
    }
    return 0;
}

void mp_free(void *ptr) {
    if (ptr == NULL)
        return;
    if (!mp_local()) {
        cudaFree(ptr);
        return;
    }
    cudaFreeAsync(ptr, rank_stream);
    cudaStreamSynchronize(rank_stream);
}

/* Once per rank count: the green contexts of ranks that share a device. */
static int local_setup(int num_ranks) {
    if (local_init() != 0)
        return -1;
    if (rank_ctx_for == num_ranks)
        return 0;
    memset(rank_ctx, 0, sizeof(rank_ctx));
    int per_device = (num_ranks + num_devices - 1) / num_devices;
    for (int d = 0; per_device > 1 && d < num_devices; d++) {
        CUcontext ctx[MP_MAX_RANKS];
        unsigned each = 0;
        if (ep_test_green_split(d, per_device, ctx, &each) != 0) {
            fprintf(stderr, "could not split device %d into %d green contexts\n", d, per_device);
            return -1;
        }
        printf("     (ranks share device %d: %d green contexts of %u SMs each)\n", d, per_device, each);
        for (int r = d, i = 0; r < num_ranks; r += num_devices, i++)
            rank_ctx[r] = ctx[i];
    }
    rank_ctx_for = num_ranks;
    return 0;
}

typedef struct {
    mp_rank_fn fn;
    int rank, num_ranks;
    const ep_unique_id_t *id;
    void *arg;
    int rc;
    volatile int done;
} rank_thread_t;

static void *rank_thread(void *p) {
    rank_thread_t *t = p;
    mp_enter_device(t->rank);
    t->rc = t->fn(t->rank, t->num_ranks, t->id, t->arg) == 0 ? 0 : 1;
    leave_device();
    __atomic_store_n(&t->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static int run_threads(const char *case_name, int num_ranks, mp_rank_fn fn, void *arg, int timeout_s) {
    ep_unique_id_t id;
    if (local_setup(num_ranks) != 0 || ep_get_local_unique_id(&id) != EP_SUCCESS) {
        fprintf(stderr, "FAIL %s: in-process setup: %s\n", case_name, ep_last_error());
        return 1;
    }
    rank_thread_t t[MP_MAX_RANKS];
    pthread_t tid[MP_MAX_RANKS];
    for (int r = 0; r < num_ranks; r++) {
        t[r] = (rank_thread_t){fn, r, num_ranks, &id, arg, 0, 0};
        pthread_create(&tid[r], NULL, rank_thread, &t[r]);
    }
    double start = now_s();
    for (;;) {
        int remaining = 0;
        for (int r = 0; r < num_ranks; r++)
            remaining += !__atomic_load_n(&t[r].done, __ATOMIC_ACQUIRE);
        if (remaining == 0)
            break;
        if (now_s() - start > timeout_s) { /* threads cannot be killed: report and end the program */
            for (int r = 0; r < num_ranks; r++)
                if (!t[r].done)
                    fprintf(stderr, "%s: rank %d did not finish within %d s (hang)\n", case_name, r, timeout_s);
            printf("FAIL %s R=%d (hang; the program ends here)\n", case_name, num_ranks);
            fflush(stdout);
            fflush(stderr);
            _exit(2);
        }
        nap_ms(5);
    }
    int failed = 0;
    for (int r = 0; r < num_ranks; r++) {
        pthread_join(tid[r], NULL);
        if (t[r].rc != 0) {
            failed++;
            fprintf(stderr, "%s: rank %d failed\n", case_name, r);
        }
    }
    return failed;
}

/* ---- ranks as processes ---- */

static int run_processes(const char *case_name, int num_ranks, mp_rank_fn fn, void *arg, int timeout_s) {
    ep_unique_id_t id;
    if (ep_get_unique_id(&id) != EP_SUCCESS) {
        fprintf(stderr, "FAIL %s: ep_get_unique_id: %s\n", case_name, ep_last_error());
        return 1;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pids[MP_MAX_RANKS];
    for (int r = 0; r < num_ranks; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            int rc = fn(r, num_ranks, &id, arg) == 0 ? 0 : 1;
            fflush(stdout); /* _exit skips stdio's flush */
            fflush(stderr);
            _exit(rc);
        }
    }
    int failed = 0, remaining = num_ranks;
    int done[MP_MAX_RANKS] = {0};
    double start = now_s();
    while (remaining > 0) {
        for (int r = 0; r < num_ranks; r++) {
            int status = 0;
            if (done[r] || waitpid(pids[r], &status, WNOHANG) != pids[r])
                continue;
            done[r] = 1;
            remaining--;
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                failed++;
                fprintf(stderr, "%s: rank %d failed (%s %d)\n", case_name, r,
                        WIFSIGNALED(status) ? "signal" : "exit code",
                        WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
            }
        }
        if (remaining > 0 && now_s() - start > timeout_s) {
            for (int r = 0; r < num_ranks; r++) {
                if (!done[r]) {
                    fprintf(stderr, "%s: rank %d did not finish within %d s (hang): killed\n", case_name, r, timeout_s);
                    kill(pids[r], SIGKILL);
                    waitpid(pids[r], NULL, 0);
                    failed++;
                }
            }
            break;
        }
        nap_ms(5);
    }
    return failed;
}

/* A crash (in thread mode it ends every rank at once) prints where it happened before the process dies:
 * the signal, the thread and its stack (addresses: `addr2line -f -e <program> <offset>` names them). */
static void on_crash(int sig) {
    char head[96];
    int n = snprintf(head, sizeof(head), "\n*** signal %d in thread %ld; stack:\n", sig, (long)gettid());
    if (write(STDERR_FILENO, head, (size_t)n) < 0) { /* nothing else to do */
    }
    void *frames[48];
    backtrace_symbols_fd(frames, backtrace(frames, 48), STDERR_FILENO);
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Once: stdout line by line (a crash must not lose what the cases printed) and the crash report. */
static void harness_init(void) {
    static int done = 0;
    if (done)
        return;
    done = 1;
    void *warm[1];
    backtrace(warm, 1); /* loads what backtrace needs now, not inside the signal handler */
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGSEGV, on_crash);
    signal(SIGBUS, on_crash);
    signal(SIGABRT, on_crash);
    signal(SIGFPE, on_crash);
}

int mp_run(const char *case_name, int num_ranks, mp_rank_fn fn, void *arg, int timeout_s) {
    harness_init();
    if (!selected(case_name)) {
        printf("SKIP %s R=%d (EPCOMM_TEST_ONLY)\n", case_name, num_ranks);
        return 0;
    }
    if (num_ranks < 1 || num_ranks > MP_MAX_RANKS) {
        fprintf(stderr, "FAIL %s: %d ranks (1 to %d)\n", case_name, num_ranks, MP_MAX_RANKS);
        return 1;
    }
    double start = now_s();
    int failed = mp_local() ? run_threads(case_name, num_ranks, fn, arg, timeout_s)
                            : run_processes(case_name, num_ranks, fn, arg, timeout_s);
    printf("%s %s R=%d%s (%.2f s)\n", failed ? "FAIL" : "PASS", case_name, num_ranks, mp_local() ? " in-process" : "",
           now_s() - start);
    fflush(stdout);
    return failed;
}

int mp_check_timeout_message(int rank, int peer, const char *stage) {
    int failures = 0;
    char want[48];
    snprintf(want, sizeof(want), "waiting for rank %d", peer);
    if (!strstr(ep_last_error(), want) || !strstr(ep_last_error(), stage))
        MP_FAIL(rank, "timeout message: %s (wanted \"%s\" and \"%s\")", ep_last_error(), want, stage);
    if (rank == 0)
        printf("     rank 0 saw: %s\n", ep_last_error());
    return failures;
}
