"""Low-latency mode (decode): low_latency_dispatch, low_latency_combine, hooks, clean_low_latency_buffer (mixed
into Buffer).

This is the path whose host cost matters (one call per layer per decode step, target: under 5 us over the C
call), so a call does as little Python as it can:
- The C argument struct for a given set of shapes, strides, dtypes, devices and flags is built once, with
  every check, into a "plan"; later calls look the plan up by a cheap key and only write data pointers into
  the struct (through a uint64 view of it). The checks the C library makes on every call are not repeated.
- Fresh dispatch outputs (DeepEP's semantics: each call returns tensors of its own, valid while held) come
  from two torch.empty per call, recv_x and one for the four small outputs, cut by views after the call: on
  a GPU an allocation and its later free cost several views (about 6 us against 1 us each, measured on the
  GPU host: fresh `out` versus `out=` in combine), and the C call needs only the two base addresses. (One
  allocation for all five needs more views than the allocation it saves is worth: 15.8 against 10.2 us on
  a CPU, where an allocation costs about 3 us less than on the GPU host.)
- The fresh combine output is one torch.empty, its shape and device known from the plan.
- With `low_latency_reuse_outputs=True` the outputs are allocated once, two sets used in turn (DeepEP
  documents that at most two low-latency results may be held at a time); each set has its own argument
  struct with the output pointers in place, so a call writes only the input pointers.
- The ordering is left to the C library (it orders its stream after the caller's and back).
"""
import ctypes
import functools

import torch

from . import _capi
from ._handles import LL_HANDLE
from ._torch import current_stream_ptr, fill, fill_optional
from .config import MAX_TOPK_LOW_LATENCY
from .event import EventHandle, EventOverlap

_MAX_PLANS = 512  # decode calls vary only N (<= T): a few hundred plans at most; beyond that start afresh
_tuple_new = tuple.__new__
_BF16, _FP8, _F32, _I32, _I64 = torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.int32, torch.int64
_D = _capi.DType
_NO_EVENT = EventOverlap(None)  # what a call without async_finish returns (immutable in use: no event, no tensors)


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle: (src_info [L, R*T] int32, layout_range [L, R] int64, T, hidden, E)."""

    def __new__(cls, src_info, layout_range, max_tokens, hidden, num_experts, native):
        self = super().__new__(cls, (src_info, layout_range, max_tokens, hidden, num_experts))
        self._native = native
        return self


def _native_ll(handle, what="handle"):
    """The C handle of a LowLatencyHandle, with DeepEP-style messages for a foreign or released one."""
    native = getattr(handle, "_native", None) if isinstance(handle, LowLatencyHandle) else None
    if native is None:
        raise TypeError(f"{what}: expected the handle returned by this epcomm Buffer's low_latency_dispatch, got "
                        f"{type(handle).__name__}")
    return native.require(what)


class _Args:
    """A filled C argument struct, a uint64 view of it to write data pointers into, and its byref."""

    __slots__ = ("args", "words", "ref")

    def __init__(self, args):
        self.args = args
        self.words = (ctypes.c_uint64 * (ctypes.sizeof(args) // 8)).from_buffer(args)
        self.ref = ctypes.byref(args)

    @staticmethod
    def slot(args_type, field):
        """Index in `words` of tensor field `field`'s data pointer."""
        return (getattr(args_type, field).offset + _capi.ep_tensor_t.data.offset) // 8

    def copy(self):
        return _Args(type(self.args).from_buffer_copy(self.args))


def _meta(t):
    """What a plan depends on in an optional tensor (get_device: -1 on the CPU, so CPU tensors differ)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


class _OutputLayout:
    """Where the five dispatch outputs of one shape live, and how a call makes them: recv_x is one allocation,
    the four small outputs share a second one (int32 words: layout_range, scales, recv_count, src_info, in
    that order so each is aligned for its dtype without padding), cut by one split and a few views. Shared
    by the plans of one (R, T, H, E, format): only N differs between those."""

    __slots__ = ("R", "L", "T", "H", "use_fp8", "use_ue8m0", "device", "x_dtype", "x_shape", "aux_words",
                 "aux_offsets", "split_sizes", "sets")

    def __init__(self, R, L, T, H, use_fp8, use_ue8m0, device):
        RT = R * T
        self.R, self.L, self.T, self.H = R, L, T, H
        self.use_fp8, self.use_ue8m0, self.device = use_fp8, use_ue8m0, device
        self.x_dtype = _FP8 if use_fp8 else _BF16
        self.x_shape = (L, RT, H)
        S = (H // 512 if use_ue8m0 else H // 128) if use_fp8 else 0  # scales stored [L, S, R*T]
        self.split_sizes = (L * R * 2, L * S * RT, L, L * RT)  # in int32 words
        offsets, end = [], 0
        for n in self.split_sizes:
            offsets.append(end * 4)
            end += n
        self.aux_words = end
        # Byte offsets in the second allocation of the pointers the C call gets, by argument field.
        self.aux_offsets = (("layout_range", offsets[0]), ("recv_x_scales", offsets[1] if use_fp8 else None),
                            ("recv_count", offsets[2]), ("src_info", offsets[3]))
        self.sets = None  # low_latency_reuse_outputs: two (outputs, recv_x address, second address), on first use

    def allocate(self):
        """(recv_x, the int32 words of the small outputs): two torch.empty, the least a fresh call makes."""
        return (torch.empty(*self.x_shape, dtype=self.x_dtype, device=self.device),
                torch.empty(self.aux_words, dtype=_I32, device=self.device))

    def views(self, recv_x, aux):
        """(recv_x, scales as returned ([L, R*T, S], column-major in the last two dims) or None, recv_count,
        src_info, layout_range)."""
        layout_range, scales, recv_count, src_info = aux.split_with_sizes(self.split_sizes)
        L, R, RT = self.L, self.R, self.R * self.T
        if self.use_fp8:
            if not self.use_ue8m0:
                scales = scales.view(_F32)
            scales = scales.view(L, -1, RT).transpose(1, 2)
        else:
            scales = None
        return recv_x, scales, recv_count, src_info.view(L, RT), layout_range.view(_I64).view(L, R)

    def describe(self, args):
        """Writes the output descriptors (data pointers left NULL) into a dispatch argument struct."""
        L, R, RT, H = self.L, self.R, self.R * self.T, self.H
        _capi.fill_tensor(args.recv_x, None, _D.EP_DTYPE_FLOAT8_E4M3 if self.use_fp8 else _D.EP_DTYPE_BFLOAT16,
                          (L, RT, H))
        if self.use_fp8:
            _capi.fill_tensor(args.recv_x_scales, None, _D.EP_DTYPE_INT32 if self.use_ue8m0 else _D.EP_DTYPE_FLOAT32,
                              (L, self.split_sizes[1] // (L * RT), RT))
        else:
            _capi.clear_tensor(args.recv_x_scales)
        _capi.fill_tensor(args.recv_count, None, _D.EP_DTYPE_INT32, (L,))
        _capi.fill_tensor(args.src_info, None, _D.EP_DTYPE_INT32, (L, RT))
        _capi.fill_tensor(args.layout_range, None, _D.EP_DTYPE_INT64, (L, R))


class _DispatchPlan:
    """The argument struct of one dispatch key: `fresh` (output pointers written per call), and for reused
    outputs one struct per set with every output pointer in place (`turns`, made on first use)."""

    __slots__ = ("layout", "fresh", "aux_slots", "recv_x_slot", "x_slot", "idx_slot", "stats_slot", "waits_slot",
                 "turns")

    def __init__(self, args, layout):
        t = type(args)
        self.layout = layout
        self.fresh = _Args(args)
        self.recv_x_slot = _Args.slot(t, "recv_x")
        self.aux_slots = tuple((_Args.slot(t, f), off) for f, off in layout.aux_offsets if off is not None)
        self.x_slot, self.idx_slot = _Args.slot(t, "x"), _Args.slot(t, "topk_idx")
        self.stats_slot = _Args.slot(t, "cumulative_local_expert_recv_stats")
        self.waits_slot = _Args.slot(t, "dispatch_wait_recv_cost_stats")
        self.turns = None

    def point_outputs(self, a, recv_x_ptr, aux_ptr):
        words = a.words
        words[self.recv_x_slot] = recv_x_ptr
        for slot, offset in self.aux_slots:
            words[slot] = aux_ptr + offset

    def make_turns(self):
        """(argument struct, outputs) for each of the layout's two reused sets."""
        layout = self.layout
        if layout.sets is None:
            sets = []
            for _ in range(2):
                recv_x, aux = layout.allocate()
                sets.append((layout.views(recv_x, aux), recv_x.data_ptr(), aux.data_ptr()))
            layout.sets = tuple(sets)
        turns = []
        for outputs, recv_x_ptr, aux_ptr in layout.sets:
            a = self.fresh.copy()
            self.point_outputs(a, recv_x_ptr, aux_ptr)
            turns.append((a, outputs))
        self.turns = tuple(turns)
        return self.turns


class _CombinePlan:
    __slots__ = ("a", "x_slot", "idx_slot", "weights_slot", "out_slot", "waits_slot", "out_shape", "device")

    def __init__(self, args, out_shape, device):
        t = type(args)
        self.a = _Args(args)
        self.x_slot, self.idx_slot = _Args.slot(t, "x"), _Args.slot(t, "topk_idx")
        self.weights_slot, self.out_slot = _Args.slot(t, "topk_weights"), _Args.slot(t, "out")
        self.waits_slot = _Args.slot(t, "combine_wait_recv_cost_stats")
        self.out_shape, self.device = out_shape, device


class LowLatencyMixin:
    def _init_low_latency(self):
        self._ll_dispatch_plans = {}
        self._ll_combine_plans = {}
        self._ll_layouts = {}
        self._ll_turn = 0  # which of the two reusable output sets the next dispatch writes
        self._ll_combine_buffers = {}  # get_next_low_latency_combine_buffer: two buffers per shape
        self._ll_combine_turn = 0
        self._launch_ll = _capi.ep_launch_t()
        self._launch_ll_ref = ctypes.byref(self._launch_ll)
        self._launch_comm_ref = ctypes.byref(self._launch_comm)
        self._ll_handle_out = ctypes.c_void_p()
        self._ll_handle_ref = ctypes.byref(self._ll_handle_out)

    def _ll_launch(self, async_finish):
        """The launch struct (byref): the caller's stream (the library orders around it), or for async_finish
        the comm stream ordered by torch, so that an event can be recorded after the work."""
        if async_finish:
            self._begin(None)
            return self._launch_comm_ref
        self._launch_ll.stream = current_stream_ptr(self._device)
        return self._launch_ll_ref

    # ---- dispatch -------------------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """x [N, H] bf16 (N <= T), topk_idx [N, K] int64. Returns (recv_x [L, R*T, H] float8_e4m3fn with
        its scales [L, R*T, H/128] float32 (or [L, R*T, H/512] int32 with use_ue8m0), column-major in the last
        two dims, as a tuple; or bf16 recv_x without use_fp8), recv_count [L] int32, handle, event, hook)."""
        group = self._group
        if group is None or self._book._dead:
            group = self._usable()
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_dispatch: async_finish and return_recv_hook cannot both be set")
        T, E = num_max_dispatch_tokens_per_rank, num_experts
        stats, waits = cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats
        key = (x.shape, x.stride(), x.dtype, x.get_device(), topk_idx.shape, topk_idx.stride(), topk_idx.dtype,
               topk_idx.get_device(), T, E, use_fp8, round_scale, use_ue8m0, return_recv_hook,
               None if stats is None else _meta(stats), None if waits is None else _meta(waits))
        plan = self._ll_dispatch_plans.get(key)
        if plan is None:
            plan = self._ll_dispatch_plan(key, x, topk_idx, T, E, use_fp8, round_scale, use_ue8m0, return_recv_hook,
                                          stats, waits)
        if self.low_latency_reuse_outputs:
            turn = self._ll_turn
            a, outputs = (plan.turns or plan.make_turns())[turn]
            aux = None
        else:  # fresh outputs: two allocations, the small outputs cut from the second after the call
            a = plan.fresh
            recv_x, aux = plan.layout.allocate()
            words = a.words
            words[plan.recv_x_slot] = recv_x.data_ptr()
            aux_ptr = aux.data_ptr()
            for slot, offset in plan.aux_slots:  # plan.point_outputs, inlined
                words[slot] = aux_ptr + offset
        words = a.words
        words[plan.x_slot] = x.data_ptr()
        words[plan.idx_slot] = topk_idx.data_ptr()
        if stats is not None:
            words[plan.stats_slot] = stats.data_ptr()
        if waits is not None:
            words[plan.waits_slot] = waits.data_ptr()
        if async_finish:
            launch = self._ll_launch(True)
        else:  # self._ll_launch(False), inlined
            self._launch_ll.stream = current_stream_ptr(self._device)
            launch = self._launch_ll_ref
        status = self._lib.ep_low_latency_dispatch(group, a.ref, self._ll_handle_ref, launch)
        if status:
            _capi.check(status)
        native = self._book.adopt(self._ll_handle_out.value, LL_HANDLE)
        if aux is None:
            self._ll_turn = turn ^ 1  # only once the call succeeded
        else:
            outputs = plan.layout.views(recv_x, aux)
        recv_x, scales, recv_count, src_info, layout_range = outputs
        handle = _tuple_new(LowLatencyHandle, (src_info, layout_range, T, plan.layout.H, E))
        handle._native = native
        hook = None
        if return_recv_hook:  # the hook keeps the outputs alive until the receive that writes them has run
            hook = functools.partial(self._ll_hook, self._lib.ep_low_latency_dispatch_hook, handle, outputs)
        if async_finish:
            event = EventOverlap(EventHandle(self._comm_stream), (x, topk_idx) + outputs + (stats, waits))
        else:
            event = _NO_EVENT
        return ((recv_x, scales) if use_fp8 else recv_x), recv_count, handle, event, hook

    def _ll_dispatch_plan(self, key, x, topk_idx, T, E, use_fp8, round_scale, use_ue8m0, return_recv_hook, stats,
                          waits):
        """Builds (with every check) the argument struct for this key; later calls only write pointers."""
        R = self.group_size
        if E % R != 0 or E < R:
            raise ValueError(f"num_experts: expected a multiple of the {R} ranks, got {E}")
        args = _capi.ep_low_latency_dispatch_args_t(max_tokens=T, num_experts=E, use_fp8=int(bool(use_fp8)),
                                                    round_scale=int(bool(round_scale)),
                                                    use_ue8m0=int(bool(use_ue8m0)),
                                                    return_recv_hook=int(bool(return_recv_hook)))
        fill(args.x, x, "x")
        fill(args.topk_idx, topk_idx, "topk_idx")
        fill_optional(args.cumulative_local_expert_recv_stats, stats, "cumulative_local_expert_recv_stats")
        fill_optional(args.dispatch_wait_recv_cost_stats, waits, "dispatch_wait_recv_cost_stats")
        hidden = x.shape[-1] if x.dim() else 0  # a wrong x is the C library's to report
        layout_key = (R, E // R, T, hidden, bool(use_fp8), bool(use_fp8) and bool(use_ue8m0), x.device)
        layout = self._ll_layouts.get(layout_key)
        if layout is None:
            layout = self._ll_layouts[layout_key] = _OutputLayout(*layout_key)
        layout.describe(args)
        plan = _DispatchPlan(args, layout)
        return _remember(self._ll_dispatch_plans, key, plan)

    def _ll_hook(self, fn, handle, keep_alive=None):
        """Runs a receive hook on the current stream (which then waits for it)."""
        group = self._usable()
        self._launch_ll.stream = current_stream_ptr(self._device)
        _capi.check(fn(group, _native_ll(handle), self._launch_ll_ref))

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
        group = self._group
        if group is None or self._book._dead:
            group = self._usable()
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_combine: async_finish and return_recv_hook cannot both be set")
        native = getattr(handle, "_native", None) if type(handle) is LowLatencyHandle else None
        native = native.ptr if native is not None and not native._book.closed else None
        if native is None:
            native = _native_ll(handle)  # raises, naming what is wrong
        waits = combine_wait_recv_cost_stats
        key = (x.shape, x.stride(), x.dtype, x.get_device(), topk_idx.shape, topk_idx.stride(), topk_idx.dtype,
               topk_idx.get_device(), topk_weights.shape, topk_weights.stride(), topk_weights.dtype,
               topk_weights.get_device(), None if out is None else _meta(out), return_recv_hook, use_logfmt,
               None if waits is None else _meta(waits))
        plan = self._ll_combine_plans.get(key)
        if plan is None:
            plan = self._ll_combine_plan(key, x, topk_idx, topk_weights, out, return_recv_hook, use_logfmt, waits)
        if out is None:
            out = torch.empty(*plan.out_shape, dtype=_BF16, device=plan.device)  # *shape: parsed faster
        a = plan.a
        words = a.words
        words[plan.x_slot] = x.data_ptr()
        words[plan.idx_slot] = topk_idx.data_ptr()
        words[plan.weights_slot] = topk_weights.data_ptr()
        words[plan.out_slot] = out.data_ptr()
        if waits is not None:
            words[plan.waits_slot] = waits.data_ptr()
        if async_finish:
            launch = self._ll_launch(True)
        else:  # self._ll_launch(False), inlined
            self._launch_ll.stream = current_stream_ptr(self._device)
            launch = self._launch_ll_ref
        status = self._lib.ep_low_latency_combine(group, a.ref, native, launch)
        if status:
            _capi.check(status)
        hook = None
        if return_recv_hook:
            hook = functools.partial(self._ll_hook, self._lib.ep_low_latency_combine_hook, handle, out)
        if async_finish:
            event = EventOverlap(EventHandle(self._comm_stream), (x, topk_idx, topk_weights, out, waits))
        else:
            event = _NO_EVENT
        return out, event, hook

    def _ll_combine_plan(self, key, x, topk_idx, topk_weights, out, return_recv_hook, use_logfmt, waits):
        args = _capi.ep_low_latency_combine_args_t(return_recv_hook=int(bool(return_recv_hook)),
                                                   use_logfmt=int(bool(use_logfmt)))
        fill(args.x, x, "x")
        fill(args.topk_idx, topk_idx, "topk_idx")
        fill(args.topk_weights, topk_weights, "topk_weights")
        out_shape = (topk_idx.shape[0] if topk_idx.dim() else 0, x.shape[-1] if x.dim() else 0)
        if out is None:  # fresh [N, H] bf16 on x's device each call
            _capi.fill_tensor(args.out, None, _D.EP_DTYPE_BFLOAT16, out_shape)
        else:
            fill(args.out, out, "out")
        fill_optional(args.combine_wait_recv_cost_stats, waits, "combine_wait_recv_cost_stats")
        return _remember(self._ll_combine_plans, key, _CombinePlan(args, out_shape, x.device))

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



def _remember(plans, key, plan):
    if len(plans) >= _MAX_PLANS:
        plans.clear()
    plans[key] = plan
    return plan
