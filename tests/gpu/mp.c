#define _POSIX_C_SOURCE 200809L
#include "mp.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
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

int mp_run(const char *case_name, int num_ranks, mp_rank_fn fn, void *arg, int timeout_s) {
    if (!selected(case_name)) {
        printf("SKIP %s R=%d (EPCOMM_TEST_ONLY)\n", case_name, num_ranks);
        return 0;
    }
    ep_unique_id_t id;
    if (ep_get_unique_id(&id) != EP_SUCCESS) {
        fprintf(stderr, "FAIL %s: ep_get_unique_id: %s\n", case_name, ep_last_error());
        return 1;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pids[64];
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
    int done[64] = {0};
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
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
    printf("%s %s R=%d (%.2f s)\n", failed ? "FAIL" : "PASS", case_name, num_ranks, now_s() - start);
    fflush(stdout);
    return failed;
}
