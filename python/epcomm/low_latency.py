"""Low-latency mode (decode): low_latency_dispatch, low_latency_combine, hooks, clean_low_latency_buffer (mixed
into Buffer).

This is the path whose host cost matters (one call per layer per decode step), so a call does little Python:
the C argument struct for a given set of shapes, dtypes and flags is built once (a "plan") and later calls
only write the data pointers into it; the ordering is left to the C library (it orders its stream after the
caller's and back). With `low_latency_reuse_outputs=True` the dispatch outputs are also allocated once, two
sets used in turn: DeepEP documents that at most two low-latency results may be held at a time.
"""
import ctypes
import functools

import torch

from . import _capi
from ._handles import LL_HANDLE
from ._torch import current_stream_ptr, fill, fill_optional
from .config import MAX_TOPK_LOW_LATENCY
from .event import EventHandle, EventOverlap
from .normal import _native_of

_MAX_PLANS = 512  # decode calls vary only N (<= T): a few hundred plans at most; beyond that start afresh


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle: (src_info [L, R*T] int32, layout_range [L, R] int64, T, hidden, E)."""

    def __new__(cls, src_info, layout_range, max_tokens, hidden, num_experts, native):
        self = super().__new__(cls, (src_info, layout_range, max_tokens, hidden, num_experts))
        self._native = native
        return self


class _Plan:
    """A filled C argument struct and where in it the per-call data pointers go."""

    __slots__ = ("args", "words", "slots")

    def __init__(self, args, tensor_fields):
        self.args = args
        self.words = (ctypes.c_uint64 * (ctypes.sizeof(args) // 8)).from_buffer(args)
        data = _capi.ep_tensor_t.data.offset
        self.slots = tuple((getattr(type(args), f).offset + data) // 8 for f in tensor_fields)

    def set_pointers(self, pointers):
        words = self.words
        for slot, ptr in zip(self.slots, pointers):
            words[slot] = ptr


_DISPATCH_FIELDS = ("x", "topk_idx", "recv_x", "recv_x_scales", "recv_count", "src_info", "layout_range",
                    "cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats")
_COMBINE_FIELDS = ("x", "topk_idx", "topk_weights", "out", "combine_wait_recv_cost_stats")


def _meta(t):
    return None if t is None else (t.dtype, t.shape, t.stride(), t.device)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class LowLatencyMixin:
    def _init_low_latency(self):
        self._ll_plans = {}
        self._ll_output_sets = {}
        self._ll_turn = 0  # which of the two reusable output sets the next dispatch writes
        self._ll_combine_buffers = {}  # get_next_low_latency_combine_buffer: two buffers per shape
        self._ll_combine_turn = 0
        self._launch_ll = _capi.ep_launch_t()
        self._ll_handle_out = ctypes.c_void_p()

    def _ll_launch(self, async_finish):
        """The launch struct: the caller's stream (the library orders around it), or for async_finish the comm
        stream ordered by torch, so that an event can be recorded after the work."""
        if async_finish:
            self._begin(None)
            return self._launch_comm
        self._launch_ll.stream = current_stream_ptr(self._device)
        return self._launch_ll

    # ---- dispatch -------------------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """x [N, H] bf16 (N <= T), topk_idx [N, K] int64. Returns (recv_x [L, R*T, H] float8_e4m3fn with
        its scales [L, R*T, H/128] float32 (or [L, R*T, H/512] int32 with use_ue8m0), column-major in the last
        two dims, as a tuple; or bf16 recv_x without use_fp8), recv_count [L] int32, handle, event, hook)."""
        group = self._usable()
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_dispatch: async_finish and return_recv_hook cannot both be set")
        T, E = num_max_dispatch_tokens_per_rank, num_experts
        stats, waits = cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats
        key = (x.dtype, x.shape, x.stride(), x.device, topk_idx.dtype, topk_idx.shape, topk_idx.stride(),
               topk_idx.device, T, E, bool(use_fp8), bool(round_scale), bool(use_ue8m0), bool(return_recv_hook),
               _meta(stats), _meta(waits))
        outputs = self._ll_outputs(x, T, E, use_fp8, use_ue8m0)
        plan = self._ll_plans.get(key)
        if plan is None:
            plan = self._ll_dispatch_plan(key, x, topk_idx, T, E, use_fp8, round_scale, use_ue8m0, return_recv_hook,
                                          stats, waits, outputs)
        plan.set_pointers((x.data_ptr(), topk_idx.data_ptr()) + outputs[-1] + (_ptr(stats), _ptr(waits)))
        launch = self._ll_launch(async_finish)
        _capi.check(self._lib.ep_low_latency_dispatch(group, ctypes.byref(plan.args),
                                                      ctypes.byref(self._ll_handle_out), ctypes.byref(launch)))
        self._ll_turn ^= 1
        recv_x, scales, scales_view, recv_count, src_info, layout_range, _ = outputs
        handle = LowLatencyHandle(src_info, layout_range, T, x.size(1), E,
                                  self._book.adopt(self._ll_handle_out.value, LL_HANDLE))
        hook = None
        if return_recv_hook:  # the hook keeps the outputs alive until the receive that writes them has run
            hook = functools.partial(self._ll_hook, self._lib.ep_low_latency_dispatch_hook, handle, outputs)
        event = EventOverlap(None)
        if async_finish:
            event = EventOverlap(EventHandle(self._comm_stream),
                                 (x, topk_idx, recv_x, scales, recv_count, src_info, layout_range, stats, waits))
        return (recv_x, scales_view) if use_fp8 else recv_x, recv_count, handle, event, hook

    def _ll_outputs(self, x, T, E, use_fp8, use_ue8m0):
        """(recv_x, scales [L, S, R*T] or None, scales as DeepEP returns them [L, R*T, S], recv_count,
        src_info, layout_range, their data pointers)."""
        R = self.group_size
        if E % R != 0 or E < R:
            raise ValueError(f"num_experts: expected a multiple of the {R} ranks, got {E}")
        shape_key = (R, E // R, T, x.size(1), bool(use_fp8), bool(use_ue8m0), x.device)
        if not self.low_latency_reuse_outputs:
            return _new_outputs(*shape_key)
        sets = self._ll_output_sets.get(shape_key)
        if sets is None:
            sets = self._ll_output_sets[shape_key] = (_new_outputs(*shape_key), _new_outputs(*shape_key))
        return sets[self._ll_turn]

    def _ll_dispatch_plan(self, key, x, topk_idx, T, E, use_fp8, round_scale, use_ue8m0, return_recv_hook, stats,
                          waits, outputs):
        """Builds (with every check) the argument struct for this key; later calls only change pointers."""
        recv_x, scales, _, recv_count, src_info, layout_range, _ = outputs
        args = _capi.ep_low_latency_dispatch_args_t(max_tokens=T, num_experts=E, use_fp8=int(bool(use_fp8)),
                                                    round_scale=int(bool(round_scale)),
                                                    use_ue8m0=int(bool(use_ue8m0)),
                                                    return_recv_hook=int(bool(return_recv_hook)))
        fill(args.x, x, "x")
        fill(args.topk_idx, topk_idx, "topk_idx")
        fill(args.recv_x, recv_x, "recv_x")
        fill_optional(args.recv_x_scales, scales, "recv_x_scales")
        fill(args.recv_count, recv_count, "recv_count")
        fill(args.src_info, src_info, "src_info")
        fill(args.layout_range, layout_range, "layout_range")
        fill_optional(args.cumulative_local_expert_recv_stats, stats, "cumulative_local_expert_recv_stats")
        fill_optional(args.dispatch_wait_recv_cost_stats, waits, "dispatch_wait_recv_cost_stats")
        return self._remember_plan(key, _Plan(args, _DISPATCH_FIELDS))

    def _remember_plan(self, key, plan):
        if len(self._ll_plans) >= _MAX_PLANS:
            self._ll_plans.clear()
        self._ll_plans[key] = plan
        return plan

    def _ll_hook(self, fn, handle, keep_alive=None):
        """Runs a receive hook on the current stream (which then waits for it)."""
        group = self._usable()
        self._launch_ll.stream = current_stream_ptr(self._device)
        _capi.check(fn(group, _native_of(handle, LowLatencyHandle), ctypes.byref(self._launch_ll)))

    # ---- combine --------------------------------------------------------------------------------------
    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """x [L, R*T, H] bf16: each local expert's output rows in the dispatch's order. Returns (combined_x
        [N, H] bf16 = sum over k of topk_weights[t, k] * row, in k order, in float32; event; hook).
        use_logfmt: rows travel in LogFMT (lossy, relative error <= 0.0324 per value; ref/logfmt.c)."""
        if zero_copy:  # the rows are in the buffer get_next_low_latency_combine_buffer gave for this handle
            x = getattr(handle, "_combine_buffer", None)
            if x is None:
                raise ValueError("low_latency_combine: zero_copy=True needs get_next_low_latency_combine_buffer("
                                 "handle) first (write the expert outputs into the buffer it returns)")
        group = self._usable()
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_combine: async_finish and return_recv_hook cannot both be set")
        native = _native_of(handle, LowLatencyHandle)
        waits = combine_wait_recv_cost_stats
        if out is None:
            out = torch.empty((topk_idx.size(0), handle[3]), dtype=torch.bfloat16, device=x.device)
        key = ("combine", x.dtype, x.shape, x.stride(), x.device, _meta(topk_idx), _meta(topk_weights), _meta(out),
               bool(return_recv_hook), _meta(waits), bool(use_logfmt))
        plan = self._ll_plans.get(key)
        if plan is None:
            args = _capi.ep_low_latency_combine_args_t(return_recv_hook=int(bool(return_recv_hook)),
                                                       use_logfmt=int(bool(use_logfmt)))
            fill(args.x, x, "x")
            fill(args.topk_idx, topk_idx, "topk_idx")
            fill(args.topk_weights, topk_weights, "topk_weights")
            fill(args.out, out, "out")
            fill_optional(args.combine_wait_recv_cost_stats, waits, "combine_wait_recv_cost_stats")
            plan = self._remember_plan(key, _Plan(args, _COMBINE_FIELDS))
        plan.set_pointers((x.data_ptr(), topk_idx.data_ptr(), topk_weights.data_ptr(), out.data_ptr(), _ptr(waits)))
        launch = self._ll_launch(async_finish)
        _capi.check(self._lib.ep_low_latency_combine(group, ctypes.byref(plan.args), native, ctypes.byref(launch)))
        hook = None
        if return_recv_hook:
            hook = functools.partial(self._ll_hook, self._lib.ep_low_latency_combine_hook, handle, out)
        event = EventOverlap(None)
        if async_finish:
            event = EventOverlap(EventHandle(self._comm_stream), (x, topk_idx, topk_weights, out, waits))
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The [L, R*T, H] bf16 buffer to write this handle's expert outputs into for
        low_latency_combine(..., zero_copy=True). epcomm's combine sends straight from its input rows (there
        is no staging copy to skip), so this is a buffer like any other, kept by the Buffer: two per shape,
        used in turn, as DeepEP's two low-latency buffers are (at most two results alive at once)."""
        self._usable()
        src_info, _, _, hidden, _ = handle
        shape = (src_info.size(0), src_info.size(1), hidden)
        key = (shape, src_info.device)
        pair = self._ll_combine_buffers.get(key)
        if pair is None:
            pair = self._ll_combine_buffers[key] = [
                torch.empty(shape, dtype=torch.bfloat16, device=src_info.device) for _ in range(2)]
        self._ll_combine_turn ^= 1
        handle._combine_buffer = pair[self._ll_combine_turn]
        return handle._combine_buffer

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Makes the buffer ready for low-latency use after normal-mode use (collective)."""
        group = self._usable()
        R, T = self.group_size, num_max_dispatch_tokens_per_rank
        # DeepEP's signature has no top-k; the cleaned region grows with it, so clean for the largest top-k
        # the buffer can hold (any top-k that can run fits in it).
        topk = 1
        for k in range(MAX_TOPK_LOW_LATENCY, 0, -1):
            if 0 < _capi.low_latency_buffer_bytes(R, T, hidden, k, num_experts) <= self._buffer_bytes:
                topk = k
                break
        _capi.check(self._lib.ep_clean_low_latency_buffer(group, T, hidden, topk, num_experts,
                                                          current_stream_ptr(self._device)))

    # ---- DeepEP's rank masking (enable_shrink), which epcomm does not have ----------------------------
    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        raise NotImplementedError("low_latency_update_mask_buffer: rank masking (enable_shrink) is not supported "
                                  "by epcomm yet")

    def low_latency_query_mask_buffer(self, mask_status):
        raise NotImplementedError("low_latency_query_mask_buffer: rank masking (enable_shrink) is not supported "
                                  "by epcomm yet")

    def low_latency_clean_mask_buffer(self):
        raise NotImplementedError("low_latency_clean_mask_buffer: rank masking (enable_shrink) is not supported "
                                  "by epcomm yet")


def _new_outputs(R, L, T, H, use_fp8, use_ue8m0, device):
    RT = R * T
    recv_x = torch.empty((L, RT, H), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=device)
    scales = view = None
    if use_fp8:  # stored [L, S, R*T] (what the kernel writes), returned transposed: DeepEP's TMA layout
        S, dtype = (H // 512, torch.int32) if use_ue8m0 else (H // 128, torch.float32)
        scales = torch.empty((L, S, RT), dtype=dtype, device=device)
        view = scales.transpose(1, 2)
    recv_count = torch.empty(L, dtype=torch.int32, device=device)
    src_info = torch.empty((L, RT), dtype=torch.int32, device=device)
    layout_range = torch.empty((L, R), dtype=torch.int64, device=device)
    pointers = (recv_x.data_ptr(), _ptr(scales), recv_count.data_ptr(), src_info.data_ptr(), layout_range.data_ptr())
    return recv_x, scales, view, recv_count, src_info, layout_range, pointers
