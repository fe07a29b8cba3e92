/* Argument checks shared by every entry point. Each check returns EP_SUCCESS or a status with a message
 * that names the argument, the expected value and the value seen, e.g.
 *   "x: expected dtype bfloat16, got float32"
 *   "topk_idx: expected shape [4096, 8], got [4096, 9]"
 * A failed check has no side effects, so entry points check everything before they launch anything. */
#ifndef EP_CHECK_H
#define EP_CHECK_H

#include "epcomm.h"

#include <stddef.h>
#include <stdint.h>

#define EP_ANY        (-1)
#define EP_CONTIGUOUS 2

typedef struct {
    const char *name; /* the argument's name in messages */
    ep_dtype_t dtype;
    int ndim;
    int64_t shape[EP_MAX_DIMS]; /* EP_ANY for a free extent */
    int inner_contiguous;       /* 1: the last dimension must have stride 1; EP_CONTIGUOUS: every dimension
                                   row-major contiguous (outputs a kernel writes without strides) */
    size_t align_bytes;         /* data pointer and every outer stride (in bytes) multiple of this; 0: none */
} ep_tensor_spec_t;

ep_status_t ep_check_tensor(const ep_tensor_t *t, const ep_tensor_spec_t *spec);
/* Whether an optional tensor is given: data not NULL, or no elements (an empty tensor's data may be NULL). */
int ep_tensor_given(const ep_tensor_t *t);
/* Like ep_check_tensor, but a tensor not given (NULL, or ep_tensor_given false) passes. */
ep_status_t ep_check_optional_tensor(const ep_tensor_t *t, const ep_tensor_spec_t *spec);
/* Checks that two tensors agree on a dimension (e.g. topk_weights and topk_idx rows). */
ep_status_t ep_check_same_extent(const ep_tensor_t *a, int dim_a, const char *name_a, const ep_tensor_t *b, int dim_b,
                                 const char *name_b);

ep_status_t ep_check_not_null(const void *p, const char *name);
ep_status_t ep_check_range(int64_t value, int64_t lo, int64_t hi, const char *name); /* lo <= v <= hi */
ep_status_t ep_check_multiple(int64_t value, int64_t multiple, const char *name);
/* EP_ERROR_BUFFER_TOO_SMALL naming what and the bytes needed. */
ep_status_t ep_check_capacity(size_t have_bytes, size_t need_bytes, const char *what);
/* The struct's `size` field: a caller built against an older header passes a smaller size (accepted as
 * long as it covers the fields this call reads); an unset or absurd size is an error. */
ep_status_t ep_check_struct_size(size_t given, size_t min_size, size_t max_size, const char *name);

/* Writes "[a, b, c]" into buf. */
void ep_format_shape(const int64_t *shape, int ndim, char *buf, size_t buf_bytes);

#endif
