/* Tensor descriptors: dtype facts and contiguous constructors. */
#include "epcomm.h"

#include <string.h>

size_t ep_dtype_size(ep_dtype_t dtype) {
    switch (dtype) {
    case EP_DTYPE_BFLOAT16: return 2;
    case EP_DTYPE_FLOAT8_E4M3: return 1;
    case EP_DTYPE_FLOAT32: return 4;
    case EP_DTYPE_INT32: return 4;
    case EP_DTYPE_INT64: return 8;
    case EP_DTYPE_BOOL: return 1;
    case EP_DTYPE_UINT8: return 1;
    }
    return 0;
}

const char *ep_dtype_name(ep_dtype_t dtype) {
    switch (dtype) {
    case EP_DTYPE_BFLOAT16: return "bfloat16";
    case EP_DTYPE_FLOAT8_E4M3: return "float8_e4m3fn";
    case EP_DTYPE_FLOAT32: return "float32";
    case EP_DTYPE_INT32: return "int32";
    case EP_DTYPE_INT64: return "int64";
    case EP_DTYPE_BOOL: return "bool";
    case EP_DTYPE_UINT8: return "uint8";
    }
    return "unknown";
}

static ep_tensor_t make_contiguous(void *data, ep_dtype_t dtype, int ndim, const int64_t *shape) {
    ep_tensor_t t;
    memset(&t, 0, sizeof(t));
    t.data = data;
    t.dtype = dtype;
    t.ndim = ndim;
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t.shape[i] = shape[i];
        t.strides[i] = stride;
        stride *= shape[i];
    }
    return t;
}

ep_tensor_t ep_tensor_1d(void *data, ep_dtype_t dtype, int64_t n0) {
    int64_t shape[1] = {n0};
    return make_contiguous(data, dtype, 1, shape);
}

ep_tensor_t ep_tensor_2d(void *data, ep_dtype_t dtype, int64_t n0, int64_t n1) {
    int64_t shape[2] = {n0, n1};
    return make_contiguous(data, dtype, 2, shape);
}

ep_tensor_t ep_tensor_3d(void *data, ep_dtype_t dtype, int64_t n0, int64_t n1, int64_t n2) {
    int64_t shape[3] = {n0, n1, n2};
    return make_contiguous(data, dtype, 3, shape);
}
