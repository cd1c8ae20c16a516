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
    if weight.dim() == 3:
        return torch.stack([pt_gated_cross(member(x0, g, 3), member(xl, g, 3), weight[g], bias[g],
                                           member(gate_weight, g, 3)) for g in range(weight.shape[0])])
    h = F.linear(xl, weight, bias)
    if gate_weight is not None:
        h = h * torch.sigmoid(F.linear(xl, gate_weight))
    return x0 * h + xl


def pt_gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight=None, allow_tf32: bool = False):
    """(dx0, dxl, dW, db, dWg) in closed form (dWg None when ungated); the gate is recomputed.

    With z = xl W^T + b and s = sigmoid(xl Wg^T): dz = go*x0*s, da = go*x0*z*s*(1-s),
    dx0 = go*z*s, dxl = go + dz W + da Wg, dW = dz^T xl, db = sum_b dz, dWg = da^T xl.
    """
    z = F.linear(xl, weight, bias)
    gx = grad_out * x0
    if gate_weight is None:
        dz = gx
        dx0 = grad_out * z
        return dx0, grad_out + dz @ weight, dz.t() @ xl, dz.sum(0), None
    s = torch.sigmoid(F.linear(xl, gate_weight))
    dz = gx * s
    da = gx * z * s * (1 - s)
    dx0 = grad_out * z * s
    return dx0, grad_out + dz @ weight + da @ gate_weight, dz.t() @ xl, dz.sum(0), da.t() @ xl
