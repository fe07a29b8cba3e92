/* Group creation: the NCCL communicator, the symmetric window, peer pointers, a stream and mapped memory.
 *
 * The communicator is non-blocking so that every collective step can time out: a rank that never arrives
 * makes creation fail with EP_ERROR_TIMEOUT instead of hanging. An in-process group (ranks are threads of this
 * process, see ep_get_local_unique_id) has no communicator: its ranks meet in local_world.c and map each other's
 * plain device allocations. */
#define _POSIX_C_SOURCE 200809L
#include "check.h"
#include "error.h"
#include "group.h"
#include "kernels/group_kernels.h"
#include "kernels/nccl_glue.h"
#include "local_world.h"
#include "log.h"

#include <cuda.h>

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t align_up(size_t v, size_t a) {
    return (v + a - 1) / a * a;
}

size_t ep_group_window_bytes(const ep_group_config_t *config) {
    return EP_CTRL_BYTES + align_up(config->num_nvl_bytes, EP_WINDOW_ALIGN);
}

static ep_status_t check_config(const ep_group_config_t *config) {
    EP_CHECK(ep_check_not_null(config, "config"));
    EP_CHECK(ep_check_struct_size(config->size, offsetof(ep_group_config_t, comm_stream), sizeof(ep_group_config_t),
                                  "ep_group_config_t"));
    EP_CHECK(ep_check_range(config->num_sms, 0, 1024, "config.num_sms"));
    EP_CHECK(ep_check_range(config->timeout_ms, 0, INT64_C(1) << 40, "config.timeout_ms"));
    if (config->num_rdma_bytes != 0)
        return ep_fail(EP_ERROR_UNSUPPORTED,
                       "config.num_rdma_bytes: scale-out buffers are not supported yet, expected 0, got %zu",
                       config->num_rdma_bytes);
    return EP_SUCCESS;
}

static ep_status_t check_nccl_version(void) {
    int version = 0;
    EP_NCCL_CHECK(ncclGetVersion(&version));
    if (version != NCCL_VERSION_CODE)
        return ep_fail(EP_ERROR_VERSION_MISMATCH,
                       "the NCCL library loaded is version %d but epcomm was built with headers of version %d; "
                       "kernels inline NCCL's device structures, so both must match (set LD_LIBRARY_PATH or "
                       "rebuild with NCCL_HOME)",
                       version, NCCL_VERSION_CODE);
    return EP_SUCCESS;
}

/* When `device` is already current nothing is switched: cudaSetDevice would replace the current context with the
 * device's primary one, and the caller's may be a green context (e.g. one of several ranks on one GPU). */
ep_status_t ep_device_enter(int device, int *previous) {
    int current;
    EP_CUDA_CHECK(cudaGetDevice(&current));
    *previous = -1;
    if (current != device) {
        EP_CUDA_CHECK(cudaSetDevice(device));
        *previous = current;
    }
    return EP_SUCCESS;
}

void ep_device_restore(int previous) {
    if (previous >= 0)
        cudaSetDevice(previous);
}

static ep_group_t group_alloc(const ep_group_config_t *config, int rank, int num_ranks, int device, ncclComm_t comm) {
    ep_group_t g = calloc(1, sizeof(*g));
    if (g == NULL)
        return NULL;
    g->rank = rank;
    g->num_ranks = num_ranks;
    g->device = device;
    g->comm = comm;
    g->owns_comm = comm == NULL;              /* ep_group_create makes its own */
    memcpy(&g->config, config, config->size); /* fields past an older caller's size stay zero */
    g->config.size = sizeof(g->config);
    g->timeout_ms = config->timeout_ms > 0 ? config->timeout_ms : ep_env_timeout_ms();
    g->config.timeout_ms = g->timeout_ms;
    return g;
}

/* Every rank must reach every other by load/store (NVLink or P2P); NCCL's LSA team says who we reach. */
static ep_status_t check_peers_reachable_nccl(ep_group_t g) {
    int reach[256];
    int n = ep_nccl_lsa_world_ranks(g->comm, reach, 256);
    if (n == g->num_ranks)
        return EP_SUCCESS;
    char missing[512] = "";
    size_t used = 0;
    for (int r = 0; r < g->num_ranks && used + 16 < sizeof(missing); r++) {
        int found = 0;
        for (int i = 0; i < n && i < 256; i++)
            found |= reach[i] == r;
        if (!found)
            used += (size_t)snprintf(missing + used, sizeof(missing) - used, "%s%d", used ? ", " : "", r);
    }
    return ep_fail(EP_ERROR_PEER_UNREACHABLE,
                   "rank %d (CUDA device %d) cannot reach rank(s) %s by NVLink/P2P load-store (it reaches %d of "
                   "%d ranks); epcomm needs peer access between all ranks of a node, and scale-out is not "
                   "supported yet",
                   g->rank, g->device, missing, n, g->num_ranks);
}

/* In-process: ranks on the same device share memory; others need peer access, enabled here. */
static ep_status_t check_peers_reachable_local(ep_group_t g) {
    int32_t devices[EP_MAX_NVL_RANKS];
    int32_t mine = g->device;
    EP_CHECK(ep_group_allgather(g, &mine, sizeof(mine), devices, "device exchange"));
    for (int r = 0; r < g->num_ranks; r++) {
        if (devices[r] == g->device)
            continue;
        int can = 0;
        EP_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, g->device, devices[r]));
        if (!can)
            return ep_fail(EP_ERROR_PEER_UNREACHABLE,
                           "rank %d (CUDA device %d) cannot reach rank %d (CUDA device %d) by peer load-store", g->rank,
                           g->device, r, (int)devices[r]);
        cudaError_t err = cudaDeviceEnablePeerAccess(devices[r], 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled)
            (void)cudaGetLastError();
        else if (err != cudaSuccess)
            return ep_cuda_fail(err, "cudaDeviceEnablePeerAccess", __FILE__, __LINE__);
    }
    return EP_SUCCESS;
}

static ep_status_t check_peers_reachable(ep_group_t g) {
    return g->local ? check_peers_reachable_local(g) : check_peers_reachable_nccl(g);
}

/* The settings every rank must agree on; exchanged at creation so a mismatch is an error, not a hang. */
typedef struct {
    uint64_t num_nvl_bytes;
    uint64_t num_rdma_bytes;
    int32_t low_latency_mode;
    int32_t version;
} config_fingerprint_t;

static ep_status_t check_same_config(ep_group_t g) {
    config_fingerprint_t mine = {g->config.num_nvl_bytes, g->config.num_rdma_bytes, g->config.low_latency_mode,
                                 EP_VERSION_CODE};
    config_fingerprint_t *all = calloc((size_t)g->num_ranks, sizeof(*all));
    if (all == NULL)
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "config exchange: out of host memory");
    ep_status_t st = ep_group_allgather(g, &mine, sizeof(mine), all, "config exchange");
    for (int r = 0; st == EP_SUCCESS && r < g->num_ranks; r++) {
        const config_fingerprint_t *o = &all[r];
        if (o->version != mine.version)
            st = ep_fail(EP_ERROR_INVALID_ARGUMENT, "epcomm version: rank %d runs %d, rank %d runs %d", r,
                         (int)o->version, g->rank, (int)mine.version);
        else if (o->num_nvl_bytes != mine.num_nvl_bytes)
            st = ep_fail(EP_ERROR_INVALID_ARGUMENT,
                         "config.num_nvl_bytes: every rank must pass the same value; rank %d passed %llu, rank %d "
                         "passed %llu",
                         r, (unsigned long long)o->num_nvl_bytes, g->rank, (unsigned long long)mine.num_nvl_bytes);
        else if (o->low_latency_mode != mine.low_latency_mode)
            st = ep_fail(EP_ERROR_INVALID_ARGUMENT,
                         "config.low_latency_mode: every rank must pass the same value; rank %d passed %d, rank %d "
                         "passed %d",
                         r, (int)o->low_latency_mode, g->rank, (int)mine.low_latency_mode);
    }
    free(all);
    return st;
}

/* In-process: a plain allocation on this rank's device; ranks trade its address. */
static ep_status_t create_window_local(ep_group_t g) {
    EP_CUDA_CHECK(cudaMalloc(&g->window_mem, g->window_bytes));
    EP_CUDA_CHECK(cudaMemsetAsync(g->window_mem, 0, g->window_bytes, g->stream));
    EP_CHECK(ep_group_wait_stream(g, g->stream, "window setup"));
    uint64_t mine = (uint64_t)(uintptr_t)g->window_mem, all[EP_MAX_NVL_RANKS];
    EP_CHECK(ep_group_allgather(g, &mine, sizeof(mine), all, "window exchange"));
    for (int r = 0; r < g->num_ranks; r++)
        g->dev.window[r] = (char *)(uintptr_t)all[r];
    return EP_SUCCESS;
}

static ep_status_t create_window(ep_group_t g) {
    g->window_bytes = ep_group_window_bytes(&g->config);
    if (g->local)
        return create_window_local(g);
    EP_NCCL_CHECK(ncclMemAlloc(&g->window_mem, g->window_bytes));
    EP_CHECK(ep_nccl_complete(
        g->comm, ncclCommWindowRegister(g->comm, g->window_mem, g->window_bytes, &g->window, NCCL_WIN_COLL_SYMMETRIC),
        g->timeout_ms, "ncclCommWindowRegister"));
    /* Flags and low-latency headers must start at zero; ncclMemAlloc does not promise that. */
    EP_CUDA_CHECK(cudaMemsetAsync(g->window_mem, 0, g->window_bytes, g->stream));
    EP_CUDA_CHECK(cudaMalloc((void **)&g->window_bases_dev, sizeof(char *) * EP_MAX_NVL_RANKS));
    EP_CUDA_CHECK(ep_launch_fetch_window_bases(g->window, g->num_ranks, g->window_bases_dev, g->stream));
    EP_CUDA_CHECK(cudaMemcpyAsync(g->dev.window, g->window_bases_dev, sizeof(char *) * (size_t)g->num_ranks,
                                  cudaMemcpyDeviceToHost, g->stream));
    return ep_group_wait_stream(g, g->stream, "window setup");
}

/* SMs the current context may use: a green context's share of the device, else the whole device. The driver
 * call is looked up at run time (no link to libcuda); drivers without it count the whole device. */
static ep_status_t context_sm_count(int device, int *sms) {
    typedef CUresult (*get_current_fn)(CUcontext *);
    typedef CUresult (*get_resource_fn)(CUcontext, CUdevResource *, CUdevResourceType);
    void *get_current = NULL, *get_resource = NULL;
    enum cudaDriverEntryPointQueryResult q1, q2;
    CUcontext ctx = NULL;
    CUdevResource res;
    if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &get_current, 12040, cudaEnableDefault, &q1) ==
            cudaSuccess &&
        cudaGetDriverEntryPointByVersion("cuCtxGetDevResource", &get_resource, 12040, cudaEnableDefault, &q2) ==
            cudaSuccess &&
        q1 == cudaDriverEntryPointSuccess && q2 == cudaDriverEntryPointSuccess &&
        ((get_current_fn)get_current)(&ctx) == CUDA_SUCCESS && ctx != NULL &&
        ((get_resource_fn)get_resource)(ctx, &res, CU_DEV_RESOURCE_TYPE_SM) == CUDA_SUCCESS && res.sm.smCount > 0) {
        *sms = (int)res.sm.smCount;
        return EP_SUCCESS;
    }
    (void)cudaGetLastError();
    EP_CUDA_CHECK(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device));
    return EP_SUCCESS;
}

static ep_status_t create_local_state(ep_group_t g) {
    if (g->config.comm_stream != NULL) {
        EP_CHECK(ep_group_check_stream(g, (cudaStream_t)g->config.comm_stream, "config.comm_stream"));
        g->stream = (cudaStream_t)g->config.comm_stream;
        g->borrowed_stream = 1;
    } else {
        EP_CUDA_CHECK(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
    }
    EP_CUDA_CHECK(cudaEventCreateWithFlags(&g->order_event, cudaEventDisableTiming));
    EP_CUDA_CHECK(
        cudaHostAlloc((void **)&g->mapped_host, sizeof(ep_mapped_t), cudaHostAllocMapped | cudaHostAllocPortable));
    memset(g->mapped_host, 0, sizeof(ep_mapped_t));
    EP_CUDA_CHECK(cudaHostGetDevicePointer((void **)&g->mapped_dev, g->mapped_host, 0));
    EP_CHECK(context_sm_count(g->device, &g->dev.num_sms));
    EP_CUDA_CHECK(cudaMalloc((void **)&g->barrier_epoch_dev, sizeof(uint64_t)));
    EP_CUDA_CHECK(cudaMemsetAsync(g->barrier_epoch_dev, 0, sizeof(uint64_t), g->stream)); /* before its kernels */
    EP_CUDA_CHECK(cudaMalloc((void **)&g->ll_state_dev, 16 * sizeof(uint32_t)));
    EP_CUDA_CHECK(cudaMemsetAsync(g->ll_state_dev, 0, 16 * sizeof(uint32_t), g->stream));
    g->dev.ll_state = g->ll_state_dev;
    g->dev.rank = g->rank;
    g->dev.num_ranks = g->num_ranks;
    g->dev.timeout_ns = (uint64_t)g->timeout_ms * 1000000u;
    g->dev.barrier_epoch = g->barrier_epoch_dev;
    g->dev.error = &g->mapped_dev->error;
    g->dev.input_error = &g->mapped_dev->input_error;
    return EP_SUCCESS;
}

static ep_status_t check_rank_count(int num_ranks) {
    if (num_ranks > EP_MAX_NVL_RANKS)
        return ep_fail(EP_ERROR_UNSUPPORTED,
                       "num_ranks: at most %d ranks in one NVLink domain are supported, got %d (scale-out is not "
                       "supported yet)",
                       EP_MAX_NVL_RANKS, num_ranks);
    return EP_SUCCESS;
}

/* The steps after the communicator exists. No peer may write into our flags before we zeroed them, so the
 * last step is a collective that every rank enters only after its own setup finished. */
static ep_status_t group_setup(ep_group_t g) {
    EP_CHECK(check_rank_count(g->num_ranks)); /* a caller's communicator: known only now */
    EP_CHECK(create_local_state(g));
    EP_CHECK(check_peers_reachable(g));
    EP_CHECK(check_same_config(g));
    EP_CHECK(create_window(g));
    return check_same_config(g); /* doubles as the "everyone zeroed their flags" barrier */
}

static ep_status_t finish_create(ep_group_t g, ep_group_t *out) {
    ep_status_t st = group_setup(g);
    if (st != EP_SUCCESS) {
        ep_fail_context(st, "rank %d: group creation", g->rank);
        ep_group_release_local(g);
        return st;
    }
    ep_log(EP_LOG_INFO, g->rank, g->device, "group of %d ranks ready: window %zu bytes, timeout %lld ms", g->num_ranks,
           g->window_bytes, (long long)g->timeout_ms);
    *out = g;
    return EP_SUCCESS;
}

ep_status_t ep_get_unique_id(ep_unique_id_t *id) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(id, "id"));
    ncclUniqueId nid;
    EP_NCCL_CHECK(ncclGetUniqueId(&nid));
    memcpy(id->internal, nid.internal, sizeof(id->internal));
    return EP_SUCCESS;
}

/* An in-process group: join the registry instead of creating a communicator. */
static ep_status_t create_local(ep_group_t g, const ep_unique_id_t *id, ep_group_t *out) {
    g->owns_comm = 0;
    ep_status_t st = ep_local_join(id, g->num_ranks, g->rank, &g->local);
    if (st != EP_SUCCESS) {
        ep_fail_context(st, "rank %d: group creation", g->rank);
        free(g);
        return st;
    }
    return finish_create(g, out);
}

ep_status_t ep_get_local_unique_id(ep_unique_id_t *id) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(id, "id"));
    ep_local_id_make(id);
    return EP_SUCCESS;
}

static ep_status_t check_create_args(const ep_unique_id_t *id, int num_ranks, int rank, int cuda_device,
                                     const ep_group_config_t *config, ep_group_t *group) {
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(id, "id"));
    EP_CHECK(ep_check_range(num_ranks, 1, 1 << 20, "num_ranks"));
    EP_CHECK(ep_check_range(rank, 0, num_ranks - 1, "rank"));
    EP_CHECK(check_rank_count(num_ranks)); /* before any rank enters the communicator's creation */
    EP_CHECK(ep_check_range(cuda_device, 0, 1 << 16, "cuda_device"));
    return check_config(config);
}

static ep_status_t check_device_exists(int cuda_device) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess)
        return ep_fail(EP_ERROR_UNSUPPORTED, "no usable CUDA device: cudaGetDeviceCount failed: %s",
                       cudaGetErrorString(err));
    if (cuda_device >= count)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "cuda_device: expected a value in [0, %d], got %d", count - 1,
                       cuda_device);
    return EP_SUCCESS;
}

ep_status_t ep_group_create(const ep_unique_id_t *id, int num_ranks, int rank, int cuda_device,
                            const ep_group_config_t *config, ep_group_t *group) {
    ep_clear_error();
    EP_CHECK(check_create_args(id, num_ranks, rank, cuda_device, config, group));
    *group = NULL;
    EP_CHECK(check_nccl_version());
    EP_CHECK(check_device_exists(cuda_device));
    int previous;
    EP_CHECK(ep_device_enter(cuda_device, &previous));
    ep_group_t g = group_alloc(config, rank, num_ranks, cuda_device, NULL);
    if (g == NULL) {
        ep_device_restore(previous);
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "group: out of host memory");
    }
    if (ep_local_id_is_local(id)) {
        ep_status_t st = create_local(g, id, group);
        ep_device_restore(previous);
        return st;
    }
    ncclUniqueId nid;
    memcpy(nid.internal, id->internal, sizeof(nid.internal));
    ncclConfig_t nccl_config = NCCL_CONFIG_INITIALIZER;
    nccl_config.blocking = 0;
    ep_status_t st = ep_nccl_complete(NULL, ncclCommInitRankConfig(&g->comm, num_ranks, nid, rank, &nccl_config), 0,
                                      "ncclCommInitRankConfig");
    if (st == EP_SUCCESS)
        st = ep_nccl_complete(g->comm, ncclInProgress, g->timeout_ms, "ncclCommInitRankConfig (waiting for peers)");
    if (st != EP_SUCCESS) {
        ep_fail_context(st, "rank %d: group creation", rank);
        ep_group_release_local(g);
        ep_device_restore(previous);
        return st;
    }
    st = finish_create(g, group);
    ep_device_restore(previous);
    return st;
}

ep_status_t ep_group_create_from_comm(struct ncclComm *comm, int cuda_device, const ep_group_config_t *config,
                                      ep_group_t *group) {
    ep_clear_error();
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(comm, "comm"));
    EP_CHECK(check_config(config));
    *group = NULL;
    EP_CHECK(check_nccl_version());
    EP_CHECK(check_device_exists(cuda_device));
    int comm_device = -1, rank = -1, num_ranks = 0;
    EP_NCCL_CHECK(ncclCommCuDevice(comm, &comm_device));
    EP_NCCL_CHECK(ncclCommUserRank(comm, &rank));
    EP_NCCL_CHECK(ncclCommCount(comm, &num_ranks));
    if (comm_device != cuda_device)
        return ep_fail(EP_ERROR_INVALID_ARGUMENT, "cuda_device: the communicator drives device %d, got %d", comm_device,
                       cuda_device);
    int previous;
    EP_CHECK(ep_device_enter(cuda_device, &previous));
    ep_group_t g = group_alloc(config, rank, num_ranks, cuda_device, comm);
    if (g == NULL) {
        ep_device_restore(previous);
        return ep_fail(EP_ERROR_OUT_OF_MEMORY, "group: out of host memory");
    }
    ep_status_t st = finish_create(g, group);
    ep_device_restore(previous);
    return st;
}

ep_status_t ep_group_rank(ep_group_t group, int *rank) {
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(rank, "rank"));
    *rank = group->rank;
    return EP_SUCCESS;
}

ep_status_t ep_group_size(ep_group_t group, int *num_ranks) {
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(num_ranks, "num_ranks"));
    *num_ranks = group->num_ranks;
    return EP_SUCCESS;
}

ep_status_t ep_group_stream(ep_group_t group, void **cuda_stream) {
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(cuda_stream, "cuda_stream"));
    *cuda_stream = (void *)group->stream;
    return EP_SUCCESS;
}

ep_status_t ep_group_local_buffer(ep_group_t group, void **ptr, size_t *num_bytes) {
    EP_CHECK(ep_check_not_null(group, "group"));
    EP_CHECK(ep_check_not_null(ptr, "ptr"));
    EP_CHECK(ep_check_not_null(num_bytes, "num_bytes"));
    *ptr = (char *)group->window_mem + EP_CTRL_BYTES;
    *num_bytes = group->config.num_nvl_bytes;
    return EP_SUCCESS;
}
