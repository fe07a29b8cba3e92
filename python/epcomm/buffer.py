"""Buffer: DeepEP V1's class over libepcomm. This file holds the group's lifecycle, streams, the raw buffer
and the static helpers; normal.py and low_latency.py hold the operations (mixed in below)."""
import contextlib
import ctypes
import sys
import warnings

import torch

from . import _capi, _torch, bootstrap, config as _config
from ._handles import HT_HANDLE, HandleBook
from .config import Config
from .event import EventHandle, EventOverlap, cuda_event_of
from .low_latency import LowLatencyMixin
from .normal import NormalModeMixin


def _handle_releaser(lib):
    """Frees one C handle. Holds the library, not the Buffer: handles must not keep a reference cycle with
    their Buffer, or dropping the Buffer would wait for the cycle collector instead of freeing it at once."""

    destroy_ht, destroy_ll = lib.ep_handle_destroy, lib.ep_ll_handle_destroy

    def release(kind, ptr):
        status = destroy_ht(ptr) if kind == HT_HANDLE else destroy_ll(ptr)
        if status:
            _capi.check(status)

    return release


class Buffer(NormalModeMixin, LowLatencyMixin):
    """Expert-parallel dispatch / combine over one NVLink domain (2 to 8 GPUs), DeepEP V1's interface.

    Attributes as in DeepEP: num_sms (class-wide), rank, group_size, group, num_nvl_bytes, num_rdma_bytes,
    low_latency_mode, explicitly_destroy. README.md ("Python binding") lists what differs from DeepEP."""

    num_sms = 20
    _num_sms_chosen = False  # until set_num_sms is called, config=None means epcomm's own default

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                 explicitly_destroy=False, enable_shrink=False, comm=None, *, low_latency_reuse_outputs=False):
        self._group = None  # first, so that __del__ works whatever fails below
        buffer_bytes = _config.symmetric_buffer_bytes(num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                                                      num_qps_per_rank, allow_nvlink_for_low_latency_mode,
                                                      allow_mnnvl, use_fabric, enable_shrink)
        if group is not None or comm is not None:  # (neither: the exchange below says so)
            _config.check_group_size(bootstrap.group_rank_and_size(group, comm)[1])
        if not torch.cuda.is_available():
            raise RuntimeError("epcomm.Buffer needs a CUDA device (torch.cuda.is_available() is False)")
        self._lib = _capi.lib()
        self.rank, self.group_size, uid = bootstrap.exchange_unique_id(group, comm)
        self.group = group if group is not None else comm
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.low_latency_reuse_outputs = low_latency_reuse_outputs
        self._device = torch.cuda.current_device()

        # The comm stream comes from PyTorch's stream pool, which never destroys its streams: tensors that
        # recorded it (record_stream) stay safe to free after the group is destroyed. The group borrows it.
        # A rank thread of an in-process group may run in its own green context (SM partition), which the
        # pool's streams (made in whichever context was current first) are not part of: it gets a stream of
        # its current context, also never destroyed.
        if bootstrap.is_local(group):
            self._comm_stream = _torch.new_context_stream(self._device)
        else:
            self._comm_stream = torch.cuda.Stream(device=torch.device("cuda", self._device))
        self._comm_ptr = self._comm_stream.cuda_stream
        cfg = _capi.ep_group_config_t(num_nvl_bytes=buffer_bytes, low_latency_mode=int(bool(low_latency_mode)),
                                      comm_stream=self._comm_ptr)
        handle = ctypes.c_void_p()
        _capi.check(self._lib.ep_group_create(ctypes.byref(_capi.unique_id_from_bytes(uid)), self.group_size,
                                              self.rank, self._device, ctypes.byref(cfg), ctypes.byref(handle)))
        self._group = handle.value
        self._buffer_bytes = buffer_bytes
        # Normal-mode work is ordered by torch on the comm stream (it adds copies there), so the C calls get
        # the comm stream itself as "the caller's": their own ordering is then a no-op.
        self._launch_comm = _capi.ep_launch_t(stream=self._comm_ptr)
        self._book = HandleBook(_handle_releaser(self._lib), lambda kind: kind == HT_HANDLE)
        self._window = None
        self._init_low_latency()

    # ---- lifecycle ------------------------------------------------------------------------------------
    def _usable(self):
        """The group pointer; also releases handles the garbage collector dropped, when that is safe."""
        if self._group is None:
            raise RuntimeError("epcomm.Buffer: destroyed")
        if self._book.pending() and not torch.cuda.is_current_stream_capturing():
            error = self._book.collect()
            if error is not None:
                raise error
        return self._group

    def _release(self):
        if self._group is None:
            return
        handle_error = self._book.release_all()
        status = self._lib.ep_group_synchronize(self._group, _torch.current_stream_ptr(self._device))
        sync_error = _capi.EpcommError(status, _capi.last_error()) if status else None
        status = self._lib.ep_group_destroy(self._group)
        if status == _capi.Status.EP_ERROR_IN_PROGRESS:
            _capi.check(status)  # nothing was destroyed: the caller may retry
        self._group, self._window = None, None  # any other status: the C side freed the group
        _capi.check(status)
        if handle_error is not None:
            raise handle_error
        if sync_error is not None:
            warnings.warn(f"epcomm.Buffer: the group reported an error before it was destroyed: {sync_error}")

    def destroy(self):
        """Releases the group (collective: every rank calls it). Needs explicitly_destroy=True, as in DeepEP."""
        if not self.explicitly_destroy:
            raise RuntimeError("`explicitly_destroy` flag must be set to call destroy()")
        self._release()

    def __del__(self):
        # At interpreter exit CUDA may already be torn down and peers gone: the process end frees everything.
        if getattr(self, "_group", None) is None or self.explicitly_destroy or sys.is_finalizing():
            return
        try:
            self._release()
        except Exception as e:  # a destructor must not raise
            warnings.warn(f"epcomm.Buffer: releasing the group failed: {e}")

    # ---- streams, events, raw buffer ------------------------------------------------------------------
    def get_comm_stream(self):
        """The communication stream (where epcomm's kernels run) as a torch.cuda stream."""
        self._usable()
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        """This rank's symmetric buffer as a tensor of `dtype` starting `offset` bytes in, optionally
        `size` (a torch.Size) elements viewed in that shape. epcomm has one buffer: `use_rdma_buffer` is
        allowed in low-latency mode, where DeepEP's RDMA buffer is this buffer."""
        if use_rdma_buffer and not self.low_latency_mode:
            raise NotImplementedError("get_local_buffer_tensor: use_rdma_buffer=True outside low-latency mode asks "
                                      "for a scale-out buffer, which epcomm does not have yet")
        window, _ = self._buffer_window()
        elem = torch.empty(0, dtype=dtype).element_size()
        if offset < 0 or offset % elem or offset > window.numel():
            raise ValueError(f"offset: expected a multiple of {elem} bytes in [0, {window.numel()}], got {offset}")
        usable = (window.numel() - offset) // elem
        tensor = window[offset:offset + usable * elem].view(dtype)
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > usable:
            raise ValueError(f"size: {tuple(size)} needs {size.numel()} elements, the buffer holds {usable} "
                             f"past offset {offset}")
        return tensor[:size.numel()].view(size)

    def _buffer_window(self):
        """(uint8 tensor over the local symmetric buffer, its address), made on first use."""
        if self._window is None:
            ptr, num_bytes = ctypes.c_void_p(), ctypes.c_size_t()
            _capi.check(self._lib.ep_group_local_buffer(self._usable(), ctypes.byref(ptr), ctypes.byref(num_bytes)))
            self._window = (_torch.bytes_tensor(ptr.value, num_bytes.value, torch.device("cuda", self._device)),
                            ptr.value)
        return self._window

    def _begin(self, previous_event):
        """Orders the comm stream after the caller's stream (or `previous_event`); returns the caller's."""
        compute = torch.cuda.current_stream()
        event = cuda_event_of(previous_event)
        if event is not None:
            self._comm_stream.wait_event(event)
        else:
            self._comm_stream.wait_stream(compute)
        return compute

    def _finish(self, compute, async_finish, tensors):
        """After work queued on the comm stream: an event for the caller (async_finish), else the caller's
        stream waits. Tensors the comm stream used stay alive for it (record_stream), as in DeepEP."""
        if async_finish:
            for t in tensors:
                if t is not None:
                    t.record_stream(self._comm_stream)
            return EventOverlap(EventHandle(self._comm_stream))
        compute.wait_stream(self._comm_stream)
        return EventOverlap(None)

    def _allocation(self, allocate_on_comm_stream):
        """Where outputs are allocated: the caller's stream, or the comm stream when asked (DeepEP's flag)."""
        return torch.cuda.stream(self._comm_stream) if allocate_on_comm_stream else contextlib.nullcontext()

    def _num_sms(self, config):
        if config is not None:
            return int(config.num_sms)
        return Buffer.num_sms if Buffer._num_sms_chosen else 0  # 0: the library's measured default

    # ---- epcomm additions -----------------------------------------------------------------------------
    def synchronize(self):
        """Waits for this group's work and raises any error the device recorded (e.g. a timeout naming the
        rank and stage, or expert ids out of range)."""
        _capi.check(self._lib.ep_group_synchronize(self._usable(), _torch.current_stream_ptr(self._device)))

    def barrier(self):
        """A device barrier over the group, ordered after the current stream."""
        _capi.check(self._lib.ep_group_barrier(self._usable(), _torch.current_stream_ptr(self._device)))

    # ---- static helpers (DeepEP's) --------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def set_num_sms(new_num_sms):
        """The SMs (blocks) of the high-throughput kernels when no config is given. Any positive number."""
        if int(new_num_sms) < 1:
            raise ValueError(f"set_num_sms: expected a positive number, got {new_num_sms}")
        Buffer.num_sms = int(new_num_sms)
        Buffer._num_sms_chosen = True

    @staticmethod
    def capture():
        """An event recorded now on the current stream (to pass as previous_event)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks):
        return Buffer._config_for(num_ranks)

    @staticmethod
    def get_combine_config(num_ranks):
        return Buffer._config_for(num_ranks)

    @staticmethod
    def _config_for(num_ranks):
        if num_ranks < 1:
            raise ValueError(f"num_ranks: expected at least 1, got {num_ranks}")
        _config.check_group_size(num_ranks, "num_ranks")
        return Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """Bytes for the low-latency mode (pass as num_rdma_bytes, as with DeepEP; any top-k up to 16)."""
        return _config.low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                         num_topk=_config.MAX_TOPK_LOW_LATENCY):
        """epcomm: the exact low-latency size for a given top-k (ep_low_latency_buffer_bytes)."""
        return _config.low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                                    num_topk)

    @staticmethod
    def get_normal_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk=_config.MAX_TOPK_NORMAL,
                                    elem_bytes=2, num_scales=0):
        """epcomm: the exact normal-mode size (ep_normal_buffer_bytes) for the largest dispatch."""
        return _config.normal_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk, elem_bytes,
                                               num_scales)
