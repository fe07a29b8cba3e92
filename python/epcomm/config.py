"""DeepEP's Config, the buffer size hints and the constructor's option policy. No torch here.

epcomm sizes its symmetric buffer for the largest dispatch (SPEC.md: fixed-size buffers, never a ring), so a
size hint needs the number of tokens per rank, which DeepEP's chunked-queue hints do not take. The hints
below use `num_max_tokens_per_rank` (a Config keyword, else EPCOMM_MAX_TOKENS_PER_RANK, else 4096) and the
largest top-k epcomm allows, so that they are enough for any top-k.
"""
import os

from . import _capi

NUM_MAX_NVL_PEERS = 8  # ranks of one NVLink domain that epcomm serves (SPEC.md: R from 2 to 8)
MAX_TOPK_NORMAL = 32
MAX_TOPK_LOW_LATENCY = 16
DEFAULT_MAX_TOKENS_PER_RANK = 4096


def check_group_size(num_ranks, what="epcomm.Buffer"):
    """More ranks than one NVLink domain holds need scale-out, which epcomm does not have yet."""
    if num_ranks > NUM_MAX_NVL_PEERS:
        raise NotImplementedError(f"{what}: {num_ranks} ranks need scale-out across nodes, which epcomm does not "
                                  f"support yet (at most {NUM_MAX_NVL_PEERS} ranks in one NVLink domain)")


def default_max_tokens_per_rank():
    value = os.environ.get("EPCOMM_MAX_TOKENS_PER_RANK")
    if value is None:
        return DEFAULT_MAX_TOKENS_PER_RANK
    try:
        tokens = int(value)
    except ValueError:
        tokens = -1
    if tokens < 1:
        raise ValueError(f"EPCOMM_MAX_TOKENS_PER_RANK: expected a positive integer, got {value!r}")
    return tokens


def normal_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk=MAX_TOPK_NORMAL, elem_bytes=2,
                            num_scales=0):
    """Bytes of symmetric buffer that normal mode needs (ep_normal_buffer_bytes); bf16 rows cover FP8 ones."""
    size = _capi.normal_buffer_bytes(num_ranks, num_max_tokens_per_rank, hidden, elem_bytes, num_scales, num_topk)
    if size == 0:
        raise ValueError(f"normal_buffer_size_hint: invalid sizes (num_ranks={num_ranks}, "
                         f"num_max_tokens_per_rank={num_max_tokens_per_rank}, hidden={hidden}, num_topk={num_topk})")
    return size


def low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                 num_topk=MAX_TOPK_LOW_LATENCY):
    """Bytes of symmetric buffer that low-latency mode needs (ep_low_latency_buffer_bytes)."""
    size = _capi.low_latency_buffer_bytes(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_topk, num_experts)
    if size == 0:
        raise ValueError(f"low_latency_buffer_size_hint: invalid sizes (num_ranks={num_ranks}, "
                         f"num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}, hidden={hidden}, "
                         f"num_experts={num_experts}, num_topk={num_topk})")
    return size


class Config:
    """DeepEP's performance config. epcomm uses `num_sms` (blocks of the high-throughput kernels); the chunk
    sizes belong to DeepEP's queues, which epcomm does not have: they are kept only so code can read them."""

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256, *,
                 num_max_tokens_per_rank=None):
        if int(num_sms) < 1:
            raise ValueError(f"num_sms: expected a positive number, got {num_sms}")
        self.num_sms = int(num_sms)
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens
        self.num_max_tokens_per_rank = num_max_tokens_per_rank  # epcomm: None = the default (module doc)

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """Bytes of NVLink buffer for tokens of `hidden_bytes` (DeepEP passes hidden * max(elem size, 2))."""
        check_group_size(num_ranks, "get_nvl_buffer_size_hint")
        tokens = self.num_max_tokens_per_rank or default_max_tokens_per_rank()
        return normal_buffer_size_hint(tokens, max(1, int(hidden_bytes) // 2), num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0 inside one NVLink domain, as in DeepEP; epcomm has no scale-out buffer yet."""
        check_group_size(num_ranks, "get_rdma_buffer_size_hint")
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens="
                f"{self.num_max_nvl_chunked_send_tokens}, num_max_nvl_chunked_recv_tokens="
                f"{self.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_send_tokens="
                f"{self.num_max_rdma_chunked_send_tokens}, num_max_rdma_chunked_recv_tokens="
                f"{self.num_max_rdma_chunked_recv_tokens})")


def symmetric_buffer_bytes(num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                           allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                           enable_shrink=False):
    """The size of epcomm's one symmetric buffer for DeepEP's constructor arguments, or a ValueError naming an
    argument epcomm cannot honour.

    In DeepEP the low-latency kernels use the RDMA buffer even inside one node; epcomm runs them over NVLink
    in its one symmetric buffer, which normal mode shares. So in low-latency mode `num_rdma_bytes` is taken
    as (part of) that buffer's size; outside it, a scale-out buffer is asked for, which epcomm lacks."""
    if num_nvl_bytes < 0 or num_rdma_bytes < 0:
        raise ValueError(f"num_nvl_bytes / num_rdma_bytes: expected sizes >= 0, got {num_nvl_bytes}, {num_rdma_bytes}")
    if num_rdma_bytes > 0 and not low_latency_mode:
        raise ValueError(f"num_rdma_bytes: {num_rdma_bytes} asks for a scale-out (RDMA) buffer, which epcomm does not "
                         "support yet; pass 0 (one NVLink domain of up to 8 GPUs needs none)")
    if not allow_nvlink_for_low_latency_mode:
        raise ValueError("allow_nvlink_for_low_latency_mode: epcomm's low-latency mode runs over NVLink; False "
                         "(RDMA only) is not supported")
    if allow_mnnvl:
        raise ValueError("allow_mnnvl: multi-node NVLink is not supported by epcomm yet; pass False")
    if use_fabric:
        raise ValueError("use_fabric: fabric memory handles are not supported by epcomm yet; pass False "
                         "(epcomm's symmetric memory comes from NCCL)")
    if enable_shrink:
        raise ValueError("enable_shrink: masking ranks out of a group is not supported by epcomm yet; pass False")
    if num_qps_per_rank < 1:
        raise ValueError(f"num_qps_per_rank: expected a positive number, got {num_qps_per_rank} (epcomm ignores it)")
    return max(int(num_nvl_bytes), int(num_rdma_bytes))
