"""When the ops run their Triton kernels, which precision their GEMMs use, and where each GEMM runs.

Kept free of any triton import so that the dispatchers in ``dtn_kernels.ops`` load where
triton is absent (they then always run the pure-PyTorch twins).

Precision follows PyTorch's own policy, so a fused op and the eager layer it replaces are
compared like for like:

* bf16 / fp16 tensors (e.g. under autocast): tensor cores, fp32 accumulation;
* fp32 tensors: TF32 tensor cores when torch allows TF32 for CUDA matmuls
  (``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.fp32_precision
  = "tf32"``), IEEE fp32 otherwise (torch's default, ``"highest"``). An op's ``allow_tf32``
  argument overrides the policy when it is a bool; ``None`` (the default) follows it.

Where each GEMM runs (see docs/kernels.md, "Where each GEMM runs"): plain GEMMs (weight
gradients, input gradients without an epilogue) always go to ``torch.mm`` / ``addmm`` (cuBLAS on
CUDA, tuned per card, split-K included). GEMMs with a fused prologue or epilogue run in Triton
when they can use tensor cores; in IEEE fp32 (no tensor cores) cuBLAS's FMA SGEMM beats a Triton
FMA loop, so there the GEMM goes to cuBLAS too and only the element-wise part stays in Triton.
``DTN_FUSED_GEMM=triton|torch`` forces the choice (tests use it to cover both routes on CPU).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import HAS_TRITON

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter. Read at call time:
    the test modules set it after ``dtn_kernels`` may already have been imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_on_cpu() -> bool:
    """DTN_TRITON_ON_CPU=1 (with TRITON_INTERPRET=1): run the Triton kernels on CPU tensors."""
    return os.environ.get("DTN_TRITON_ON_CPU", "0").lower() in ("1", "true", "yes", "on")


_COUNTING = False  # set by _launch.count_launches(): CPU tensors take the GPU path, launches are only counted


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors of fp32/fp16/bf16; on CPU only through the interpreter (fp32:
    the interpreter has no bf16 arithmetic). Everything else (fp64, CPU) runs the twin."""
    if not HAS_TRITON or t.dtype not in TRITON_DTYPES:
        return False
    if t.is_cuda or _COUNTING:
        return True
    return t.device.type == "cpu" and t.dtype == torch.float32 and triton_on_cpu()


def tf32_enabled() -> bool:
    """Whether torch's float32 matmul policy allows TF32 on CUDA (what eager ``F.linear`` uses)."""
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)  # torch >= 2.9: "ieee", "tf32" or "none" (inherit)
    if new == "tf32":
        return True
    if new == "ieee":
        return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # legacy and new APIs mixed: torch refuses to answer; use the global setting
        return torch.get_float32_matmul_precision() != "highest"


def resolve_tf32(allow_tf32: Optional[bool]) -> bool:
    """An op's ``allow_tf32`` argument: a bool wins; None follows torch's policy (never under the
    interpreter, which computes IEEE fp32 only)."""
    if interpreting():
        return False
    return tf32_enabled() if allow_tf32 is None else bool(allow_tf32)


def tensor_cores(dtype: torch.dtype, tf32: bool) -> bool:
    """Whether a GEMM on ``dtype`` operands can use tensor cores (wgmma / mma)."""
    return dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and tf32)


def fused_gemm_in_triton(dtype: torch.dtype, tf32: bool) -> bool:
    """Whether a GEMM with a fused prologue/epilogue runs in Triton (else cuBLAS + a Triton or
    torch element-wise pass). ``DTN_FUSED_GEMM`` forces it; the interpreter defaults to Triton
    (that is where the kernels are tested)."""
    forced = os.environ.get("DTN_FUSED_GEMM", "").strip().lower()
    if forced in ("triton", "torch"):
        return forced == "triton"
    if forced:
        raise ValueError(f"DTN_FUSED_GEMM must be 'triton' or 'torch', got {forced!r}")
    return interpreting() or tensor_cores(dtype, tf32)


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
