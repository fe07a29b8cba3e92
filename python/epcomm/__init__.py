"""epcomm: expert-parallel dispatch / combine for MoE models, with DeepEP V1's Python interface.

    import epcomm as deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes=..., num_rdma_bytes=...)

Config and the C API mirror (epcomm._capi) need no torch; Buffer, EventOverlap and topk_idx_t import torch
on first use, so `import epcomm` works on machines without it.
"""
from ._capi import EpcommError, Status
from .config import Config
from .local_group import LocalGroup

__version__ = "0.1.0"
__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "EpcommError", "LocalGroup", "Status", "topk_idx_t"]

_TORCH_NAMES = {"Buffer": ("buffer", "Buffer"), "EventOverlap": ("event", "EventOverlap"),
                "EventHandle": ("event", "EventHandle")}


def __getattr__(name):
    if name in _TORCH_NAMES:
        import importlib

        module, attr = _TORCH_NAMES[name]
        try:
            value = getattr(importlib.import_module(f".{module}", __name__), attr)
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise ImportError(f"epcomm.{name} needs PyTorch, which is not installed") from e
    elif name == "topk_idx_t":  # DeepEP's expert-index dtype: epcomm takes int64
        import torch

        value = torch.int64
    else:
        raise AttributeError(f"module 'epcomm' has no attribute {name!r}")
    globals()[name] = value
    return value
