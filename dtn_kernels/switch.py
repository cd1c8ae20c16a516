"""One switch that moves a whole model between the reference layers and their fused twins."""
from __future__ import annotations

from torch import nn

from .nn import FUSED_TWINS

_REFERENCE_OF = {fused: ref for ref, fused in FUSED_TWINS.items()}
MODES = ("fused", "reference")


def set_kernels(model: nn.Module, mode: str) -> int:
    """Swap, in place, the class of every known layer in ``model`` (itself included) to its
    fused twin (``mode="fused"``) or back to the reference (``"reference"``).

    Input layers with an ``embedding_kernel`` attribute (dtn's InputLayer) switch too: the
    compiled embedding-bag op for ``"fused"``, its pure-PyTorch twin for ``"reference"`` (not
    counted in the return value: their class does not change).

    Parameters, buffers and state_dict are untouched (the twins subclass the references and add
    nothing), so a model can be switched, trained, saved and loaded either way. Call it before
    ``torch.compile`` (a compiled model keeps the classes it was traced with). Returns how many
    modules changed class.
    """
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    table = FUSED_TWINS if mode == "fused" else _REFERENCE_OF
    changed = 0
    for module in model.modules():
        if hasattr(module, "embedding_kernel"):  # dtn's InputLayer: compiled embedding bag or its twin
            module.embedding_kernel = "auto" if mode == "fused" else "reference"
        target = table.get(type(module))
        if target is not None:
            module.__class__ = target
            changed += 1
    return changed


def kernels_of(model: nn.Module) -> str:
    """'fused', 'reference', 'mixed', or 'none' (no known layer) for ``model``."""
    kinds = set()
    for module in model.modules():
        if type(module) in FUSED_TWINS:
            kinds.add("reference")
        elif type(module) in _REFERENCE_OF:
            kinds.add("fused")
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")
