"""dtn-kernels: fused kernels for DTN's feature-interaction layers.

The compiled extension (``dtn_kernels._C``) is loaded in one place, here. Flags:

* ``HAS_C_EXT``    the C++ extension was built and imported;
* ``HAS_CUDA_EXT`` it was built with its CUDA kernels;
* ``HAS_TRITON``   triton imports (kernels run on CUDA, or on CPU with TRITON_INTERPRET=1).

When something is missing the package warns once, naming what is missing and what is
used instead (the pure-PyTorch reference twins).
"""
from __future__ import annotations

import importlib.util
import warnings

import torch  # noqa: F401  -- loads libc10 / libtorch, which _C links against

__all__ = ["HAS_C_EXT", "HAS_CUDA_EXT", "HAS_TRITON", "C_EXT_ERROR", "warn_missing_extension"]

HAS_C_EXT = False
HAS_CUDA_EXT = False
C_EXT_ERROR: str | None = None
try:  # the compiled op library registers torch.ops.dtn.* on import
    from . import _C  # type: ignore[attr-defined]  # noqa: F401

    HAS_C_EXT = True
    HAS_CUDA_EXT = bool(getattr(_C, "WITH_CUDA", False))
except ImportError as exc:  # pure-Python install, or a broken build
    C_EXT_ERROR = str(exc)

HAS_TRITON = importlib.util.find_spec("triton") is not None

_warned: set[str] = set()


def warn_missing_extension(what: str) -> None:
    """Warn once per process that the compiled ``what`` is unavailable."""
    if what in _warned:
        return
    _warned.add(what)
    reason = C_EXT_ERROR or "dtn_kernels._C was not built"
    warnings.warn(
        f"dtn_kernels: compiled {what} unavailable ({reason}); using the pure-PyTorch reference "
        "instead. Rebuild with `pip install --no-build-isolation -e .` to get it.",
        RuntimeWarning,
        stacklevel=3,
    )

# Fused FIM/gate kernels: importing the switch registers torch.ops.dtn.{gated_cross, mask_block,
# hcnet, softmax_gate} (+ their _backward ops).
from .switch import kernels_of, set_kernels  # noqa: E402

__all__ += ["set_kernels", "kernels_of"]
