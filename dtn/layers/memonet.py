"""MemoNet's multi-hash codebook network HCNet (Zhang & Zhang, CIKM 2023).

1. cross features: every field pair (i < j) of a subset S of categorical fields, M = |S|(|S|-1)/2;
2. multi-hash addressing: H hash functions map each cross to rows of a codebook C [N, d_c];
3. linear memory restoring: v_k = W_o [cw_{k,1} | ... | cw_{k,H}]  (W_o shared by all crosses);
4. global attentive shrinking: w = SENet(E) in R^{B x M}; u_f = sum_{k contains f} w_k v_k.

The HCNet itself and its hash live in ``dtn_kernels`` (``dtn_kernels.modules.HCNet``,
``dtn_kernels.hashing``), re-exported here; this module adds the MemoNet FIM built on them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dtn_kernels.hashing import M32, cross_hash, field_salt, fmix32, fmix32_int, hash_seed  # noqa: F401
from dtn_kernels.modules import HCNet


class MemoNet(nn.Module):
    """MemoNet as a FIM: ``num_hcnets`` HCNets; output Linear([e ; flatten(U_1) ; ...] -> h).

    ``fields``: categorical field positions to cross (None = all categorical fields).
    """

    def __init__(self, num_fields: int, embed_dim: int, output_dim: int, num_categorical: int,
                 fields: Sequence[int] | None = None, num_hcnets: int = 2, num_hashes: int = 2,
                 num_buckets: int = 100_000, codebook_dim: int = 16, shared_codebook: bool = True, device=None, **_):
        super().__init__()
        fields = list(range(num_categorical)) if fields is None else list(fields)
        bad = [f for f in fields if not 0 <= f < num_categorical]
        if bad:
            raise ValueError(f"MemoNet fields {bad} are not categorical field positions (0..{num_categorical - 1})")
        self.hcnets = nn.ModuleList(
            HCNet(fields, num_fields, embed_dim, num_hashes, num_buckets, codebook_dim, shared_codebook, index=n,
                  device=device)
            for n in range(num_hcnets)
        )
        D = num_fields * embed_dim
        self.proj = nn.Linear(D + num_hcnets * len(fields) * embed_dim, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        parts = [E.flatten(1)] + [net(E, cat_ids).flatten(1) for net in self.hcnets]
        return self.proj(torch.cat(parts, dim=1))
