"""GDCN gated cross network (Wang et al., CIKM 2023) and DCN-v2 as its ungated variant.

c_0 = e;  c_{l+1} = c_0 * (W_l c_l + b_l) * sigmoid(W_{g,l} c_l) + c_l
"""
from __future__ import annotations

import torch
from torch import nn


class GatedCrossLayer(nn.Module):
    """One cross layer. Parameters: ``weight`` [D, D], ``bias`` [D], ``gate_weight`` [D, D] (gated only)."""

    def __init__(self, dim: int, gated: bool = True, device=None):
        super().__init__()
        self.dim = dim
        self.gated = gated
        bound = dim ** -0.5
        self.weight = nn.Parameter(torch.empty(dim, dim, device=device).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(dim, device=device))
        if gated:
            self.gate_weight = nn.Parameter(torch.empty(dim, dim, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("gate_weight", None)

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(xl, self.weight, self.bias)
        if self.gated:
            h = h * torch.sigmoid(torch.nn.functional.linear(xl, self.gate_weight))
        return x0 * h + xl


class CrossNetwork(nn.Module):
    """L stacked cross layers on e [B, D] -> c_L [B, D]."""

    def __init__(self, dim: int, num_layers: int = 2, gated: bool = True, device=None):
        super().__init__()
        self.layers = nn.ModuleList(GatedCrossLayer(dim, gated, device=device) for _ in range(num_layers))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = e
        for layer in self.layers:
            x = layer(e, x)
        return x


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
