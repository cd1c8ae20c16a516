"""MaskNet with instance-guided masks (Wang, She, Zhang 2021).

mask         = W_2 ReLU(W_1 e + b_1) + b_2
MaskBlock(v) = ReLU(LN(W_3 (mask * v)))        (W_3 has no bias)
"""
from __future__ import annotations

import torch
from torch import nn

from dtn_kernels.modules import InstanceMask, MaskBlock  # noqa: F401  (re-exported)


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
