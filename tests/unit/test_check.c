/* The shared argument checks: each bad input gets the right status and a message naming the argument,
 * the expected value and the value seen. */
#include "check.h"
#include "tcheck.h"

#include <stdint.h>

static char storage[1 << 16] __attribute__((aligned(64)));

static ep_tensor_spec_t x_spec(void) {
    ep_tensor_spec_t s = {"x", EP_DTYPE_BFLOAT16, 2, {16, 128}, 1, 16};
    return s;
}

static void accepts_a_matching_contiguous_tensor(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, 16, 128);
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_SUCCESS);
}

static void rejects_wrong_dtype_naming_both(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_FLOAT32, 16, 128);
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: expected dtype bfloat16, got float32");
}

static void rejects_wrong_rank(void) {
    ep_tensor_t t = ep_tensor_1d(storage, EP_DTYPE_BFLOAT16, 16);
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: expected 2 dimensions, got 1");
}

static void rejects_wrong_shape_printing_both_shapes(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, 16, 129);
    ep_tensor_spec_t s = x_spec();
    s.shape[0] = EP_ANY;
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: expected shape [*, 128], got [16, 129]");
}

static void accepts_padded_row_stride(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, 16, 128);
    t.strides[0] = 256; /* rows 512 bytes apart: a multiple of 16 */
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_SUCCESS);
}

static void rejects_unaligned_row_stride(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, 16, 128);
    t.strides[0] = 130; /* 260 bytes */
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: stride 0 (130 elements = 260 bytes) is not a multiple of 16 bytes");
}

static void rejects_unaligned_pointer(void) {
    ep_tensor_t t = ep_tensor_2d(storage + 2, EP_DTYPE_BFLOAT16, 16, 128);
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "is not 16-byte aligned");
}

static void rejects_non_contiguous_inner_dim(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, 16, 128);
    t.strides[1] = 2;
    t.strides[0] = 256;
    ep_tensor_spec_t s = x_spec();
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: expected the last dimension to be contiguous (stride 1), got stride 2");
}

static void rejects_negative_stride_and_extent(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, 16, 128);
    t.strides[0] = -128;
    ep_tensor_spec_t s = x_spec();
    s.align_bytes = 0;
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: stride 0 is negative (-128)");
    t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, -1, 128);
    s.shape[0] = EP_ANY;
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: dimension 0 has negative extent -1");
}

static void rejects_overflowing_strides(void) {
    ep_tensor_t t = ep_tensor_2d(storage, EP_DTYPE_BFLOAT16, INT64_C(1) << 40, 128);
    t.strides[0] = INT64_C(1) << 40;
    ep_tensor_spec_t s = x_spec();
    s.shape[0] = EP_ANY;
    s.align_bytes = 0;
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: shape and strides overflow");
}

static void null_data_is_allowed_only_when_empty(void) {
    ep_tensor_spec_t s = x_spec();
    s.shape[0] = EP_ANY;
    ep_tensor_t t = ep_tensor_2d(NULL, EP_DTYPE_BFLOAT16, 0, 128);
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_SUCCESS);
    t = ep_tensor_2d(NULL, EP_DTYPE_BFLOAT16, 4, 128);
    TCHECK_EQ_INT(ep_check_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: data pointer is NULL");
    TCHECK_EQ_INT(ep_check_tensor(NULL, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "x: expected a tensor, got NULL");
}

static void optional_tensor_may_be_absent(void) {
    ep_tensor_spec_t s = {"topk_weights", EP_DTYPE_FLOAT32, 2, {16, 8}, 1, 0};
    TCHECK_EQ_INT(ep_check_optional_tensor(NULL, &s), EP_SUCCESS);
    ep_tensor_t t = ep_tensor_2d(NULL, EP_DTYPE_FLOAT32, 16, 8);
    TCHECK_EQ_INT(ep_check_optional_tensor(&t, &s), EP_SUCCESS);
    t = ep_tensor_2d(storage, EP_DTYPE_FLOAT32, 16, 9);
    TCHECK_EQ_INT(ep_check_optional_tensor(&t, &s), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "topk_weights: expected shape [16, 8], got [16, 9]");
}

static void same_extent_names_both_tensors(void) {
    ep_tensor_t a = ep_tensor_2d(storage, EP_DTYPE_FLOAT32, 16, 8);
    ep_tensor_t b = ep_tensor_2d(storage, EP_DTYPE_INT64, 15, 8);
    TCHECK_EQ_INT(ep_check_same_extent(&a, 0, "topk_weights", &b, 0, "topk_idx"), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "topk_weights: dimension 0 is 16, expected 15 to match topk_idx dimension 0");
    TCHECK_EQ_INT(ep_check_same_extent(&a, 1, "topk_weights", &b, 1, "topk_idx"), EP_SUCCESS);
}

static void scalar_checks_name_argument_and_bounds(void) {
    TCHECK_EQ_INT(ep_check_range(33, 1, 32, "num_topk"), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "num_topk: expected a value in [1, 32], got 33");
    TCHECK_EQ_INT(ep_check_range(32, 1, 32, "num_topk"), EP_SUCCESS);
    TCHECK_EQ_INT(ep_check_multiple(7000, 128, "hidden"), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "hidden: expected a multiple of 128, got 7000");
    TCHECK_EQ_INT(ep_check_multiple(7168, 128, "hidden"), EP_SUCCESS);
    TCHECK_EQ_INT(ep_check_not_null(NULL, "group"), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "group: expected a non-NULL pointer");
}

static void capacity_check_gives_size_needed(void) {
    TCHECK_EQ_INT(ep_check_capacity(1000, 4096, "NVLink buffer"), EP_ERROR_BUFFER_TOO_SMALL);
    TCHECK_STR_CONTAINS(ep_last_error(), "NVLink buffer: 4096 bytes needed, 1000 available");
    TCHECK_EQ_INT(ep_check_capacity(4096, 4096, "NVLink buffer"), EP_SUCCESS);
}

static void struct_size_must_be_initialised(void) {
    TCHECK_EQ_INT(ep_check_struct_size(0, 48, 48, "ep_group_config_t"), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "ep_group_config_t.size: expected sizeof(ep_group_config_t) (48), got 0");
    TCHECK_EQ_INT(ep_check_struct_size(48, 48, 48, "ep_group_config_t"), EP_SUCCESS);
}

int main(void) {
    TRUN(accepts_a_matching_contiguous_tensor);
    TRUN(rejects_wrong_dtype_naming_both);
    TRUN(rejects_wrong_rank);
    TRUN(rejects_wrong_shape_printing_both_shapes);
    TRUN(accepts_padded_row_stride);
    TRUN(rejects_unaligned_row_stride);
    TRUN(rejects_unaligned_pointer);
    TRUN(rejects_non_contiguous_inner_dim);
    TRUN(rejects_negative_stride_and_extent);
    TRUN(rejects_overflowing_strides);
    TRUN(null_data_is_allowed_only_when_empty);
    TRUN(optional_tensor_may_be_absent);
    TRUN(same_extent_names_both_tensors);
    TRUN(scalar_checks_name_argument_and_bounds);
    TRUN(capacity_check_gives_size_needed);
    TRUN(struct_size_must_be_initialised);
    return TDONE();
}
