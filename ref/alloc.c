/* Allocation helpers: every array size goes through an overflow check, because the shapes come from the
 * caller (e.g. L * R * T * H for low-latency buffers) and a wrapped size would be silent truncation. */
#include "internal.h"

#include <stdlib.h>

int epref_mul3(size_t a, size_t b, size_t c, size_t *out) {
    if (b != 0 && a > SIZE_MAX / b)
        return 0;
    size_t ab = a * b;
    if (c != 0 && ab > SIZE_MAX / c)
        return 0;
    *out = ab * c;
    return 1;
}

void *epref_zalloc(size_t count, size_t elem_bytes) {
    size_t bytes;
    if (!epref_mul3(count, elem_bytes, 1, &bytes))
        return NULL;
    /* calloc(0) may return NULL, which would look like a failure. */
    return calloc(bytes ? bytes : 1, 1);
}
