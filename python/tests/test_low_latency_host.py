"""Buffer.low_latency_dispatch / low_latency_combine on the CPU against a fake library that records what each
C call was given: the cached argument structs, the output tensors cut from shared allocations (every byte the
C side may write lands in the right tensor, and in no other), fresh outputs per call, the two reused output
sets, and handle release. CPU tensors stand in for device ones (the device check is switched off here)."""
import ctypes

import pytest

torch = pytest.importorskip("torch")

from epcomm import _capi, _torch, low_latency  # noqa: E402
from epcomm._handles import HandleBook  # noqa: E402
from epcomm.buffer import Buffer, _handle_releaser  # noqa: E402

R, T, H, K = 2, 8, 1024, 4
E = 4 * R
L, RT = E // R, R * T
OUTPUTS = ("recv_x", "recv_x_scales", "recv_count", "src_info", "layout_range")


class FakeLib:
    """The low-latency entry points: each call records a copy of its argument struct; dispatch fills every
    output descriptor's bytes with its own value (1 + its index in OUTPUTS) and returns a new handle."""

    def __init__(self):
        self.dispatches, self.combines, self.destroyed = [], [], []
        self.next_handle = 0x1000

    def ep_low_latency_dispatch(self, group, args_ref, handle_ref, launch_ref):
        args = type(args_ref._obj).from_buffer_copy(args_ref._obj)
        self.dispatches.append(args)
        for i, name in enumerate(OUTPUTS):
            desc = getattr(args, name)
            if desc.data:
                ctypes.memset(desc.data, i + 1, span_bytes(desc))
        self.next_handle += 16
        handle_ref._obj.value = self.next_handle
        return 0

    def ep_low_latency_combine(self, group, args_ref, native, launch_ref):
        self.combines.append((type(args_ref._obj).from_buffer_copy(args_ref._obj), native))
        return 0

    def ep_ll_handle_destroy(self, ptr):
        self.destroyed.append(ptr)
        return 0

    def ep_handle_destroy(self, ptr):
        return 0


def span_bytes(desc):
    shape, strides = _capi.tensor_shape(desc), _capi.tensor_strides(desc)
    return (1 + sum((n - 1) * s for n, s in zip(shape, strides))) * _capi.DTYPE_BYTES[_capi.DType(desc.dtype)]


@pytest.fixture
def make_buffer(monkeypatch):
    fill = _torch.fill
    monkeypatch.setattr(_torch, "fill", lambda desc, t, name, device_only=True: fill(desc, t, name, False))
    monkeypatch.setattr(low_latency, "fill", _torch.fill)
    monkeypatch.setattr(low_latency, "current_stream_ptr", lambda device: 0)

    def make(reuse=False):
        lib = FakeLib()
        b = Buffer.__new__(Buffer)
        b._group, b._lib, b.rank, b.group_size, b._device = 0xABC, lib, 0, R, 0
        b.low_latency_mode, b.explicitly_destroy, b.low_latency_reuse_outputs = True, True, reuse
        b._buffer_bytes, b._window = 1 << 30, None
        b._launch_comm = _capi.ep_launch_t()
        b._book = HandleBook(_handle_releaser(lib), lambda kind: kind == "ht")
        b._init_low_latency()
        return b, lib

    return make


def inputs(n, seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    x = torch.randn((n, H), generator=g).to(torch.bfloat16)
    return x, torch.randint(0, E, (n, K), generator=g), torch.rand((n, K), generator=g)


def described(desc):
    return desc.data, _capi.DType(desc.dtype), _capi.tensor_shape(desc), _capi.tensor_strides(desc)


@pytest.mark.parametrize("use_fp8,use_ue8m0", [(False, False), (True, False), (True, True)],
                         ids=["bf16", "fp8", "ue8m0"])
def test_fresh_dispatch_outputs_are_what_the_c_call_was_given_and_new_each_call(make_buffer, use_fp8, use_ue8m0):
    b, lib = make_buffer()
    x, idx, _ = inputs(5)
    results = [b.low_latency_dispatch(x, idx, T, E, use_fp8=use_fp8, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
               for _ in range(2)]
    for (recv, count, handle, event, hook), args in zip(results, lib.dispatches):
        recv_x, scales = recv if use_fp8 else (recv, None)
        src_info, layout_range, t, h, e = handle
        assert (t, h, e) == (T, H, E) and hook is None and event.event is None
        assert args.x.data == x.data_ptr() and args.topk_idx.data == idx.data_ptr()
        assert (args.max_tokens, args.num_experts, args.use_fp8, args.use_ue8m0) == (T, E, use_fp8, use_ue8m0)
        assert recv_x.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
        assert described(args.recv_x)[1:] == (_torch.TORCH_TO_EP[recv_x.dtype], (L, RT, H), (RT * H, H, 1))
        assert recv_x.shape == (L, RT, H) and recv_x.is_contiguous() and recv_x.data_ptr() == args.recv_x.data
        if use_fp8:  # returned [L, R*T, S] column-major in the last two dims; given to C as [L, S, R*T]
            S = H // (512 if use_ue8m0 else 128)
            assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
            assert scales.shape == (L, RT, S) and scales.stride() == (S * RT, 1, RT)
            assert described(args.recv_x_scales)[1:] == (_torch.TORCH_TO_EP[scales.dtype], (L, S, RT), (S * RT, RT, 1))
            assert scales.data_ptr() == args.recv_x_scales.data and args.recv_x_scales.data % 4 == 0
        else:
            assert args.recv_x_scales.data is None and args.recv_x_scales.ndim == 0
        assert count.shape == (L,) and count.dtype == torch.int32 and count.data_ptr() == args.recv_count.data
        assert src_info.shape == (L, RT) and src_info.dtype == torch.int32 and src_info.data_ptr() == args.src_info.data
        assert layout_range.shape == (L, R) and layout_range.dtype == torch.int64
        assert layout_range.data_ptr() == args.layout_range.data and args.layout_range.data % 8 == 0
        assert args.recv_x.data % 16 == 0
        # Every byte the C side wrote is in its own tensor: nothing overlaps, nothing is left out.
        for i, t in enumerate((recv_x, scales, count, src_info, layout_range)):
            if t is not None:
                assert (t.contiguous().view(torch.uint8) == i + 1).all(), OUTPUTS[i]
    first, second = (r[0][0] if use_fp8 else r[0] for r in results)
    assert first.data_ptr() != second.data_ptr()  # DeepEP's semantics: fresh tensors every call
    assert results[0][2][0].data_ptr() != results[1][2][0].data_ptr()


def test_reused_outputs_alternate_between_two_sets(make_buffer):
    b, lib = make_buffer(reuse=True)
    x, idx, _ = inputs(5)
    x2, idx2, _ = inputs(3, seed=1)  # another N: another plan, the same two output sets
    r = [b.low_latency_dispatch(*xi, T, E) for xi in ((x, idx), (x2, idx2), (x, idx), (x2, idx2))]
    ptrs = [res[0][0].data_ptr() for res in r]
    assert ptrs[0] == ptrs[2] != ptrs[1] == ptrs[3]
    assert r[0][0][0] is r[2][0][0] and r[0][2][0] is r[2][2][0]
    for res, args, (xi, ii) in zip(r, lib.dispatches, ((x, idx), (x2, idx2)) * 2):
        assert args.recv_x.data == res[0][0].data_ptr() and args.src_info.data == res[2][0].data_ptr()
        assert args.x.data == xi.data_ptr() and args.topk_idx.data == ii.data_ptr()
        assert _capi.tensor_shape(args.x) == tuple(xi.shape)
    assert len(b._ll_dispatch_plans) == 2 and len(b._ll_layouts) == 1


def test_plans_follow_shapes_strides_dtypes_and_optional_tensors(make_buffer):
    b, lib = make_buffer()
    x, idx, _ = inputs(6)
    b.low_latency_dispatch(x, idx, T, E)
    b.low_latency_dispatch(x[:4], idx[:4], T, E)
    wide = torch.zeros((6, 2 * K), dtype=torch.int64)
    strided = wide[:, ::2]
    strided.copy_(idx)
    b.low_latency_dispatch(x, strided, T, E)
    stats = torch.zeros(L, dtype=torch.int32)
    waits = torch.zeros(R, dtype=torch.int64)
    b.low_latency_dispatch(x, idx, T, E, cumulative_local_expert_recv_stats=stats, dispatch_wait_recv_cost_stats=waits)
    b.low_latency_dispatch(x, idx, T, E)
    assert len(b._ll_dispatch_plans) == 4
    a = lib.dispatches
    assert _capi.tensor_shape(a[1].x) == (4, H) and _capi.tensor_shape(a[1].topk_idx) == (4, K)
    assert _capi.tensor_strides(a[2].topk_idx) == (2 * K, 2) and a[2].topk_idx.data == strided.data_ptr()
    assert a[3].cumulative_local_expert_recv_stats.data == stats.data_ptr()
    assert a[3].dispatch_wait_recv_cost_stats.data == waits.data_ptr()
    assert a[4].cumulative_local_expert_recv_stats.data is None and a[4].dispatch_wait_recv_cost_stats.data is None
    with pytest.raises(ValueError, match="num_experts"):
        b.low_latency_dispatch(x, idx, T, E + 1)


def test_combine_fresh_and_given_out(make_buffer):
    b, lib = make_buffer()
    x, idx, w = inputs(5)
    _, _, handle, _, _ = b.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    y = torch.randn((L, RT, H)).to(torch.bfloat16)
    outs = [b.low_latency_combine(y, idx, w, handle)[0] for _ in range(2)]
    given = torch.empty((5, H), dtype=torch.bfloat16)
    out, event, hook = b.low_latency_combine(y, idx, w, handle, out=given)
    assert out is given and event.event is None and hook is None
    assert outs[0].shape == (5, H) and outs[0].dtype == torch.bfloat16 and outs[0].data_ptr() != outs[1].data_ptr()
    for (args, native), o in zip(lib.combines, outs + [given]):
        assert native == handle._native.ptr
        assert (args.x.data, args.topk_idx.data, args.topk_weights.data, args.out.data) == (
            y.data_ptr(), idx.data_ptr(), w.data_ptr(), o.data_ptr())
        assert described(args.out)[1:] == (_capi.DType.EP_DTYPE_BFLOAT16, (5, H), (H, 1))
    with pytest.raises(TypeError, match="low_latency_dispatch"):
        b.low_latency_combine(y, idx, w, tuple(handle))


def test_dropped_handles_are_released_and_destroy_disarms_live_ones(make_buffer):
    b, lib = make_buffer()
    x, idx, w = inputs(5)
    handles = [b.low_latency_dispatch(x, idx, T, E, use_fp8=False)[2] for _ in range(3)]
    ptrs = [h._native.ptr for h in handles]
    del handles[0]
    assert lib.destroyed == [ptrs[0]]
    assert b._book.release_all() is None
    assert sorted(lib.destroyed) == sorted(ptrs)
    with pytest.raises(RuntimeError, match="destroyed"):
        b.low_latency_combine(torch.zeros((L, RT, H), dtype=torch.bfloat16), idx, w, handles[0])
    del handles
    assert sorted(lib.destroyed) == sorted(ptrs)  # nothing released twice
