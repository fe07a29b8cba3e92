#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

void ep_log(ep_log_level_t level, int rank, int device, const char *fmt, ...) {
    if (ep_env_log_level() < level)
        return;
    static const char *names[] = {"NONE", "WARN", "INFO", "TRACE"};
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "[epcomm pid %d rank %d dev %d] %s %s\n", (int)getpid(), rank, device, names[level], line);
}
