"""Host-side parts of the torch binding that run without a GPU (CPU tensors stand in for device ones)."""
import ctypes

import pytest

torch = pytest.importorskip("torch")

import epcomm  # noqa: E402
from epcomm import _capi, _torch  # noqa: E402
from epcomm.buffer import Buffer  # noqa: E402
from epcomm.event import EventOverlap, cuda_event_of  # noqa: E402
from epcomm.low_latency import LowLatencyHandle, _Args  # noqa: E402
from epcomm.normal import DispatchHandle  # noqa: E402


def test_every_epcomm_dtype_has_a_torch_dtype():
    assert set(_torch.EP_TO_TORCH) == set(_capi.DType)
    assert _torch.TORCH_TO_EP[torch.float8_e4m3fn] == _capi.DType.EP_DTYPE_FLOAT8_E4M3
    assert epcomm.topk_idx_t is torch.int64


def test_a_tensor_is_described_with_its_pointer_shape_and_strides():
    t = torch.zeros((4, 10), dtype=torch.bfloat16)[:, 2:8]
    d = _torch.fill(_capi.ep_tensor_t(), t, "x", device_only=False)
    assert d.data == t.data_ptr() and d.dtype == _capi.DType.EP_DTYPE_BFLOAT16
    assert _capi.tensor_shape(d) == (4, 6) and _capi.tensor_strides(d) == (10, 1)


def test_cpu_tensors_and_foreign_dtypes_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        _torch.describe(torch.zeros(2, 2), "x")
    with pytest.raises(ValueError, match="topk_weights: dtype torch.float16"):
        _torch.fill(_capi.ep_tensor_t(), torch.zeros(2, dtype=torch.float16), "topk_weights", device_only=False)


def test_result_descriptors_become_views_of_the_buffer():
    window = torch.arange(256, dtype=torch.int32).view(torch.uint8)  # 1 KiB standing in for the group buffer
    base = window.data_ptr()
    desc = _capi.make_tensor(base + 64, _capi.DType.EP_DTYPE_INT32, (3, 4))
    view = _torch.view_from_descriptor(window, base, desc)
    assert view.data_ptr() == base + 64 and view.shape == (3, 4)
    assert torch.equal(view, torch.arange(16, 28, dtype=torch.int32).view(3, 4))
    empty = _torch.view_from_descriptor(window, base, _capi.make_tensor(base, _capi.DType.EP_DTYPE_FLOAT32, (0, 8)))
    assert empty.shape == (0, 8)
    with pytest.raises(RuntimeError, match="outside the group buffer"):
        _torch.view_from_descriptor(window, base, _capi.make_tensor(base + 1020, _capi.DType.EP_DTYPE_INT64, (2,)))


def test_event_overlap_without_an_event():
    ev = EventOverlap()
    with ev:
        pass
    with pytest.raises(RuntimeError, match="no event"):
        ev.current_stream_wait()
    assert cuda_event_of(None) is None
    with pytest.raises(TypeError, match="previous_event"):
        cuda_event_of(object())


class _Group:
    """Enough of a ProcessGroup for the constructor's checks before any exchange."""

    def __init__(self, size):
        self._size = size

    def rank(self):
        return 0

    def size(self):
        return self._size


def test_constructor_refuses_unsupported_arguments_before_touching_a_device():
    with pytest.raises(ValueError, match="allow_mnnvl"):
        Buffer(None, 1 << 20, allow_mnnvl=True)
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        Buffer(None, 1 << 20, 1 << 20)
    with pytest.raises(NotImplementedError, match="16 ranks need scale-out"):
        Buffer(_Group(16), 1 << 20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_constructor_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="CUDA"):
        Buffer(None, 1 << 20)


def test_static_helpers_follow_deepep():
    assert Buffer.is_sm90_compiled()
    assert Buffer.get_dispatch_config(4).num_sms == Buffer.num_sms
    assert Buffer.get_combine_config(8).num_sms == Buffer.num_sms
    with pytest.raises(NotImplementedError, match="scale-out"):
        Buffer.get_dispatch_config(16)
    with pytest.raises(ValueError, match="num_ranks: expected at least 1, got 0"):
        Buffer.get_combine_config(0)
    with pytest.raises(NotImplementedError, match="scale-out"):
        epcomm.Config().get_nvl_buffer_size_hint(14336, 9)
    with pytest.raises(ValueError, match="invalid sizes"):  # E above the low-latency limit of 4096
        Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 6144)
    with pytest.raises(ValueError, match="invalid sizes"):  # hidden not a multiple of 128
        Buffer.get_low_latency_rdma_size_hint(128, 7000, 8, 256)
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == \
        _capi.low_latency_buffer_bytes(8, 128, 7168, 16, 256)
    assert Buffer.get_normal_buffer_size_hint(4096, 7168, 8, 8) == _capi.normal_buffer_bytes(8, 4096, 7168, 2, 0, 8)


def test_set_num_sms_makes_config_none_use_it():
    old = (Buffer.num_sms, Buffer._num_sms_chosen)
    try:
        b = Buffer.__new__(Buffer)
        assert b._num_sms(None) == (Buffer.num_sms if Buffer._num_sms_chosen else 0)
        Buffer.set_num_sms(33)
        assert b._num_sms(None) == 33 and b._num_sms(epcomm.Config(12)) == 12
        with pytest.raises(ValueError):
            Buffer.set_num_sms(0)
    finally:
        Buffer.num_sms, Buffer._num_sms_chosen = old


def test_missing_features_raise_not_implemented_naming_the_argument():
    b = Buffer.__new__(Buffer)
    b._group = None
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="zero_copy=True needs get_next_low_latency_combine_buffer"):
        b.low_latency_combine(x, x, x, None, zero_copy=True)
    with pytest.raises(NotImplementedError, match="num_tokens_per_rdma_rank"):
        b.dispatch(x, num_tokens_per_rdma_rank=x)
    with pytest.raises(NotImplementedError, match="enable_shrink"):
        b.low_latency_update_mask_buffer(0, True)
    with pytest.raises(RuntimeError, match="destroyed"):
        b.get_comm_stream()


def test_handles_are_tuples_shaped_like_deepeps():
    src, in_rank = torch.zeros(3, dtype=torch.int32), torch.zeros((2, 4), dtype=torch.bool)
    h = DispatchHandle(src, in_rank, native=None, num_tokens=2, num_topk=8)
    assert len(h) == 6 and h[3] is src and h[4] is in_rank and h[0] is None and h.num_tokens == 2
    info, rng = torch.zeros((2, 8), dtype=torch.int32), torch.zeros((2, 4), dtype=torch.int64)
    ll = LowLatencyHandle(info, rng, 128, 7168, 8, native=None)
    src_info, layout_range, T, H, E = ll
    assert src_info is info and layout_range is rng and (T, H, E) == (128, 7168, 8)


def test_a_pointer_written_into_its_slot_lands_in_its_tensor_field():
    fields = [name for name, kind in _capi.ep_low_latency_dispatch_args_t._fields_ if kind is _capi.ep_tensor_t]
    a = _Args(_capi.ep_low_latency_dispatch_args_t(max_tokens=128))
    for i, field in enumerate(fields):
        a.words[_Args.slot(type(a.args), field)] = 0x1000 * (i + 1)
    for i, field in enumerate(fields):
        assert getattr(a.args, field).data == 0x1000 * (i + 1), field
    assert a.args.max_tokens == 128 and a.args.size == ctypes.sizeof(a.args)
    b = a.copy()
    b.words[_Args.slot(type(b.args), "x")] = 7
    assert b.args.x.data == 7 and a.args.x.data == 0x1000 and b.args.recv_x.data == a.args.recv_x.data


def test_a_half_built_buffer_is_deleted_quietly():
    b = Buffer.__new__(Buffer)
    b.__del__()


class _FakeDriver:
    """Stands in for libcuda: a current context, and a stream creation that fails with `status`."""

    def __init__(self, status):
        self.status = status

    def cuCtxGetCurrent(self, ref):
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_void_p))[0] = 0x1234
        return 0

    def cuStreamCreate(self, ref, flags):
        return self.status


def test_a_context_stream_that_cannot_be_made_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_torch, "_libcuda", _FakeDriver(201))
    with pytest.raises(RuntimeError, match=r"cuStreamCreate in the current CUDA context failed \(CUresult 201\)"):
        _torch.new_context_stream(0)
