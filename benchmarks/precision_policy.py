"""What a benchmark precision means when it is measured: whether it runs here, the autocast the
timed forward runs in, and the precision policy recorded with every result."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from dtn_kernels.precision import tf32_enabled as tf32_allowed  # noqa: F401  (recorded as the environment's tf32)
from suite_settings import PRECISIONS, preset


def precision_skip_reason(precision: str, device: torch.device) -> Optional[str]:
    """Why a precision is not timed here (bf16 on CPU outside the smoke preset unless asked for)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    if precision == "bf16" and device.type == "cpu" and preset() != "smoke" \
            and "bf16" not in (os.environ.get("DTN_BENCH_PRECISIONS") or ""):
        return ("bf16 on CPU is opt-in (DTN_BENCH_PRECISIONS=fp32,bf16): it would double the CPU suite "
                "past its budget, and the bf16 targets are GPU targets")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this CUDA device does not support bf16"
    return None


def autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    """The context the timed forward runs in: bf16 autocast, or nothing for fp32. A step captured in
    a CUDA graph runs it with ``cache_enabled=False`` (torch's notes on autocast and graphs)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")


def precision_record(precision: str, device: torch.device) -> dict:
    """The precision policy a result was measured under.

    ``roofline_precision`` is the name ``benchmarks/roofline.py`` takes: ``bf16``, ``fp32-tf32``
    (CUDA, policy high) or ``fp32-ieee`` (policy highest, or CPU); ``medium`` lets fp32 matmuls use
    bf16 internally, which the roofline has no entry for.
    """
    policy = torch.get_float32_matmul_precision()
    if precision == "bf16":
        roof = "bf16"
    elif device.type != "cuda" or policy == "highest":
        roof = "fp32-ieee"
    else:
        roof = "fp32-tf32" if policy == "high" else f"fp32-{policy}"
    return {"precision": precision, "fp32_matmul": policy,
            "autocast": f"{device.type}/bfloat16" if precision == "bf16" else None, "roofline_precision": roof}
