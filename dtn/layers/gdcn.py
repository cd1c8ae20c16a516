"""GDCN gated cross network (Wang et al., CIKM 2023) and DCN-v2 as its ungated variant.

c_0 = e;  c_{l+1} = c_0 * (W_l c_l + b_l) * sigmoid(W_{g,l} c_l) + c_l

The cross layers live in ``dtn_kernels.modules`` (the fused ops twin them); this module adds the
FIM wrappers.
"""
from __future__ import annotations

import torch
from torch import nn

from dtn_kernels.modules import CrossNetwork, GatedCrossLayer  # noqa: F401  (re-exported)


class GDCN(nn.Module):
    """GDCN as a FIM: cross network on flatten(E), then a plain Linear(D -> h)."""

    gated = True

    def __init__(self, num_fields: int, embed_dim: int, output_dim: int, num_layers: int = 2, device=None, **_):
        super().__init__()
        D = num_fields * embed_dim
        self.cross = CrossNetwork(D, num_layers, gated=self.gated, device=device)
        self.proj = nn.Linear(D, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.cross(E.flatten(1)))


class DCNv2(GDCN):
    """DCN-v2 (DCN-M) cross network: the GDCN recurrence without the gate."""

    gated = False
