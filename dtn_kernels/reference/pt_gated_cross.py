"""Pure-PyTorch twin of ``torch.ops.dtn.gated_cross``: the CPU path and the test oracle."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._group import member


def pt_gated_cross(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   gate_weight: Optional[torch.Tensor] = None, allow_tf32: bool = False) -> torch.Tensor:
    """out = x0 * (xl W^T + b) * sigmoid(xl Wg^T) + xl   (no sigmoid factor when ``gate_weight`` is None).

    ``allow_tf32`` is accepted for signature parity with the Triton kernel and ignored. A group:
    ``weight`` [G, D, D] (and ``bias``, ``gate_weight`` likewise), x0 / xl [G, B, D] or a shared [B, D]
    -> [G, B, D].
    """
    z, a = pt_gated_cross_pre(xl, weight, bias, gate_weight)
    return pt_gated_cross_from_pre(x0, xl, z, a)


def pt_gated_cross_pre(xl, weight, bias, gate_weight=None):
    """The pre-activations (z = xl W^T + b, a = xl Wg^T or None), per member for a group ([G, B, D])."""
    if weight.dim() == 3:
        G = weight.shape[0]
        z = torch.stack([F.linear(member(xl, g, 3), weight[g], bias[g]) for g in range(G)])
        a = torch.stack([F.linear(member(xl, g, 3), gate_weight[g]) for g in range(G)]) \
            if gate_weight is not None else None
        return z, a
    return F.linear(xl, weight, bias), (F.linear(xl, gate_weight) if gate_weight is not None else None)


def pt_gated_cross_from_pre(x0, xl, z, a=None):
    """out = x0 * (z * sigmoid(a)) + xl from the pre-activations (a None: ungated)."""
    h = z * torch.sigmoid(a) if a is not None else z
    return x0 * h + xl


def pt_gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight=None, z=None, a=None,
                            allow_tf32: bool = False):
    """(dx0, dxl, dW, db, dWg) in closed form (dWg None when ungated), from the forward's
    pre-activations ``z`` / ``a`` when given, else recomputed (one layer, no group).

    With z = xl W^T + b and s = sigmoid(xl Wg^T): dz = go*x0*s, da = go*x0*z*s*(1-s),
    dx0 = go*z*s, dxl = go + dz W + da Wg, [dW; dWg] = [dz | da]^T xl, db = sum_b dz.
    """
    if z is None or z.shape != grad_out.shape:
        z, a = pt_gated_cross_pre(xl, weight, bias, gate_weight)
    gx = grad_out * x0
    if gate_weight is None:
        dz = gx
        dx0 = grad_out * z
        return dx0, grad_out + dz @ weight, dz.t() @ xl, dz.sum(0), None
    s = torch.sigmoid(a)
    dz = gx * s
    da = gx * z * s * (1 - s)
    dx0 = grad_out * z * s
    return dx0, grad_out + dz @ weight + da @ gate_weight, dz.t() @ xl, dz.sum(0), da.t() @ xl
