"""dtn-kernels: fused kernels for DTN's feature-interaction layers.

The compiled extension (``dtn_kernels._C``) is loaded in one place, here. Flags:

* ``HAS_C_EXT``    the C++ extension was built and imported;
* ``HAS_CUDA_EXT`` it was built with its CUDA kernels;
* ``HAS_TRITON``   triton imports (kernels run on CUDA, or on CPU with TRITON_INTERPRET=1);
* ``BUILT_FOR_TORCH`` the torch version ``_C`` was compiled against (None without a build).

``_C`` is loaded only when this torch is the one it was built for; otherwise the package warns
once, naming both versions and how to rebuild, and the PyTorch twins run.

When something is missing the package warns once, naming what is missing and what is
used instead (the pure-PyTorch reference twins).
"""
from __future__ import annotations

import importlib.util
import warnings

import torch  # noqa: F401  -- loads libc10 / libtorch, which _C links against

__all__ = ["HAS_C_EXT", "HAS_CUDA_EXT", "HAS_TRITON", "C_EXT_ERROR", "BUILT_FOR_TORCH", "warn_missing_extension"]

HAS_C_EXT = False
HAS_CUDA_EXT = False
C_EXT_ERROR: str | None = None
try:  # the torch the extension was compiled against (setup.py writes it next to _C)
    from ._build_info import TORCH_VERSION as BUILT_FOR_TORCH  # type: ignore[import-not-found]
except ImportError:
    BUILT_FOR_TORCH = None


def _release(version: str) -> str:
    return version.split("+")[0]  # "2.13.0+cpu" and "2.13.0+cu130" share the C++ ABI of 2.13.0


_warned: set[str] = set()

if BUILT_FOR_TORCH is not None and _release(BUILT_FOR_TORCH) != _release(torch.__version__):
    # loading _C against another torch fails with an undefined symbol (or worse): do not try
    C_EXT_ERROR = (f"dtn_kernels._C was built for torch {BUILT_FOR_TORCH} but this is torch {torch.__version__}; "
                   f"rebuild it for this torch (`pip install --no-build-isolation --no-deps --force-reinstall "
                   f"dtn-kernels` from the source, or a wheel built with torch {torch.__version__})")
    _warned.add("version")
    warnings.warn(f"dtn_kernels: {C_EXT_ERROR}; the pure-PyTorch reference ops run instead.", RuntimeWarning,
                  stacklevel=2)
else:
    try:  # the compiled op library registers torch.ops.dtn.* on import
        from . import _C  # type: ignore[attr-defined]  # noqa: F401

        HAS_C_EXT = True
        HAS_CUDA_EXT = bool(getattr(_C, "WITH_CUDA", False))
    except ImportError as exc:  # pure-Python install, or a broken build
        C_EXT_ERROR = str(exc)

HAS_TRITON = importlib.util.find_spec("triton") is not None


def warn_missing_extension(what: str) -> None:
    """Warn once per process that the compiled ``what`` is unavailable."""
    if what in _warned or "version" in _warned:  # a version mismatch was already reported at import
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
