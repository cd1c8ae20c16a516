"""MaskNet with instance-guided masks (Wang, She, Zhang 2021).

mask         = W_2 ReLU(W_1 e + b_1) + b_2
MaskBlock(v) = ReLU(LN(W_3 (mask * v)))        (W_3 has no bias)
"""
from __future__ import annotations

import torch
from torch import nn


class InstanceMask(nn.Module):
    """e [B, D_in] -> mask [B, D_out] through a hidden layer of ``hidden`` units."""

    def __init__(self, input_dim: int, hidden: int, output_dim: int, device=None):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden, device=device)
        self.fc2 = nn.Linear(hidden, output_dim, device=device)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(e)))


class MaskBlock(nn.Module):
    """ReLU(LayerNorm(W_3 (mask(e) * v))): v [B, D_v] -> [B, output_dim]."""

    def __init__(self, input_dim: int, value_dim: int, mask_hidden: int, output_dim: int, device=None):
        super().__init__()
        self.mask = InstanceMask(input_dim, mask_hidden, value_dim, device=device)
        self.hidden = nn.Linear(value_dim, output_dim, bias=False, device=device)
        self.norm = nn.LayerNorm(output_dim, device=device)

    def forward(self, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.hidden(self.mask(e) * v)))


class MaskNet(nn.Module):
    """MaskNet as a FIM, serial or parallel.

    serial:   v_0 = flatten(LN_field(E)); v_{k+1} = MaskBlock_k(e, v_k); out = Linear(v_K -> h)
    parallel: K blocks on v_0 side by side, concatenated, then an MLP -> h.
    """

    def __init__(self, num_fields: int, embed_dim: int, output_dim: int, mode: str = "serial", num_blocks: int = 1,
                 mask_hidden: int = 640, block_dim: int = 512, parallel_hidden: tuple[int, ...] = (), device=None, **_):
        super().__init__()
        if mode not in ("serial", "parallel"):
            raise ValueError(f"MaskNet mode must be 'serial' or 'parallel', got {mode!r}")
        D = num_fields * embed_dim
        self.mode = mode
        self.field_norm = nn.LayerNorm(embed_dim, device=device)
        blocks = []
        for k in range(num_blocks):
            vdim = D if (mode == "parallel" or k == 0) else block_dim
            blocks.append(MaskBlock(D, vdim, mask_hidden, block_dim, device=device))
        self.blocks = nn.ModuleList(blocks)
        if mode == "serial":
            self.proj = nn.Linear(block_dim, output_dim, device=device)
        else:
            from .mlp import MLP

            self.proj = MLP(block_dim * num_blocks, list(parallel_hidden), output_dim).to(device)
        self.output_dim = output_dim

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor | None = None) -> torch.Tensor:
        e = E.flatten(1)
        v0 = self.field_norm(E).flatten(1)
        if self.mode == "serial":
            v = v0
            for block in self.blocks:
                v = block(e, v)
            return self.proj(v)
        return self.proj(torch.cat([block(e, v0) for block in self.blocks], dim=1))
