"""The ctypes layer against the real libepcomm.so, on a machine without GPUs: loading, every declared
function, status strings, the size functions and argument errors (nothing here needs a device)."""
import ctypes
import re

import pytest


def header_functions(header_path):
    text = open(header_path).read()
    return set(re.findall(r"EP_API\s+[\w\s\*]+?\b(ep_\w+)\s*\(", text))


def test_every_header_function_is_declared(capi, header_path):
    in_header = header_functions(header_path)
    assert len(in_header) > 25
    assert in_header == set(capi.FUNCTIONS), (
        f"only in the header: {sorted(in_header - set(capi.FUNCTIONS))}; "
        f"only in _capi: {sorted(set(capi.FUNCTIONS) - in_header)}")


def test_library_resolves_every_function_with_its_types(capi):
    lib = capi.lib()
    for name, (restype, argtypes) in capi.FUNCTIONS.items():
        fn = getattr(lib, name)
        assert fn.restype is restype, name
        assert fn.argtypes == argtypes, name


def test_status_strings_name_every_status(capi):
    for status in capi.Status:
        text = capi.status_string(status)
        assert text.startswith(status.name + ":"), (status, text)
    assert capi.status_string(99).startswith("EP_ERROR_UNKNOWN")


def test_dtype_sizes_and_names_match_the_mirror(capi):
    lib = capi.lib()
    names = {"EP_DTYPE_BFLOAT16": b"bfloat16", "EP_DTYPE_FLOAT8_E4M3": b"float8_e4m3fn", "EP_DTYPE_FLOAT32": b"float32",
             "EP_DTYPE_INT32": b"int32", "EP_DTYPE_INT64": b"int64", "EP_DTYPE_BOOL": b"bool",
             "EP_DTYPE_UINT8": b"uint8"}
    for dtype in capi.DType:
        assert lib.ep_dtype_size(dtype) == capi.DTYPE_BYTES[dtype]
        assert lib.ep_dtype_name(dtype) == names[dtype.name]
    assert lib.ep_dtype_size(42) == 0
    assert lib.ep_dtype_name(42) == b"unknown"


def test_contiguous_tensor_constructors_agree_with_the_python_helper(capi):
    lib = capi.lib()
    t = lib.ep_tensor_3d(4096, capi.DType.EP_DTYPE_FLOAT32, 2, 3, 5)
    mine = capi.make_tensor(4096, capi.DType.EP_DTYPE_FLOAT32, (2, 3, 5))
    assert (t.data, t.dtype, t.ndim) == (4096, capi.DType.EP_DTYPE_FLOAT32, 3)
    assert capi.tensor_shape(t) == capi.tensor_shape(mine) == (2, 3, 5)
    assert capi.tensor_strides(t) == capi.tensor_strides(mine) == (15, 5, 1)
    one = lib.ep_tensor_1d(None, capi.DType.EP_DTYPE_INT64, 7)
    assert (one.data, one.ndim, one.shape[0], one.strides[0]) == (None, 1, 7, 1)
    two = lib.ep_tensor_2d(16, capi.DType.EP_DTYPE_BOOL, 3, 4)
    assert capi.tensor_strides(two) == (4, 1)


def test_fill_tensor_keeps_strides_and_refuses_five_dims(capi):
    t = capi.make_tensor(64, capi.DType.EP_DTYPE_BFLOAT16, (8, 128), (256, 1))
    assert capi.tensor_shape(t) == (8, 128) and capi.tensor_strides(t) == (256, 1)
    capi.fill_tensor(t, 128, capi.DType.EP_DTYPE_INT32, (3,))
    assert t.ndim == 1 and t.shape[1] == 0 and t.strides[1] == 0
    capi.clear_tensor(t)
    assert t.data is None and t.ndim == 0
    with pytest.raises(ValueError, match="at most 4"):
        capi.make_tensor(0, capi.DType.EP_DTYPE_UINT8, (1, 1, 1, 1, 1))


def expected_normal_bytes(R, T, H, elem, scales, topk):
    # ep_normal_buffer_bytes: 4 quarters (dispatch / combine x 2 parities) of rows sized for the larger row.
    rows = R * T
    dispatch_row = H * elem + scales * 4 + topk * 12 + 4
    combine_row = H * 2 + topk * 4
    quarter = max(dispatch_row, combine_row) * rows + 80
    return 4 * ((quarter + 4095) // 4096 * 4096)


@pytest.mark.parametrize("R,T,H,elem,scales,topk", [(2, 128, 2048, 2, 0, 8), (4, 4096, 7168, 2, 0, 8),
                                                    (8, 1024, 7168, 1, 56, 8), (3, 100, 1000, 2, 0, 32)])
def test_normal_buffer_bytes(capi, R, T, H, elem, scales, topk):
    assert capi.normal_buffer_bytes(R, T, H, elem, scales, topk) == expected_normal_bytes(R, T, H, elem, scales, topk)


def test_normal_buffer_bytes_is_zero_for_invalid_sizes(capi):
    assert capi.normal_buffer_bytes(0, 128, 2048, 2, 0, 8) == 0
    assert capi.normal_buffer_bytes(2, -1, 2048, 2, 0, 8) == 0
    assert capi.normal_buffer_bytes(2, 128, 2048, 0, 0, 8) == 0
    # sizes no dispatch accepts, some of which used to wrap around 2^64 into a small number
    assert capi.normal_buffer_bytes(8, 2**31 - 1, 2**31 - 1, 2, 0, 32) == 0
    assert capi.normal_buffer_bytes(9, 128, 2048, 2, 0, 8) == 0
    assert capi.normal_buffer_bytes(2, 128, 1 << 24, 2, 0, 8) == 0
    assert capi.normal_buffer_bytes(2, 128, 2048, 2, 4097, 8) == 0
    assert capi.normal_buffer_bytes(2, 128, 2048, 2, 0, 33) == 0
    assert capi.normal_buffer_bytes(8, 2**31 - 1, (1 << 24) - 1, 8, 4096, 32) > 0  # the largest: no wrap


def expected_low_latency_bytes(R, T, H, K, E):
    # ep_ll_layout (src/kernels/ll_layout.h): two halves of dispatch slots, combine rows and bookkeeping.
    def align(v, a):
        return (v + a - 1) // a * a

    L = E // R
    slot = align(64 + 2 * H, 16)
    combine_off = align(R * T * slot, 4096)
    comb_row = align(2 * H + 4 * (H // 128), 16)  # bf16 payload, then one LogFMT word per 128 channels
    count_off = align(combine_off + T * K * comb_row, 4096)
    srck_off = align(count_off + L * 4, 16)
    range_off = align(srck_off + L * R * T * 4, 16)
    rowk_off = align(range_off + L * R * 8, 16)  # per (source, token, k): the row of the expert named there
    heads_off = align(rowk_off + R * T * K * 4, 16)  # per (source, token): a copy of the slot's 64-byte header
    weights_off = align(heads_off + R * T * 64, 16)  # the per-rank combine's weights from each source
    return 2 * align(weights_off + R * T * K * 4, 4096)


@pytest.mark.parametrize("R,T,H,K,E", [(2, 128, 2048, 8, 32), (8, 128, 7168, 8, 256), (4, 1, 128, 16, 4)])
def test_low_latency_buffer_bytes(capi, R, T, H, K, E):
    assert capi.low_latency_buffer_bytes(R, T, H, K, E) == expected_low_latency_bytes(R, T, H, K, E)


def test_low_latency_buffer_bytes_is_zero_for_invalid_sizes(capi):
    assert capi.low_latency_buffer_bytes(4, 0, 2048, 8, 32) == 0
    assert capi.low_latency_buffer_bytes(4, 128, 2048, 8, 2) == 0  # fewer experts than ranks
    # what a low-latency dispatch refuses: hidden not a multiple of 128, top-k above 16, experts not a multiple
    # of the ranks or above 4096, more than 8 ranks
    assert capi.low_latency_buffer_bytes(2, 16, 100, 4, 8) == 0
    assert "hidden: expected a multiple of 128, got 100" in capi.last_error()  # the size named
    assert capi.low_latency_buffer_bytes(2, 16, 7000, 4, 8) == 0
    assert capi.low_latency_buffer_bytes(2, 16, 512, 17, 8) == 0
    assert capi.low_latency_buffer_bytes(2, 16, 512, 4, 3) == 0
    assert capi.low_latency_buffer_bytes(8, 128, 7168, 8, 6144) == 0
    assert capi.low_latency_buffer_bytes(9, 128, 7168, 8, 288) == 0


def expect_error(call, status, *words):
    from epcomm._capi import EpcommError

    with pytest.raises(EpcommError) as info:
        call()
    assert info.value.status == status, str(info.value)
    for word in words:
        assert word in info.value.message, (word, info.value.message)
    return info.value


def test_dispatch_with_a_null_group_names_the_group(capi):
    lib, S = capi.lib(), capi.Status
    args, result = capi.ep_dispatch_args_t(), capi.ep_dispatch_result_t()
    err = expect_error(lambda: capi.check(lib.ep_dispatch(None, ctypes.byref(args), ctypes.byref(result), None)),
                       S.EP_ERROR_INVALID_ARGUMENT, "group")
    assert "EP_ERROR_INVALID_ARGUMENT" in str(err) and "group" in str(err)


@pytest.mark.parametrize("name", ["ep_combine", "ep_low_latency_dispatch_hook", "ep_low_latency_combine_hook",
                                  "ep_group_barrier", "ep_group_synchronize", "ep_group_get_async_error",
                                  "ep_low_latency_dispatch", "ep_low_latency_combine", "ep_get_dispatch_layout",
                                  "ep_clean_low_latency_buffer", "ep_group_stream", "ep_group_local_buffer"])
def test_every_group_operation_refuses_a_null_group(capi, name):
    fn = getattr(capi.lib(), name)
    nulls = [None] * len(fn.argtypes)
    if name == "ep_low_latency_dispatch":  # checks its handle output after the group
        nulls[2] = ctypes.byref(ctypes.c_void_p())
    if name == "ep_clean_low_latency_buffer":
        nulls = [None, 128, 2048, 8, 32, None]
    if name == "ep_get_dispatch_layout":
        nulls[2] = 32
    expect_error(lambda: capi.check(fn(*nulls)), capi.Status.EP_ERROR_INVALID_ARGUMENT, "group")


def test_destroying_null_is_a_no_op(capi):
    lib = capi.lib()
    for name in ("ep_group_destroy", "ep_handle_destroy", "ep_ll_handle_destroy"):
        assert getattr(lib, name)(None) == 0, name
    assert capi.last_error() == ""


def test_the_last_error_is_cleared_by_the_next_call(capi):
    lib = capi.lib()
    assert lib.ep_dispatch(None, None, None, None) != 0
    assert capi.last_error() != ""
    assert lib.ep_handle_destroy(None) == 0
    assert capi.last_error() == ""


def create(capi, config, num_ranks=2, rank=0, device=0, uid=None):
    uid = uid if uid is not None else capi.ep_unique_id_t()
    group = ctypes.c_void_p()
    capi.check(capi.lib().ep_group_create(ctypes.byref(uid), num_ranks, rank, device, ctypes.byref(config),
                                          ctypes.byref(group)))


def test_group_create_refuses_an_rdma_buffer(capi):
    cfg = capi.ep_group_config_t(num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20)
    expect_error(lambda: create(capi, cfg), capi.Status.EP_ERROR_UNSUPPORTED, "num_rdma_bytes")


def test_group_create_refuses_a_config_without_its_size(capi):
    cfg = capi.ep_group_config_t()
    cfg.size = 0
    expect_error(lambda: create(capi, cfg), capi.Status.EP_ERROR_INVALID_ARGUMENT, "ep_group_config_t.size")


def test_group_create_refuses_a_rank_outside_the_group(capi):
    cfg = capi.ep_group_config_t(num_nvl_bytes=1 << 20)
    expect_error(lambda: create(capi, cfg, num_ranks=2, rank=2), capi.Status.EP_ERROR_INVALID_ARGUMENT, "rank")


def test_group_create_refuses_a_null_output(capi):
    cfg = capi.ep_group_config_t(num_nvl_bytes=1 << 20)
    uid = capi.ep_unique_id_t()
    status = capi.lib().ep_group_create(ctypes.byref(uid), 2, 0, 0, ctypes.byref(cfg), None)
    expect_error(lambda: capi.check(status), capi.Status.EP_ERROR_INVALID_ARGUMENT, "group")


def test_struct_initialisers_set_their_size(capi):
    for cls in capi.PUBLIC_STRUCTS:
        if "size" in dict(cls._fields_):
            assert cls().size == ctypes.sizeof(cls), cls.__name__


def test_unique_ids_are_fresh_128_byte_strings(capi):
    a, b = capi.new_unique_id(), capi.new_unique_id()
    assert len(a) == len(b) == capi.EP_UNIQUE_ID_BYTES and a != b
    uid = capi.unique_id_from_bytes(a)
    assert ctypes.string_at(ctypes.addressof(uid), capi.EP_UNIQUE_ID_BYTES) == a
    with pytest.raises(ValueError, match="128 bytes"):
        capi.unique_id_from_bytes(b"short")


def test_library_search_honours_epcomm_library_alone(capi, monkeypatch, tmp_path):
    missing = str(tmp_path / "libepcomm.so")
    monkeypatch.setenv("EPCOMM_LIBRARY", missing)
    assert capi.candidate_paths() == [missing]  # no fallback to another build
    monkeypatch.setattr(capi, "_lib", None)  # as if not loaded yet (restored after the test)
    with pytest.raises(OSError, match="EPCOMM_LIBRARY=.*does not load") as e:
        capi.load_library()
    assert missing in str(e.value) and "libepcomm.so.0" not in str(e.value), "the system loader was tried"
    with pytest.raises(OSError, match="EPCOMM_LIBRARY"):
        capi.load_library(str(tmp_path / "missing.so"))


def test_asan_builds_are_skipped_unless_libasan_is_preloaded(capi, monkeypatch, tmp_path):
    fake = tmp_path / "libepcomm.so"
    fake.write_bytes(b"\x7fELF....libasan.so.8\x00....")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert capi._needs_asan(str(fake))
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libasan.so.8")
    assert not capi._needs_asan(str(fake))
