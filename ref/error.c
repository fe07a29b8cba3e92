/* The per-thread message of the last failure. Thread-local so that R simulated ranks on R threads (as the
 * GPU tests run them) never overwrite each other's message. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

#define EPREF_MESSAGE_BYTES 512

static _Thread_local char last_message[EPREF_MESSAGE_BYTES];

const char *epref_last_error(void) {
    return last_message;
}

epref_status_t epref_fail(epref_status_t status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_message, sizeof(last_message), fmt, ap);
    va_end(ap);
    return status;
}
