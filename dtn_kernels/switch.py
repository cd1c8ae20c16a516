"""One switch that moves a whole model between the reference layers and their fused twins."""
from __future__ import annotations

from torch import nn

from .nn import FUSED_TWINS

_REFERENCE_OF = {fused: ref for ref, fused in FUSED_TWINS.items()}
MODES = ("fused", "grouped", "reference")


def set_kernels(model: nn.Module, mode: str) -> int:
    """Swap, in place, the class of every known layer in ``model`` (itself included) to its
    fused twin (``mode="fused"`` or ``"grouped"``) or back to the reference (``"reference"``).

    ``"grouped"`` also sets ``group_kernels = True`` on every module that has that attribute (the
    model zoo's multi-task models and their expert levels): they then run their modules of one
    kind -- DTN's T + 1 FIMs of each kind, MMoE/PLE's experts and gates -- as one group through the
    grouped ops (see ``dtn.models.grouped``). The other modes set it back to False.

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
    table = _REFERENCE_OF if mode == "reference" else FUSED_TWINS
    changed = 0
    for module in model.modules():
        if hasattr(module, "embedding_kernel"):  # dtn's InputLayer: compiled embedding bag or its twin
            module.embedding_kernel = "reference" if mode == "reference" else "auto"
        if hasattr(module, "group_kernels"):  # the zoo's models: run modules of one kind as one group
            module.group_kernels = mode == "grouped"
        target = table.get(type(module))
        if target is not None:
            module.__class__ = target
            changed += 1
    return changed


def kernels_of(model: nn.Module) -> str:
    """'fused', 'grouped', 'reference', 'mixed', or 'none' (no known layer) for ``model``."""
    kinds = set()
    grouped = any(getattr(m, "group_kernels", False) for m in model.modules())
    for module in model.modules():
        if type(module) in FUSED_TWINS:
            kinds.add("reference")
        elif type(module) in _REFERENCE_OF:
            kinds.add("grouped" if grouped else "fused")
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")
