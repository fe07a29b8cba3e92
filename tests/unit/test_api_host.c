/* The public API's host side, without a GPU: status strings, dtype facts, tensor constructors, and bad
 * arguments to group functions (rejected before any CUDA or NCCL call). */
#include "epcomm.h"
#include "tcheck.h"

#include <stdlib.h>

static void every_status_has_a_named_string(void) {
    for (int s = EP_SUCCESS; s <= EP_ERROR_INTERNAL; s++) {
        const char *str = ep_status_string((ep_status_t)s);
        TCHECK(str != NULL && strncmp(str, "EP_", 3) == 0, "status %d: %s", s, str ? str : "(null)");
    }
    TCHECK_STR_CONTAINS(ep_status_string(EP_ERROR_TIMEOUT), "EP_ERROR_TIMEOUT");
    TCHECK_STR_CONTAINS(ep_status_string((ep_status_t)999), "UNKNOWN");
}

static void dtype_sizes_and_names(void) {
    TCHECK_EQ_INT(ep_dtype_size(EP_DTYPE_BFLOAT16), 2);
    TCHECK_EQ_INT(ep_dtype_size(EP_DTYPE_FLOAT8_E4M3), 1);
    TCHECK_EQ_INT(ep_dtype_size(EP_DTYPE_FLOAT32), 4);
    TCHECK_EQ_INT(ep_dtype_size(EP_DTYPE_INT64), 8);
    TCHECK_EQ_INT(ep_dtype_size((ep_dtype_t)77), 0);
    TCHECK_STR_CONTAINS(ep_dtype_name(EP_DTYPE_FLOAT8_E4M3), "float8_e4m3fn");
    TCHECK_STR_CONTAINS(ep_dtype_name((ep_dtype_t)77), "unknown");
}

static void tensor_constructors_are_row_major(void) {
    ep_tensor_t t = ep_tensor_3d(NULL, EP_DTYPE_BFLOAT16, 4, 5, 6);
    TCHECK_EQ_INT(t.ndim, 3);
    TCHECK_EQ_INT(t.strides[0], 30);
    TCHECK_EQ_INT(t.strides[1], 6);
    TCHECK_EQ_INT(t.strides[2], 1);
    TCHECK_EQ_INT(t.shape[1], 5);
}

static void group_create_rejects_bad_arguments_without_side_effects(void) {
    ep_unique_id_t id;
    memset(&id, 0, sizeof(id));
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    ep_group_t g = (ep_group_t)(void *)&cfg; /* must stay untouched on argument errors */
    ep_group_t before = g;

    TCHECK_EQ_INT(ep_group_create(&id, 0, 0, 0, &cfg, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "num_ranks: expected a value in [1,");
    TCHECK_EQ_INT(ep_group_create(&id, 9, 0, 0, &cfg, &g), EP_ERROR_UNSUPPORTED); /* before NCCL is entered */
    TCHECK_STR_CONTAINS(ep_last_error(), "num_ranks: at most 8 ranks in one NVLink domain are supported, got 9");
    TCHECK_EQ_INT(ep_group_create(&id, 4, 4, 0, &cfg, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank: expected a value in [0, 3], got 4");
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, -1, &cfg, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "cuda_device: expected a value in [0,");
    TCHECK_EQ_INT(ep_group_create(NULL, 4, 0, 0, &cfg, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "id: expected a non-NULL pointer");
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, NULL, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "config: expected a non-NULL pointer");
    TCHECK(g == before, "group pointer changed on an argument error");

    ep_group_config_t bad = cfg;
    bad.size = 0;
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, &bad, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "ep_group_config_t.size");
    bad = cfg;
    bad.num_rdma_bytes = 1 << 20;
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, &bad, &g), EP_ERROR_UNSUPPORTED);
    TCHECK_STR_CONTAINS(ep_last_error(), "config.num_rdma_bytes");
    /* A caller built against 0.1 (no comm_stream) passes the size check: the next check speaks. */
    bad.size = offsetof(ep_group_config_t, comm_stream);
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, &bad, &g), EP_ERROR_UNSUPPORTED);
    TCHECK_STR_CONTAINS(ep_last_error(), "config.num_rdma_bytes");
    bad.size = sizeof(ep_group_config_t) + 8; /* a newer caller's struct is refused, not misread */
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, &bad, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "ep_group_config_t.size");
    bad = cfg;
    bad.timeout_ms = -5;
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, &bad, &g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "config.timeout_ms");
    TCHECK_EQ_INT(ep_group_create(&id, 4, 0, 0, &cfg, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "group: expected a non-NULL pointer");
}

static void group_accessors_reject_null(void) {
    int v = 0;
    void *p = NULL;
    size_t n = 0;
    TCHECK_EQ_INT(ep_group_rank(NULL, &v), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "group: expected a non-NULL pointer");
    TCHECK_EQ_INT(ep_group_size(NULL, &v), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_group_stream(NULL, &p), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_group_local_buffer(NULL, &p, &n), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_group_barrier(NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_group_synchronize(NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_group_get_async_error(NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_group_destroy(NULL), EP_SUCCESS);
}

static void operations_reject_null_without_side_effects(void) {
    ep_dispatch_args_t da = EP_DISPATCH_ARGS_INIT;
    ep_dispatch_result_t dr = EP_DISPATCH_RESULT_INIT;
    ep_combine_args_t ca = EP_COMBINE_ARGS_INIT;
    ep_low_latency_dispatch_args_t lda = EP_LOW_LATENCY_DISPATCH_ARGS_INIT;
    ep_low_latency_combine_args_t lca = EP_LOW_LATENCY_COMBINE_ARGS_INIT;
    ep_ll_handle_t lh = NULL;
    int best = -1, candidates[1] = {8};
    TCHECK_EQ_INT(ep_dispatch(NULL, &da, &dr, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "group: expected a non-NULL pointer");
    TCHECK_EQ_INT(ep_combine(NULL, &ca, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_get_dispatch_layout(NULL, NULL, 8, NULL, NULL, NULL, NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_autotune_normal(NULL, &da, candidates, 1, &best, NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(best, -1);
    TCHECK_EQ_INT(ep_low_latency_dispatch(NULL, &lda, &lh, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK(lh == NULL, "handle set on an argument error");
    TCHECK_EQ_INT(ep_low_latency_combine(NULL, &lca, NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_low_latency_dispatch_hook(NULL, NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_low_latency_combine_hook(NULL, NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_clean_low_latency_buffer(NULL, 128, 7168, 8, 256, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_handle_info(NULL, NULL, NULL, NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_handle_destroy(NULL), EP_SUCCESS);
    TCHECK_EQ_INT(ep_ll_handle_destroy(NULL), EP_SUCCESS);
}

static void unique_id_needs_no_gpu(void) {
    ep_unique_id_t a, b;
    TCHECK_EQ_INT(ep_get_unique_id(NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_EQ_INT(ep_get_unique_id(&a), EP_SUCCESS);
    TCHECK_EQ_INT(ep_get_unique_id(&b), EP_SUCCESS);
    TCHECK(memcmp(&a, &b, sizeof(a)) != 0, "two unique ids are equal");
    TCHECK_EQ_INT(ep_get_local_unique_id(NULL), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "id: expected a non-NULL pointer");
    TCHECK_EQ_INT(ep_get_local_unique_id(&a), EP_SUCCESS);
    TCHECK_EQ_INT(ep_get_local_unique_id(&b), EP_SUCCESS);
    TCHECK(memcmp(&a, &b, sizeof(a)) != 0, "two in-process ids are equal");
}

/* Without a GPU (CI), creation must fail cleanly with a message, not crash. With one it would block
 * waiting for the other 3 ranks, so this case only runs where no device is visible. */
static void group_create_without_gpu_fails_cleanly(void) {
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    if (visible == NULL || strcmp(visible, "") != 0) {
        printf("     (skipped: set CUDA_VISIBLE_DEVICES= to run)\n");
        return;
    }
    ep_unique_id_t id;
    TCHECK_EQ_INT(ep_get_unique_id(&id), EP_SUCCESS);
    ep_group_config_t cfg = EP_GROUP_CONFIG_INIT;
    ep_group_t g = NULL;
    ep_status_t st = ep_group_create(&id, 4, 0, 0, &cfg, &g);
    TCHECK(st != EP_SUCCESS, "group creation succeeded without a GPU");
    TCHECK(g == NULL, "group set on failure");
    TCHECK(strlen(ep_last_error()) > 0, "no message");
    printf("     message: %s\n", ep_last_error());
    /* An in-process group fails the same way, and a retry is not refused as a second join of the rank. */
    TCHECK_EQ_INT(ep_get_local_unique_id(&id), EP_SUCCESS);
    for (int attempt = 0; attempt < 2; attempt++) {
        st = ep_group_create(&id, 2, 0, 0, &cfg, &g);
        TCHECK(st != EP_SUCCESS && g == NULL, "in-process creation without a GPU: status %d", (int)st);
        TCHECK(strstr(ep_last_error(), "already joined") == NULL, "the failed rank stayed joined: %s", ep_last_error());
    }
    printf("     in-process message: %s\n", ep_last_error());
}

int main(void) {
    TRUN(every_status_has_a_named_string);
    TRUN(dtype_sizes_and_names);
    TRUN(tensor_constructors_are_row_major);
    TRUN(group_create_rejects_bad_arguments_without_side_effects);
    TRUN(group_accessors_reject_null);
    TRUN(operations_reject_null_without_side_effects);
    TRUN(unique_id_needs_no_gpu);
    TRUN(group_create_without_gpu_fails_cleanly);
    return TDONE();
}
