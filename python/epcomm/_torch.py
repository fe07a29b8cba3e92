"""torch tensors and streams as epcomm sees them: dtype map, descriptors, raw pointers."""
import ctypes

import torch

from . import _capi

_D = _capi.DType
TORCH_TO_EP = {
    torch.bfloat16: _D.EP_DTYPE_BFLOAT16,
    torch.float8_e4m3fn: _D.EP_DTYPE_FLOAT8_E4M3,
    torch.float32: _D.EP_DTYPE_FLOAT32,
    torch.int32: _D.EP_DTYPE_INT32,
    torch.int64: _D.EP_DTYPE_INT64,
    torch.bool: _D.EP_DTYPE_BOOL,
    torch.uint8: _D.EP_DTYPE_UINT8,
}
EP_TO_TORCH = {v: k for k, v in TORCH_TO_EP.items()}


def ep_dtype(dtype, name):
    try:
        return TORCH_TO_EP[dtype]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in TORCH_TO_EP)
        raise ValueError(f"{name}: dtype {dtype} is not one epcomm takes ({names})") from None


def fill(desc, t, name, device_only=True):
    """Describes torch tensor `t` in ep_tensor_t `desc` (data pointer, dtype, shape, strides in elements)."""
    if device_only and not t.is_cuda:
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    return _capi.fill_tensor(desc, t.data_ptr(), ep_dtype(t.dtype, name), t.shape, t.stride())


def fill_optional(desc, t, name):
    return _capi.clear_tensor(desc) if t is None else fill(desc, t, name)


def describe(t, name):
    return fill(_capi.ep_tensor_t(), t, name)


try:  # the raw cudaStream_t of the current stream without building a torch.cuda.Stream object (~1 us less)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - older torch
    def _raw_stream(device):
        return torch.cuda.current_stream(device).cuda_stream


def current_stream_ptr(device):
    return _raw_stream(device)


_libcuda = None


def libcuda():
    """The CUDA driver library (loaded once), for the few driver calls torch does not expose."""
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
    return _libcuda


def new_context_stream(device):
    """A new non-blocking stream of the calling thread's current CUDA context, as a torch stream. torch's own
    streams come from a pool made once per device in the context current at the time; a thread that runs in a
    green context (an SM partition) needs streams of that context for its work to stay on its SMs. Never
    destroyed, like the pool's. Without a current context (a thread that has made no CUDA call yet), the
    device's primary context will be used, which the pool's streams belong to: one of those is returned."""
    driver = libcuda()
    ctx, handle = ctypes.c_void_p(), ctypes.c_void_p()
    if driver.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
        return torch.cuda.Stream(device=torch.device("cuda", device))
    rc = driver.cuStreamCreate(ctypes.byref(handle), ctypes.c_uint(1))  # CU_STREAM_NON_BLOCKING
    if rc != 0:
        raise RuntimeError(f"epcomm: cuStreamCreate in the current CUDA context failed (CUresult {rc})")
    return torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", device))


class _CudaArray:
    """__cuda_array_interface__ of raw device bytes, so torch.as_tensor wraps them without a copy."""

    def __init__(self, ptr, num_bytes):
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 2, "strides": None}


def bytes_tensor(ptr, num_bytes, device):
    """A uint8 tensor over memory torch does not own (the group's buffer); valid while the group lives."""
    if num_bytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    try:
        t = torch.as_tensor(_CudaArray(ptr, num_bytes), device=device)
    except Exception as e:  # torch parses __cuda_array_interface__ with numpy
        raise RuntimeError(f"epcomm: could not wrap the group buffer in a tensor ({e}); is numpy installed?") from e
    if t.data_ptr() != ptr:
        raise RuntimeError("epcomm: torch copied the group buffer instead of wrapping it")
    return t


def view_from_descriptor(window, window_ptr, desc):
    """A torch view (no copy) of what a result descriptor points at inside `window` (a uint8 tensor over
    the group's buffer starting at `window_ptr`)."""
    dtype = EP_TO_TORCH[_capi.DType(desc.dtype)]
    shape, strides = _capi.tensor_shape(desc), _capi.tensor_strides(desc)
    if any(n == 0 for n in shape):
        return torch.empty(shape, dtype=dtype, device=window.device)
    elem = _capi.DTYPE_BYTES[_capi.DType(desc.dtype)]
    span = (1 + sum((n - 1) * s for n, s in zip(shape, strides))) * elem
    offset = desc.data - window_ptr
    if offset < 0 or offset + span > window.numel() or offset % elem:
        raise RuntimeError(f"epcomm: a result view [{offset}, {offset + span}) lies outside the group buffer "
                           f"of {window.numel()} bytes")
    return window[offset:offset + span].view(dtype).as_strided(shape, strides)
