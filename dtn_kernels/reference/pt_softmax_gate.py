"""Pure-PyTorch twin of ``torch.ops.dtn.softmax_gate``: the CPU path and the test oracle."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def pt_softmax_gate(x: torch.Tensor, experts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, allow_tf32: bool = False):
    """(out [B, h], weights [B, K]): weights = softmax(x W^T + b) with masked-off experts at -inf,
    out = sum_k weights[:, k] * experts[:, k]. ``mask``: bool [K] or [B, K] (True = expert on)."""
    logits = F.linear(x, weight, bias)
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    w = torch.softmax(logits, dim=-1)
    return torch.einsum("bk,bkh->bh", w, experts), w


def pt_softmax_gate_backward(grad_out, grad_weights, x, experts, weight, bias, mask=None):
    """(dx, d experts, dW, db) in closed form: d experts = w * d out; dw = d weights + <d out, experts>;
    d logits = w * (dw - sum_k w dw) (softmax backward); dx = d logits W, dW = d logits^T x, db = sum_b d logits."""
    _, w = pt_softmax_gate(x, experts, weight, bias, mask)
    dexp = w[:, :, None] * grad_out[:, None, :]
    dw = grad_weights + torch.einsum("bh,bkh->bk", grad_out, experts)
    dl = w * (dw - (w * dw).sum(-1, keepdim=True))
    return dl @ weight, dexp, dl.t() @ x, dl.sum(0)


def pt_softmax_mix(logits: torch.Tensor, experts: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """(out [B, h], weights [B, K]) from given logits [B, K]: the gate without its linear layer."""
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    w = torch.softmax(logits, dim=-1)
    return torch.einsum("bk,bkh->bh", w, experts), w


def pt_softmax_mix_backward(grad_out, grad_weights, experts, weights):
    """(d logits, d experts): d experts = w * d out; d logits = w * (dw - sum_k w dw) with
    dw = d weights + <d out, experts>."""
    dexp = weights[:, :, None] * grad_out[:, None, :]
    dw = grad_weights + torch.einsum("bh,bkh->bk", grad_out, experts)
    return weights * (dw - (weights * dw).sum(-1, keepdim=True)), dexp
