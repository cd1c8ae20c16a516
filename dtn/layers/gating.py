from __future__ import annotations

import torch
from torch import nn


class SoftmaxGate(nn.Module):
    """softmax(W x + b) over K experts, then the weighted sum of expert outputs.

    ``forward(x [B, D_in], experts [B, K, h], mask=None)`` returns (out [B, h], weights [B, K]).
    ``mask`` (bool [K]) switches experts off: their logits become -inf before the softmax.
    """

    def __init__(self, input_dim: int, num_experts: int, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.linear = nn.Linear(input_dim, num_experts, device=device)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None):
        logits = self.linear(x)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        return torch.einsum("bk,bkh->bh", w, experts), w
