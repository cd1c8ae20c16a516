"""Pure-PyTorch twin of ``torch.ops.dtn.mask_block``: the CPU path and the test oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pt_mask_block(e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5, allow_tf32: bool = False):
    """MaskBlock: out = ReLU(LN(W3 (mask * v))), mask = W2 ReLU(W1 e + b1) + b2.

    Returns (out, hid, mask, z, mean, rstd) like the Triton kernel, whose backward reuses the
    last five (hid = ReLU(W1 e + b1), z = W3 (mask * v), mean/rstd = z's fp32 LayerNorm stats).
    """
    hid = torch.relu(F.linear(e, w1, b1))
    mask = F.linear(hid, w2, b2)
    z = F.linear(mask * v, w3)
    out = torch.relu(F.layer_norm(z, (z.shape[-1],), gamma, beta, eps))
    zf = z.detach().float()
    var, mean = torch.var_mean(zf, dim=-1, unbiased=False)
    return out, hid, mask, z, mean, torch.rsqrt(var + eps)


def pt_mask_block_backward(grad_out, e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5):
    """(de, dv, dW1, db1, dW2, db2, dW3, dgamma, dbeta) in closed form (forward recomputed)."""
    hid = torch.relu(F.linear(e, w1, b1))
    mask = F.linear(hid, w2, b2)
    y = mask * v
    z = F.linear(y, w3)
    var, mean = torch.var_mean(z, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    zhat = (z - mean) * rstd
    gr = grad_out * ((zhat * gamma + beta) > 0)  # ReLU backward
    dgamma, dbeta = (gr * zhat).sum(0), gr.sum(0)
    dzhat = gr * gamma
    dz = rstd * (dzhat - dzhat.mean(-1, keepdim=True) - zhat * (dzhat * zhat).mean(-1, keepdim=True))
    dy = dz @ w3
    dmask = dy * v
    dhid = (dmask @ w2) * (hid > 0)
    return dhid @ w1, dy * mask, dhid.t() @ e, dhid.sum(0), dmask.t() @ hid, dmask.sum(0), dz.t() @ y, dgamma, dbeta
