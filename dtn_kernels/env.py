"""What this installation will run: versions, the compiled extension, the device, and which kernel
each op dispatches to. ``python -m dtn_kernels`` prints it (``dtn env`` too).
"""
from __future__ import annotations

import importlib.util
import platform

import torch

from . import BUILT_FOR_TORCH, C_EXT_ERROR, HAS_C_EXT, HAS_CUDA_EXT, HAS_TRITON
from .precision import interpreting, tf32_enabled, triton_on_cpu

FUSED_OPS = ("gated_cross", "mask_block", "hcnet", "softmax_gate")


def _version(module: str):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return f"unusable ({type(exc).__name__}: {exc})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def report(device: str | None = None) -> dict:
    """A dict of facts; ``device`` defaults to CUDA when available, else CPU."""
    cuda = torch.cuda.is_available()
    dev = torch.device(device or ("cuda" if cuda else "cpu"))
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else None,
        "extension": HAS_C_EXT,
        "extension_cuda": HAS_CUDA_EXT,
        "extension_built_for_torch": BUILT_FOR_TORCH,
        "extension_error": C_EXT_ERROR,
        "fp32_matmul_policy": torch.get_float32_matmul_precision(),
        "tf32": tf32_enabled(),
        "interpreter": interpreting(),
    }
    if dev.type == "cuda":
        bag = "CUDA kernel (dtn_kernels._C)" if HAS_CUDA_EXT else "PyTorch twin (extension built without CUDA)"
    else:
        bag = "C++ kernel (dtn_kernels._C)" if HAS_C_EXT else "PyTorch twin (no compiled extension)"
    kernels = {"embedding_bag": bag}
    for op in FUSED_OPS:
        if not HAS_TRITON:
            kernels[op] = "PyTorch twin (triton is not installed)"
        elif dev.type == "cuda":
            kernels[op] = "Triton kernels"
        elif interpreting() and triton_on_cpu():
            kernels[op] = "Triton kernels through the interpreter (fp32; for tests)"
        else:
            kernels[op] = "reference layer on CPU (Triton runs on CUDA only)"
    info["kernels"] = kernels
    info["torchrec"] = _torchrec()
    return info


def _torchrec() -> dict:
    """Whether TorchRec (model.embeddings: torchrec, sharded tables) is usable here, and why not."""
    try:
        from dtn.features.torchrec_input import torchrec_status
    except ImportError as exc:  # dtn_kernels without the dtn package
        return {"usable": False, "detail": f"dtn is not importable ({exc})"}
    ok, detail = torchrec_status()
    return {"usable": ok, "detail": detail}


def format_report(info: dict) -> str:
    ext = "not built" if not info["extension"] else ("built with CUDA" if info["extension_cuda"] else "built (CPU)")
    if info["extension_built_for_torch"]:
        ext += f" for torch {info['extension_built_for_torch']}"
    lines = [
        f"python          {info['python']}",
        f"torch           {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else " (CPU build)"),
        f"triton          {info['triton'] or 'not installed'}",
        f"device          {info['device']}" + (f" (sm_{info['capability'].replace('.', '')})" if info["capability"] else ""),
        f"extension _C    {ext}",
    ]
    if info["extension_error"]:
        lines.append(f"                ({info['extension_error']})")
    lines.append(f"fp32 matmuls    {info['fp32_matmul_policy']} ({'TF32' if info['tf32'] else 'IEEE'})")
    tr = info.get("torchrec")
    if tr is not None:
        lines.append(f"torchrec        {'usable: ' if tr['usable'] else 'not usable: '}{tr['detail']}"
                     + ("" if tr["usable"] else " (model.embeddings: torchrec needs it; bash scripts/install_torchrec.sh)"))
    lines.append("kernels:")
    lines += [f"  {op:<14}{how}" for op, how in info["kernels"].items()]
    return "\n".join(lines)
