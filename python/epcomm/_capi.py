"""ctypes mirror of include/epcomm.h: the library, its structs, enums and functions. No torch here.

Everything the header declares is declared here with the same names (struct classes are named like the C
typedefs), so that reading one next to the other is enough to review them; python/tests/test_abi.py compiles
the header and checks every size and field offset against these classes.
"""
import ctypes
import ctypes.util
import enum
import glob
import os
import threading

# ----------------------------------------------------------------------------------------------------------
# Enums and constants
# ----------------------------------------------------------------------------------------------------------
EP_VERSION_MAJOR = 0
EP_VERSION_MINOR = 1
EP_VERSION_PATCH = 0
EP_VERSION_CODE = EP_VERSION_MAJOR * 10000 + EP_VERSION_MINOR * 100 + EP_VERSION_PATCH
EP_MAX_DIMS = 4
EP_UNIQUE_ID_BYTES = 128


class Status(enum.IntEnum):
    EP_SUCCESS = 0
    EP_ERROR_INVALID_ARGUMENT = 1
    EP_ERROR_BUFFER_TOO_SMALL = 2
    EP_ERROR_UNSUPPORTED = 3
    EP_ERROR_CUDA = 4
    EP_ERROR_NCCL = 5
    EP_ERROR_TIMEOUT = 6
    EP_ERROR_OUT_OF_MEMORY = 7
    EP_ERROR_IN_PROGRESS = 8
    EP_ERROR_PEER_UNREACHABLE = 9
    EP_ERROR_VERSION_MISMATCH = 10
    EP_ERROR_DEVICE_INPUT = 11
    EP_ERROR_GROUP_FAILED = 12
    EP_ERROR_INTERNAL = 13


class DType(enum.IntEnum):
    EP_DTYPE_BFLOAT16 = 0
    EP_DTYPE_FLOAT8_E4M3 = 1
    EP_DTYPE_FLOAT32 = 2
    EP_DTYPE_INT32 = 3
    EP_DTYPE_INT64 = 4
    EP_DTYPE_BOOL = 5
    EP_DTYPE_UINT8 = 6


DTYPE_BYTES = {DType.EP_DTYPE_BFLOAT16: 2, DType.EP_DTYPE_FLOAT8_E4M3: 1, DType.EP_DTYPE_FLOAT32: 4,
               DType.EP_DTYPE_INT32: 4, DType.EP_DTYPE_INT64: 8, DType.EP_DTYPE_BOOL: 1, DType.EP_DTYPE_UINT8: 1}

# ----------------------------------------------------------------------------------------------------------
# Structs (same names, fields and order as the header)
# ----------------------------------------------------------------------------------------------------------
_i64x4 = ctypes.c_int64 * EP_MAX_DIMS


class ep_tensor_t(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int),
                ("shape", _i64x4), ("strides", _i64x4)]


class ep_unique_id_t(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * EP_UNIQUE_ID_BYTES)]


class _Sized(ctypes.Structure):
    """A public struct whose first field is `size`: constructing one is the header's *_INIT macro."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = ctypes.sizeof(type(self))


class ep_group_config_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("num_nvl_bytes", ctypes.c_size_t), ("num_rdma_bytes", ctypes.c_size_t),
                ("low_latency_mode", ctypes.c_int), ("num_sms", ctypes.c_int), ("timeout_ms", ctypes.c_int64),
                ("comm_stream", ctypes.c_void_p)]


class ep_launch_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("stream", ctypes.c_void_p), ("previous_event", ctypes.c_void_p),
                ("async_finish", ctypes.c_int), ("finish_event", ctypes.c_void_p)]


class ep_dispatch_args_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("x", ep_tensor_t), ("x_scales", ep_tensor_t),
                ("topk_idx", ep_tensor_t), ("topk_weights", ep_tensor_t), ("num_tokens_per_rank", ep_tensor_t),
                ("is_token_in_rank", ep_tensor_t), ("num_tokens_per_expert", ep_tensor_t),
                ("num_experts", ctypes.c_int), ("expert_alignment", ctypes.c_int),
                ("num_worst_tokens", ctypes.c_int), ("num_sms", ctypes.c_int), ("cached_handle", ctypes.c_void_p)]


class ep_dispatch_result_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("num_recv_tokens", ctypes.c_int), ("num_rows", ctypes.c_int),
                ("recv_x", ep_tensor_t), ("recv_x_scales", ep_tensor_t), ("recv_topk_idx", ep_tensor_t),
                ("recv_topk_weights", ep_tensor_t), ("recv_src_idx", ep_tensor_t),
                ("num_recv_tokens_per_expert", ctypes.POINTER(ctypes.c_int32)), ("handle", ctypes.c_void_p)]


class ep_combine_args_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("x", ep_tensor_t), ("topk_weights", ep_tensor_t),
                ("bias0", ep_tensor_t), ("bias1", ep_tensor_t), ("out", ep_tensor_t),
                ("out_topk_weights", ep_tensor_t), ("handle", ctypes.c_void_p), ("num_sms", ctypes.c_int)]


class ep_low_latency_dispatch_args_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("x", ep_tensor_t), ("topk_idx", ep_tensor_t),
                ("max_tokens", ctypes.c_int), ("num_experts", ctypes.c_int), ("use_fp8", ctypes.c_int),
                ("round_scale", ctypes.c_int), ("use_ue8m0", ctypes.c_int), ("return_recv_hook", ctypes.c_int),
                ("recv_x", ep_tensor_t), ("recv_x_scales", ep_tensor_t), ("recv_count", ep_tensor_t),
                ("src_info", ep_tensor_t), ("layout_range", ep_tensor_t),
                ("cumulative_local_expert_recv_stats", ep_tensor_t), ("dispatch_wait_recv_cost_stats", ep_tensor_t)]


class ep_low_latency_combine_args_t(_Sized):
    _fields_ = [("size", ctypes.c_size_t), ("x", ep_tensor_t), ("topk_idx", ep_tensor_t),
                ("topk_weights", ep_tensor_t), ("out", ep_tensor_t), ("return_recv_hook", ctypes.c_int),
                ("combine_wait_recv_cost_stats", ep_tensor_t), ("use_logfmt", ctypes.c_int)]


PUBLIC_STRUCTS = (ep_tensor_t, ep_unique_id_t, ep_group_config_t, ep_launch_t, ep_dispatch_args_t,
                  ep_dispatch_result_t, ep_combine_args_t, ep_low_latency_dispatch_args_t,
                  ep_low_latency_combine_args_t)

# ----------------------------------------------------------------------------------------------------------
# Functions: name -> (restype, argtypes)
# ----------------------------------------------------------------------------------------------------------
_st = ctypes.c_int  # ep_status_t
_vp = ctypes.c_void_p  # opaque handles, streams, events
_ip = ctypes.POINTER(ctypes.c_int)
_P = ctypes.POINTER

FUNCTIONS = {
    "ep_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "ep_last_error": (ctypes.c_char_p, []),
    "ep_dtype_size": (ctypes.c_size_t, [ctypes.c_int]),
    "ep_dtype_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ep_tensor_1d": (ep_tensor_t, [_vp, ctypes.c_int, ctypes.c_int64]),
    "ep_tensor_2d": (ep_tensor_t, [_vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
    "ep_tensor_3d": (ep_tensor_t, [_vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
    "ep_get_unique_id": (_st, [_P(ep_unique_id_t)]),
    "ep_get_local_unique_id": (_st, [_P(ep_unique_id_t)]),  # in-process groups (LocalGroup)
    "ep_group_create": (_st, [_P(ep_unique_id_t), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              _P(ep_group_config_t), _P(_vp)]),
    "ep_group_create_from_comm": (_st, [_vp, ctypes.c_int, _P(ep_group_config_t), _P(_vp)]),
    "ep_group_destroy": (_st, [_vp]),
    "ep_group_rank": (_st, [_vp, _ip]),
    "ep_group_size": (_st, [_vp, _ip]),
    "ep_group_stream": (_st, [_vp, _P(_vp)]),
    "ep_group_local_buffer": (_st, [_vp, _P(_vp), _P(ctypes.c_size_t)]),
    "ep_group_barrier": (_st, [_vp, _vp]),
    "ep_group_synchronize": (_st, [_vp, _vp]),
    "ep_group_get_async_error": (_st, [_vp]),
    "ep_get_dispatch_layout": (_st, [_vp, _P(ep_tensor_t), ctypes.c_int, _P(ep_tensor_t), _P(ep_tensor_t),
                                     _P(ep_tensor_t), _P(ep_tensor_t), _P(ep_launch_t)]),
    "ep_normal_buffer_bytes": (ctypes.c_size_t, [ctypes.c_int] * 6),
    "ep_dispatch": (_st, [_vp, _P(ep_dispatch_args_t), _P(ep_dispatch_result_t), _P(ep_launch_t)]),
    "ep_combine": (_st, [_vp, _P(ep_combine_args_t), _P(ep_launch_t)]),
    "ep_autotune_normal": (_st, [_vp, _P(ep_dispatch_args_t), _ip, ctypes.c_int, _ip,
                                 _P(ctypes.c_float), _P(ep_launch_t)]),
    "ep_handle_info": (_st, [_vp, _ip, _ip, _ip]),
    "ep_handle_destroy": (_st, [_vp]),
    "ep_low_latency_buffer_bytes": (ctypes.c_size_t, [ctypes.c_int] * 5),
    "ep_low_latency_dispatch": (_st, [_vp, _P(ep_low_latency_dispatch_args_t), _P(_vp), _P(ep_launch_t)]),
    "ep_low_latency_dispatch_hook": (_st, [_vp, _vp, _P(ep_launch_t)]),
    "ep_low_latency_combine": (_st, [_vp, _P(ep_low_latency_combine_args_t), _vp, _P(ep_launch_t)]),
    "ep_low_latency_combine_hook": (_st, [_vp, _vp, _P(ep_launch_t)]),
    "ep_ll_handle_destroy": (_st, [_vp]),
    "ep_clean_low_latency_buffer": (_st, [_vp, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _vp]),
}

# ----------------------------------------------------------------------------------------------------------
# Finding and loading libepcomm.so
# ----------------------------------------------------------------------------------------------------------
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(os.path.dirname(_PACKAGE_DIR))  # python/epcomm -> the repository
_lib = None
_lib_lock = threading.Lock()


def _needs_asan(path):
    """An ASan-built library aborts the process when loaded without LD_PRELOAD of libasan: skip those."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        with open(path, "rb") as f:
            return b"libasan.so" in f.read()
    except OSError:
        return True


def candidate_paths():
    """Where the library is looked for, in order (see README: EPCOMM_LIBRARY, the package, build folders).
    EPCOMM_LIBRARY, when set, is the only candidate: a path that does not load is an error, not a reason to
    load some other build."""
    env = os.environ.get("EPCOMM_LIBRARY")
    if env:
        return [env]
    found = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "lib", "libepcomm.so*")), key=len)
    builds = glob.glob(os.path.join(_REPO_ROOT, "build*", "src", "libepcomm.so"))
    builds.sort(key=os.path.getmtime, reverse=True)  # the newest build first
    found += [p for p in builds if not _needs_asan(p)]
    return found


def _declare(lib):
    for name, (restype, argtypes) in FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def _load_first(names, tried):
    """The first of `names` that loads (declared), or None; each failure is appended to `tried`."""
    global _lib
    for name in names:
        if not name:
            continue
        try:
            _lib = _declare(ctypes.CDLL(name))
            _lib._epcomm_path = name
            return _lib
        except OSError as e:
            tried.append(f"{name}: {e}")
    return None


def load_library(path=None):
    """Loads libepcomm (once per process) and declares every function. `path` overrides the search."""
    with _lib_lock:
        if _lib is not None and path is None:
            return _lib
        tried = []
        if _load_first([path] if path else candidate_paths(), tried) is not None:
            return _lib
        explicit = os.environ.get("EPCOMM_LIBRARY") if path is None else None
        if explicit:
            raise OSError(f"epcomm: EPCOMM_LIBRARY={explicit} does not load (unset it to search the package and the "
                          f"build folders): {tried[0]}")
        # last: the system loader (LD_LIBRARY_PATH, ldconfig, cmake --install prefix)
        if path is None and _load_first(("libepcomm.so", "libepcomm.so.0", ctypes.util.find_library("epcomm")),
                                        tried) is not None:
            return _lib
        raise OSError("epcomm: could not load libepcomm.so; set EPCOMM_LIBRARY to its path, copy it into "
                      f"{os.path.join(_PACKAGE_DIR, 'lib')}, or put it on LD_LIBRARY_PATH. Tried:\n  " +
                      "\n  ".join(tried or ["(no candidates)"]))


def lib():
    return _lib if _lib is not None else load_library()


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
class EpcommError(RuntimeError):
    """A failed epcomm call: `status` (a Status) and `message` (ep_last_error() of the failing call)."""

    def __init__(self, status, message):
        try:
            self.status = Status(status)
        except ValueError:
            self.status = status
        self.message = message
        super().__init__(f"{status_string(status)} -- {message}" if message else status_string(status))


def status_string(status):
    return lib().ep_status_string(int(status)).decode()


def last_error():
    return lib().ep_last_error().decode(errors="replace")


def check(status):
    """Raises EpcommError for a failed status; the message is read at once (it is per thread, per call)."""
    if status != 0:
        raise EpcommError(status, last_error())


# ----------------------------------------------------------------------------------------------------------
# Tensor descriptors
# ----------------------------------------------------------------------------------------------------------
def contiguous_strides(shape):
    strides, step = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = step
        step *= shape[i]
    return strides


def fill_tensor(desc, data_ptr, dtype, shape, strides=None):
    """Writes a descriptor in place (the hot paths reuse their structs). Strides are in elements."""
    ndim = len(shape)
    if ndim > EP_MAX_DIMS:
        raise ValueError(f"epcomm tensors have at most {EP_MAX_DIMS} dimensions, got shape {tuple(shape)}")
    if strides is None:
        strides = contiguous_strides(shape)
    desc.data = data_ptr or None
    desc.dtype = int(dtype)
    desc.ndim = ndim
    for i in range(ndim):
        desc.shape[i] = shape[i]
        desc.strides[i] = strides[i]
    for i in range(ndim, EP_MAX_DIMS):
        desc.shape[i] = 0
        desc.strides[i] = 0
    return desc


def make_tensor(data_ptr, dtype, shape, strides=None):
    return fill_tensor(ep_tensor_t(), data_ptr, dtype, shape, strides)


def clear_tensor(desc):
    """An absent optional tensor: data NULL (the header's convention)."""
    ctypes.memset(ctypes.addressof(desc), 0, ctypes.sizeof(desc))
    return desc


def tensor_shape(desc):
    return tuple(desc.shape[i] for i in range(desc.ndim))


def tensor_strides(desc):
    return tuple(desc.strides[i] for i in range(desc.ndim))


# ----------------------------------------------------------------------------------------------------------
# Small conveniences over the size functions and the unique id (used by Config, Buffer and the tests)
# ----------------------------------------------------------------------------------------------------------
def normal_buffer_bytes(num_ranks, max_tokens_per_rank, hidden, elem_bytes, num_scales, topk):
    return lib().ep_normal_buffer_bytes(num_ranks, max_tokens_per_rank, hidden, elem_bytes, num_scales, topk)


def low_latency_buffer_bytes(num_ranks, max_tokens_per_rank, hidden, topk, num_experts):
    return lib().ep_low_latency_buffer_bytes(num_ranks, max_tokens_per_rank, hidden, topk, num_experts)


def new_unique_id(local=False):
    """128 bytes to send to every rank (ep_get_unique_id makes no CUDA call); with `local`, the id of an
    in-process group (ep_get_local_unique_id: ranks as threads of this process)."""
    uid = ep_unique_id_t()
    make = lib().ep_get_local_unique_id if local else lib().ep_get_unique_id
    check(make(ctypes.byref(uid)))
    # Not uid.internal: ctypes cuts char arrays at the first NUL byte.
    return ctypes.string_at(ctypes.addressof(uid), EP_UNIQUE_ID_BYTES)


def unique_id_from_bytes(data):
    if not isinstance(data, (bytes, bytearray)) or len(data) != EP_UNIQUE_ID_BYTES:
        raise ValueError(f"unique id: expected {EP_UNIQUE_ID_BYTES} bytes, got {type(data).__name__} "
                         f"of length {len(data) if hasattr(data, '__len__') else '?'}")
    uid = ep_unique_id_t()
    ctypes.memmove(ctypes.addressof(uid), bytes(data), EP_UNIQUE_ID_BYTES)
    return uid
