"""``torch.ops.dtn.gated_cross``: one GDCN / DCN-v2 cross layer, or a group of G in one launch.

    out = x0 * (xl W^T + b) * sigmoid(xl Wg^T) + xl        (gate_weight=None: no sigmoid factor)

A group: ``weight`` / ``gate_weight`` [G, D, D] and ``bias`` [G, D]; ``x0`` / ``xl`` [G, B, D], or
[B, D] when every member reads the same input (DTN's MFI modules all start from e); out [G, B, D].

CUDA tensors run the Triton kernels (dtn_kernels/triton/triton_gated_cross.py); CPU tensors
run the PyTorch twin (dtn_kernels/reference/pt_gated_cross.py) unless DTN_TRITON_ON_CPU=1.
Backward: ``torch.ops.dtn.gated_cross_backward`` (the gate is recomputed, not stored).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference.pt_gated_cross import pt_gated_cross, pt_gated_cross_backward
from ..triton._dispatch import cast_floats, compute_dtype, use_triton


@torch.library.custom_op("dtn::gated_cross", mutates_args=())
def _gated_cross(x0: Tensor, xl: Tensor, weight: Tensor, bias: Tensor, gate_weight: Optional[Tensor],
                 allow_tf32: Optional[bool] = None) -> Tensor:
    if use_triton(xl):
        from ..triton.triton_gated_cross import gated_cross_forward

        return gated_cross_forward(x0, xl, weight, bias, gate_weight, allow_tf32)
    return pt_gated_cross(x0, xl, weight, bias, gate_weight).contiguous()


@_gated_cross.register_fake
def _(x0, xl, weight, bias, gate_weight, allow_tf32=None):
    if weight.dim() == 3:  # a group of G layers
        return xl.new_empty((weight.shape[0], xl.shape[-2], xl.shape[-1]))
    return xl.new_empty(xl.shape)


@torch.library.custom_op("dtn::gated_cross_backward", mutates_args=())
def _gated_cross_backward(grad_out: Tensor, x0: Tensor, xl: Tensor, weight: Tensor, bias: Tensor,
                          gate_weight: Optional[Tensor], allow_tf32: Optional[bool] = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx0, dxl, dW, db, dWg); dWg is an empty tensor when ungated."""
    if use_triton(xl):
        from ..triton.triton_gated_cross import gated_cross_backward

        grads = gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight, allow_tf32)
    else:
        grads = pt_gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight)
    dx0, dxl, dW, db, dWg = (g.contiguous() if g is not None else None for g in grads)
    return dx0, dxl, dW, db, (dWg if dWg is not None else weight.new_empty(0))


@_gated_cross_backward.register_fake
def _(grad_out, x0, xl, weight, bias, gate_weight, allow_tf32=None):
    dwg = gate_weight.new_empty(gate_weight.shape) if gate_weight is not None else weight.new_empty(0)
    return x0.new_empty(x0.shape), xl.new_empty(xl.shape), weight.new_empty(weight.shape), \
        bias.new_empty(bias.shape), dwg


def _setup_context(ctx, inputs, output):
    x0, xl, weight, bias, gate_weight, allow_tf32 = inputs
    ctx.gated = gate_weight is not None
    ctx.allow_tf32 = allow_tf32
    ctx.save_for_backward(x0, xl, weight, bias, gate_weight)


def _backward(ctx, grad_out):
    x0, xl, weight, bias, gate_weight = ctx.saved_tensors
    dx0, dxl, dW, db, dWg = torch.ops.dtn.gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight,
                                                               ctx.allow_tf32)
    return dx0, dxl, dW, db, (dWg if ctx.gated else None), None


_gated_cross.register_autograd(_backward, setup_context=_setup_context)


def gated_cross(x0: Tensor, xl: Tensor, weight: Tensor, bias: Tensor, gate_weight: Optional[Tensor] = None,
                allow_tf32: Optional[bool] = None) -> Tensor:
    """One cross layer through ``torch.ops.dtn.gated_cross``; casts to the autocast dtype (or xl's)."""
    dt = compute_dtype(xl)
    x0, xl, weight, bias, gate_weight = cast_floats(dt, x0, xl, weight, bias, gate_weight)
    return torch.ops.dtn.gated_cross(x0, xl, weight, bias, gate_weight, allow_tf32)


def cross_network(e: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                  gate_weights: Optional[Sequence[Optional[Tensor]]] = None, allow_tf32: Optional[bool] = None) -> Tensor:
    """c_L of L stacked cross layers on e (x0 = e for every layer): one op call per layer."""
    gate_weights = gate_weights if gate_weights is not None else [None] * len(weights)
    x = e
    for w, b, g in zip(weights, biases, gate_weights):
        x = gated_cross(e, x, w, b, g, allow_tf32)
    return x
