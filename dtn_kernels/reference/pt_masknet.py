"""Pure-PyTorch twin of ``torch.ops.dtn.mask_block``: the CPU path and the test oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._group import member, stack_members


def pt_mask_block(e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5, allow_tf32: bool = False):
    """MaskBlock: out = ReLU(LN(W3 (mask * v))), mask = W2 ReLU(W1 e + b1) + b2.

    Returns (out, hid, mask, z, mean, rstd) like the Triton kernel, whose backward reuses the
    last five (hid = ReLU(W1 e + b1), z = W3 (mask * v), mean/rstd = z's fp32 LayerNorm stats).
    A group: every parameter with a leading G, e / v [G, B, .] or shared [B, .]; outputs [G, ...].
    """
    if w3.dim() == 3:
        return stack_members([pt_mask_block(member(e, g, 3), member(v, g, 3), w1[g], b1[g], w2[g], b2[g], w3[g],
                                            gamma[g], beta[g], eps) for g in range(w3.shape[0])])
    out, hid, mask, z = pt_mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, eps)
    zf = z.detach().float()
    if zf.shape[-1] == 0:  # an empty row: mean 0 and variance 0 (var_mean would give NaN)
        mean = zf.new_zeros(zf.shape[:-1])
        return out, hid, mask, z, mean, torch.full_like(mean, float(eps) ** -0.5)
    var, mean = torch.var_mean(zf, dim=-1, unbiased=False)
    return out, hid, mask, z, mean, torch.rsqrt(var + eps)


def pt_instance_mask(e, w1, b1, w2, b2):
    """(hid, mask): hid = ReLU(W1 e + b1), mask = W2 hid + b2 (``dtn_kernels.modules.InstanceMask``)."""
    hid = torch.relu(F.linear(e, w1, b1))
    return hid, F.linear(hid, w2, b2)


def pt_mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5):
    """(out, hid, mask, z) of one block, autograd through plain PyTorch (``dtn_kernels.modules.MaskBlock``
    runs this; ``gamma`` / ``beta`` may be None, as a LayerNorm without affine parameters has)."""
    hid, mask = pt_instance_mask(e, w1, b1, w2, b2)
    z = F.linear(mask * v, w3)
    return torch.relu(F.layer_norm(z, (z.shape[-1],), gamma, beta, eps)), hid, mask, z


def pt_mask_block_backward(grad_out, e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5):
    """(de, dv, dW1, db1, dW2, db2, dW3, dgamma, dbeta) in closed form (forward recomputed); a group:
    per member, a shared e / v's gradient summed over the members."""
    if w3.dim() == 3:
        res = [pt_mask_block_backward(grad_out[g], member(e, g, 3), member(v, g, 3), w1[g], b1[g], w2[g], b2[g],
                                      w3[g], gamma[g], beta[g], eps) for g in range(w3.shape[0])]
        return stack_members(res, {0: e.dim() == 2, 1: v.dim() == 2})
    hid, mask = pt_instance_mask(e, w1, b1, w2, b2)
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
