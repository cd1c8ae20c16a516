"""FIM kinds by name, and one builder that passes each its options."""
from __future__ import annotations

from typing import Any

from torch import nn

from .gdcn import DCNv2, GDCN
from .masknet import MaskNet
from .memonet import MemoNet

FIM_REGISTRY: dict[str, type[nn.Module]] = {
    "gdcn": GDCN,
    "dcnv2": DCNv2,
    "masknet": MaskNet,
    "memonet": MemoNet,
}


def build_fim(kind: str, num_fields: int, embed_dim: int, output_dim: int, num_categorical: int,
              options: dict[str, Any] | None = None, device=None) -> nn.Module:
    if kind not in FIM_REGISTRY:
        raise ValueError(f"unknown FIM kind {kind!r}; known: {sorted(FIM_REGISTRY)}")
    opts = dict(options or {})
    if kind == "memonet":
        opts["num_categorical"] = num_categorical
    return FIM_REGISTRY[kind](num_fields=num_fields, embed_dim=embed_dim, output_dim=output_dim, device=device, **opts)
