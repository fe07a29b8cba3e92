"""High-throughput (normal) mode: get_dispatch_layout, dispatch, combine (mixed into Buffer).

All work runs on the group's comm stream, ordered by torch after the caller's stream (or previous_event).
epcomm's dispatch outputs are views into the group buffer, valid until the group's next dispatch; DeepEP's
are tensors of their own, so they are copied out here, on the comm stream, right after the dispatch.
"""
import ctypes

import torch

from . import _capi
from ._handles import HT_HANDLE
from ._torch import fill, fill_optional, view_from_descriptor


class DispatchHandle(tuple):
    """What combine and a cached dispatch need. A 6-tuple placed like DeepEP's intranode handle: item 3 is
    recv_src_idx ([rows] int32, the token index at the source rank, -1 past the received count) and item 4
    is_token_in_rank; DeepEP's prefix matrices and send_head (items 0, 1, 2, 5) are None, as epcomm keeps its
    routing inside the native handle."""

    def __new__(cls, recv_src_idx, is_token_in_rank, native, num_tokens, num_topk):
        self = super().__new__(cls, (None, None, None, recv_src_idx, is_token_in_rank, None))
        self._native = native
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        return self


def _native_of(handle, kind_class, what="handle"):
    native = getattr(handle, "_native", None)
    if not isinstance(handle, kind_class) or native is None:
        raise TypeError(f"{what}: expected the handle returned by this epcomm Buffer's "
                        f"{'dispatch' if kind_class is DispatchHandle else 'low_latency_dispatch'}, "
                        f"got {type(handle).__name__}")
    return native.require(what)


def _unpack_bias(bias):
    if bias is None:
        return None, None
    if isinstance(bias, torch.Tensor):
        return bias, None
    if isinstance(bias, (tuple, list)) and len(bias) == 2:
        return bias[0], bias[1]
    raise ValueError(f"bias: expected a tensor or a tuple of two tensors, got {type(bias).__name__}")


class NormalModeMixin:
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """From topk_idx [N, K] int64: num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank (None: one
        NVLink domain), num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool, and the event."""
        group = self._usable()
        R, N, dev = self.group_size, topk_idx.size(0), topk_idx.device
        with self._allocation(allocate_on_comm_stream):
            per_rank = torch.empty(R, dtype=torch.int32, device=dev)
            per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)
            in_rank = torch.empty((N, R), dtype=torch.bool, device=dev)
        descs = [fill(_capi.ep_tensor_t(), t, name) for t, name in (
            (topk_idx, "topk_idx"), (per_rank, "num_tokens_per_rank"), (per_expert, "num_tokens_per_expert"),
            (in_rank, "is_token_in_rank"))]
        compute = self._begin(previous_event)
        _capi.check(self._lib.ep_get_dispatch_layout(group, ctypes.byref(descs[0]), num_experts,
                                                     ctypes.byref(descs[1]), None, ctypes.byref(descs[2]),
                                                     ctypes.byref(descs[3]), ctypes.byref(self._launch_comm)))
        event = self._finish(compute, async_finish, (topk_idx, per_rank, per_expert, in_rank))
        return per_rank, None, per_expert, in_rank, event

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """Sends each token once to every rank holding one of its experts. x: [N, H] bf16 or a tuple
        (x [N, H] float8_e4m3fn, scales [N, S] float32 or int32). Returns (recv_x or (recv_x, recv_scales),
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event); with a cached
        `handle`: (recv_x..., None, None, None, None, event) unless topk tensors are given again."""
        if num_tokens_per_rdma_rank is not None:
            raise NotImplementedError("num_tokens_per_rdma_rank: scale-out across nodes is not supported by epcomm "
                                      "yet (get_dispatch_layout returns None for it inside one NVLink domain)")
        group = self._usable()
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        args = _capi.ep_dispatch_args_t(expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                                        num_sms=self._num_sms(config))
        fill(args.x, x, "x")
        fill_optional(args.x_scales, x_scales, "x_scales")
        fill_optional(args.topk_idx, topk_idx, "topk_idx")
        fill_optional(args.topk_weights, topk_weights, "topk_weights")
        per_expert = None
        if handle is not None:
            args.cached_handle = _native_of(handle, DispatchHandle)
        else:
            missing = [name for name, t in (("num_tokens_per_rank", num_tokens_per_rank),
                                            ("is_token_in_rank", is_token_in_rank),
                                            ("num_tokens_per_expert", num_tokens_per_expert)) if t is None]
            if missing:
                raise ValueError(f"dispatch: {', '.join(missing)} must be given (from get_dispatch_layout) unless "
                                 "a cached handle is")
            fill(args.num_tokens_per_rank, num_tokens_per_rank, "num_tokens_per_rank")
            fill(args.is_token_in_rank, is_token_in_rank, "is_token_in_rank")
            fill(args.num_tokens_per_expert, num_tokens_per_expert, "num_tokens_per_expert")
            args.num_experts = num_tokens_per_expert.size(0)
            per_expert = (ctypes.c_int32 * max(1, args.num_experts // self.group_size))()
        result = _capi.ep_dispatch_result_t(num_recv_tokens_per_expert=per_expert)

        compute = self._begin(previous_event)
        _capi.check(self._lib.ep_dispatch(group, ctypes.byref(args), ctypes.byref(result),
                                          ctypes.byref(self._launch_comm)))
        native = self._book.adopt(result.handle, HT_HANDLE) if result.handle else None  # owned before anything can fail
        outputs = self._copy_out(result, allocate_on_comm_stream)
        recv_x, recv_scales, recv_idx, recv_weights, recv_src_idx = outputs
        event = self._finish(compute, async_finish, (x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                                     is_token_in_rank, num_tokens_per_expert) + outputs)
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        if handle is not None:
            return recv, recv_idx, recv_weights, None, None, event
        counts = [] if num_worst_tokens > 0 else list(per_expert[:args.num_experts // self.group_size])
        new_handle = DispatchHandle(recv_src_idx, is_token_in_rank, native, x.size(0),
                                    topk_idx.size(1) if topk_idx is not None else 0)
        return recv, recv_idx, recv_weights, counts, new_handle, event

    def _copy_out(self, result, allocate_on_comm_stream):
        """Fresh tensors holding the dispatch's views (allocated where DeepEP would, copied on the comm stream)."""
        window, base = self._buffer_window()
        views = [view_from_descriptor(window, base, d) if d.data else None
                 for d in (result.recv_x, result.recv_x_scales, result.recv_topk_idx, result.recv_topk_weights,
                           result.recv_src_idx)]
        with self._allocation(allocate_on_comm_stream):
            outputs = [None if v is None else torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in views]
        with torch.cuda.stream(self._comm_stream):
            for out, view in zip(outputs, views):
                if out is not None:
                    out.copy_(view)
        return tuple(outputs)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        """Sums each token's rows back from the ranks it went to (no weighting), in ascending rank order in
        float32, plus bias (a tensor or a tuple of two). x: [rows, H] bf16 in the dispatch's received order.
        Returns (combined_x [N, H] bf16, combined_topk_weights [N, K] float32 or None, event)."""
        group = self._usable()
        native = _native_of(handle, DispatchHandle)
        bias0, bias1 = _unpack_bias(bias)
        args = _capi.ep_combine_args_t(handle=native, num_sms=self._num_sms(config))
        fill(args.x, x, "x")
        fill_optional(args.topk_weights, topk_weights, "topk_weights")
        fill_optional(args.bias0, bias0, "bias")
        fill_optional(args.bias1, bias1, "bias[1]")
        with self._allocation(allocate_on_comm_stream):
            out = torch.empty((handle.num_tokens, x.size(1)), dtype=torch.bfloat16, device=x.device)
            out_weights = None if topk_weights is None else torch.empty(
                (handle.num_tokens, topk_weights.size(1)), dtype=torch.float32, device=x.device)
        fill(args.out, out, "out")
        fill_optional(args.out_topk_weights, out_weights, "out_topk_weights")
        compute = self._begin(previous_event)
        _capi.check(self._lib.ep_combine(group, ctypes.byref(args), ctypes.byref(self._launch_comm)))
        event = self._finish(compute, async_finish, (x, topk_weights, bias0, bias1, out, out_weights))
        return out, out_weights, event

    def internode_dispatch(self, *args, **kwargs):
        raise NotImplementedError("internode_dispatch: scale-out across nodes is not supported by epcomm yet")

    def internode_combine(self, *args, **kwargs):
        raise NotImplementedError("internode_combine: scale-out across nodes is not supported by epcomm yet")
