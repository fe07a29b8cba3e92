#define _POSIX_C_SOURCE 200809L
#include "fork_ranks.h"

#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_RANKS 64

int bench_fork_ranks(int num_ranks, int (*fn)(int rank, void *ctx), void *ctx) {
    if (num_ranks < 1 || num_ranks > MAX_RANKS)
        return 1;
    fflush(stdout);
    pid_t pids[MAX_RANKS];
    for (int r = 0; r < num_ranks; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            int rc = fn(r, ctx);
            fflush(stdout); /* _exit skips stdio's flush */
            _exit(rc);
        }
    }
    int failed = 0;
    for (int r = 0; r < num_ranks; r++) {
        int status = 0;
        failed |=
            pids[r] < 0 || waitpid(pids[r], &status, 0) != pids[r] || !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    }
    return failed;
}
