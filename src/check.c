#include "check.h"

#include "error.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

void ep_format_shape(const int64_t *shape, int ndim, char *buf, size_t buf_bytes) {
    size_t used = 0;
    used += (size_t)snprintf(buf + used, buf_bytes - used, "[");
    for (int i = 0; i < ndim && used < buf_bytes; i++) {
        if (shape[i] == EP_ANY)
            used += (size_t)snprintf(buf + used, buf_bytes - used, "%s*", i ? ", " : "");
        else
            used += (size_t)snprintf(buf + used, buf_bytes - used, "%s%" PRId64, i ? ", " : "", shape[i]);
    }
    if (used < buf_bytes)
        snprintf(buf + used, buf_bytes - used, "]");
}

static ep_status_t check_dtype_and_rank(const ep_tensor_t *t, const ep_tensor_spec_t *spec) {
    if (ep_dtype_size(t->dtype) == 0)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: unknown dtype %d", spec->name, (int)t->dtype);
    if (t->dtype != spec->dtype)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected dtype %s, got %s", spec->name,
                       ep_dtype_name(spec->dtype), ep_dtype_name(t->dtype));
    if (t->ndim != spec->ndim)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected %d dimensions, got %d", spec->name, spec->ndim,
                       t->ndim);
    return EP_SUCCESS;
}

static ep_status_t check_shape(const ep_tensor_t *t, const ep_tensor_spec_t *spec) {
    int mismatch = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0)
            return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: dimension %d has negative extent %" PRId64, spec->name, i,
                           t->shape[i]);
        if (spec->shape[i] != EP_ANY && spec->shape[i] != t->shape[i])
            mismatch = 1;
    }
    if (mismatch) {
        char want[128], got[128];
        ep_format_shape(spec->shape, spec->ndim, want, sizeof(want));
        ep_format_shape(t->shape, t->ndim, got, sizeof(got));
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected shape %s, got %s", spec->name, want, got);
    }
    return EP_SUCCESS;
}

/* Row-major strides (a dimension of one element may have any stride: it is never used). */
static ep_status_t check_contiguous(const ep_tensor_t *t, const ep_tensor_spec_t *spec) {
    int64_t want[EP_MAX_DIMS], inner = 1;
    int ok = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        want[i] = inner;
        ok &= t->shape[i] <= 1 || t->strides[i] == inner;
        inner *= t->shape[i];
    }
    if (ok)
        return EP_SUCCESS;
    char w[128], g[128];
    ep_format_shape(want, t->ndim, w, sizeof(w));
    ep_format_shape(t->strides, t->ndim, g, sizeof(g));
    return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected a contiguous tensor (strides %s), got strides %s",
                   spec->name, w, g);
}

/* Strides must be non-negative and the highest address reachable must not overflow. */
static ep_status_t check_strides(const ep_tensor_t *t, const ep_tensor_spec_t *spec) {
    size_t elem = ep_dtype_size(t->dtype);
    uint64_t last = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] <= 1)
            continue; /* a stride over one element is never used */
        if (t->strides[i] < 0)
            return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: stride %d is negative (%" PRId64 ")", spec->name, i,
                           t->strides[i]);
        uint64_t span = (uint64_t)(t->shape[i] - 1);
        if (t->strides[i] != 0 && span > (UINT64_MAX / 2 - last) / (uint64_t)t->strides[i])
            return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: shape and strides overflow", spec->name);
        last += span * (uint64_t)t->strides[i];
    }
    if (spec->inner_contiguous == EP_CONTIGUOUS)
        EP_CHECK(check_contiguous(t, spec));
    if (spec->inner_contiguous && t->ndim > 0 && t->shape[t->ndim - 1] > 1 && t->strides[t->ndim - 1] != 1)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "%s: expected the last dimension to be contiguous (stride 1), "
                       "got stride %" PRId64,
                       spec->name, t->strides[t->ndim - 1]);
    if (spec->align_bytes > 1) {
        if ((uintptr_t)t->data % spec->align_bytes != 0)
            return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: data pointer %p is not %zu-byte aligned", spec->name,
                           t->data, spec->align_bytes);
        for (int i = 0; i + 1 < t->ndim; i++) {
            if (t->shape[i] > 1 && ((uint64_t)t->strides[i] * elem) % spec->align_bytes != 0)
                return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                               "%s: stride %d (%" PRId64 " elements = %" PRIu64
                               " bytes) is not a multiple of %zu bytes",
                               spec->name, i, t->strides[i], (uint64_t)t->strides[i] * elem, spec->align_bytes);
        }
    }
    return EP_SUCCESS;
}

static int tensor_is_empty(const ep_tensor_t *t) {
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0)
            return 1;
    return 0;
}

ep_status_t ep_check_tensor(const ep_tensor_t *t, const ep_tensor_spec_t *spec) {
    if (t == NULL)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected a tensor, got NULL", spec->name);
    if (t->ndim < 0 || t->ndim > EP_MAX_DIMS)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: ndim %d is outside [0, %d]", spec->name, t->ndim, EP_MAX_DIMS);
    EP_CHECK(check_dtype_and_rank(t, spec));
    EP_CHECK(check_shape(t, spec));
    if (t->data == NULL && !tensor_is_empty(t))
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: data pointer is NULL", spec->name);
    return check_strides(t, spec);
}

int ep_tensor_given(const ep_tensor_t *t) {
    return t->data != NULL || (t->ndim > 0 && t->ndim <= EP_MAX_DIMS && tensor_is_empty(t));
}

ep_status_t ep_check_optional_tensor(const ep_tensor_t *t, const ep_tensor_spec_t *spec) {
    if (t == NULL || !ep_tensor_given(t))
        return EP_SUCCESS;
    return ep_check_tensor(t, spec);
}

ep_status_t ep_check_same_extent(const ep_tensor_t *a, int dim_a, const char *name_a, const ep_tensor_t *b, int dim_b,
                                 const char *name_b) {
    if (a->shape[dim_a] != b->shape[dim_b])
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "%s: dimension %d is %" PRId64 ", expected %" PRId64 " to match %s dimension %d", name_a, dim_a,
                       a->shape[dim_a], b->shape[dim_b], name_b, dim_b);
    return EP_SUCCESS;
}

ep_status_t ep_check_not_null(const void *p, const char *name) {
    if (p == NULL)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected a non-NULL pointer", name);
    return EP_SUCCESS;
}

ep_status_t ep_check_range(int64_t value, int64_t lo, int64_t hi, const char *name) {
    if (value < lo || value > hi)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected a value in [%" PRId64 ", %" PRId64 "], got %" PRId64,
                       name, lo, hi, value);
    return EP_SUCCESS;
}

ep_status_t ep_check_multiple(int64_t value, int64_t multiple, const char *name) {
    if (multiple <= 0 || value % multiple != 0)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "%s: expected a multiple of %" PRId64 ", got %" PRId64, name,
                       multiple, value);
    return EP_SUCCESS;
}

ep_status_t ep_check_capacity(size_t have_bytes, size_t need_bytes, const char *what) {
    if (have_bytes < need_bytes)
        return ep_fail(EP_ERROR_BUFFER_TOO_SMALL, "%s: %zu bytes needed, %zu available", what, need_bytes, have_bytes);
    return EP_SUCCESS;
}

ep_status_t ep_check_struct_size(size_t given, size_t min_size, size_t max_size, const char *name) {
    if (given < min_size || given > max_size)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT,
                       "%s.size: expected sizeof(%s) (%zu), got %zu (initialise it with the _INIT macro)", name, name,
                       max_size, given);
    return EP_SUCCESS;
}
