"""When the ops run their Triton kernels, and autocast handling shared by the dispatchers.

Kept free of any triton import so that the dispatchers in ``dtn_kernels.ops`` load where
triton is absent (they then always run the pure-PyTorch twins).
"""
from __future__ import annotations

import os

import torch

from .. import HAS_TRITON

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_on_cpu() -> bool:
    """DTN_TRITON_ON_CPU=1 (with TRITON_INTERPRET=1): run the Triton kernels on CPU tensors."""
    return os.environ.get("DTN_TRITON_ON_CPU", "0").lower() in ("1", "true", "yes", "on")


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors of fp32/fp16/bf16; on CPU only through the interpreter (fp32:
    the interpreter has no bf16 arithmetic). Everything else (fp64, CPU) runs the twin."""
    if not HAS_TRITON or t.dtype not in TRITON_DTYPES:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and t.dtype == torch.float32 and triton_on_cpu()


def autocast_dtype(t: torch.Tensor):
    """The autocast dtype active for ``t``'s device, or None."""
    dev = t.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def cast_floats(dtype, *tensors):
    """Cast the floating tensors (None passes through) to ``dtype``: the ops take one compute dtype."""
    return tuple(t if (t is None or not t.is_floating_point() or t.dtype == dtype) else t.to(dtype) for t in tensors)


def compute_dtype(t: torch.Tensor):
    """Autocast dtype if autocast is on for t's device, else t's own dtype."""
    return autocast_dtype(t) or t.dtype
