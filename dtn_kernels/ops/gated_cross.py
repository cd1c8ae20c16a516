"""``torch.ops.dtn.gated_cross``: one GDCN / DCN-v2 cross layer, or a group of G in one launch.

    out = x0 * (xl W^T + b) * sigmoid(xl Wg^T) + xl        (gate_weight=None: no sigmoid factor)

A group: ``weight`` / ``gate_weight`` [G, D, D] and ``bias`` [G, D]; ``x0`` / ``xl`` [G, B, D], or
[B, D] when every member reads the same input (DTN's MFI modules all start from e); out [G, B, D].

CUDA tensors run the Triton kernels (dtn_kernels/triton/triton_gated_cross.py); CPU tensors
run the PyTorch twin (dtn_kernels/reference/pt_gated_cross.py) unless DTN_TRITON_ON_CPU=1.
The op also returns the pre-activations z = xl W^T + b and a = xl Wg^T (non-differentiable), which
the backward (``torch.ops.dtn.gated_cross_backward``) reads instead of recomputing the dual GEMM.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference._group import member, stack_members
from ..reference.pt_gated_cross import pt_gated_cross_backward, pt_gated_cross_from_pre, pt_gated_cross_pre
from ..precision import cast_floats, compute_dtype, use_triton


@torch.library.custom_op("dtn::gated_cross", mutates_args=())
def _gated_cross(x0: Tensor, xl: Tensor, weight: Tensor, bias: Tensor, gate_weight: Optional[Tensor],
                 allow_tf32: Optional[bool] = None, save_pre: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(out, z, a): z = xl W^T + b and a = xl Wg^T are what the backward reads (non-differentiable;
    a is empty when ungated, both empty when ``save_pre`` is False)."""
    if use_triton(xl):
        from ..triton.triton_gated_cross import gated_cross_forward

        return gated_cross_forward(x0, xl, weight, bias, gate_weight, allow_tf32, save_pre)
    z, a = pt_gated_cross_pre(xl, weight, bias, gate_weight)
    out = pt_gated_cross_from_pre(x0, xl, z, a).contiguous()
    if not save_pre:  # outputs may not alias: two distinct empty tensors
        return out, xl.new_empty((0,)), xl.new_empty((0,))
    return out, z.contiguous(), (a.contiguous() if a is not None else xl.new_empty((0,)))


@_gated_cross.register_fake
def _(x0, xl, weight, bias, gate_weight, allow_tf32=None, save_pre=True):
    shape = (weight.shape[0], xl.shape[-2], xl.shape[-1]) if weight.dim() == 3 else tuple(xl.shape)  # a group of G
    if not save_pre:
        return xl.new_empty(shape), xl.new_empty((0,)), xl.new_empty((0,))
    return xl.new_empty(shape), xl.new_empty(shape), xl.new_empty(shape if gate_weight is not None else (0,))


@torch.library.custom_op("dtn::gated_cross_backward", mutates_args=())
def _gated_cross_backward(grad_out: Tensor, x0: Tensor, xl: Tensor, weight: Tensor, bias: Tensor,
                          gate_weight: Optional[Tensor], z: Tensor, a: Tensor, allow_tf32: Optional[bool] = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx0, dxl, [dW; dWg], db): the weight gradients come stacked along the output rows ([2D, D],
    or [G, 2D, D] for a group; [D, D] when ungated) because one GEMM produces both; the autograd
    formula hands each weight its half (a view). ``z`` / ``a``: the forward's pre-activations
    (empty: recomputed)."""
    if use_triton(xl):
        from ..triton.triton_gated_cross import gated_cross_backward

        dx0, dxl, dwcat, db = gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight, z, a, allow_tf32)
        return dx0.contiguous(), dxl.contiguous(), dwcat, db.contiguous()
    if weight.dim() == 3:  # a group on the twin: member by member
        res = [pt_gated_cross_backward(grad_out[g], member(x0, g, 3), member(xl, g, 3), weight[g], bias[g],
                                       member(gate_weight, g, 3), member(z, g, 3), member(a, g, 3))
               for g in range(weight.shape[0])]
        dx0, dxl, dW, db, dWg = stack_members(res, {0: x0.dim() == 2, 1: xl.dim() == 2})
    else:
        dx0, dxl, dW, db, dWg = pt_gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight,
                                                        z if z.numel() else None, a if a.numel() else None)
    dwcat = torch.cat([dW, dWg], dim=-2) if dWg is not None else dW
    return dx0.contiguous(), dxl.contiguous(), dwcat.contiguous(), db.contiguous()


@_gated_cross_backward.register_fake
def _(grad_out, x0, xl, weight, bias, gate_weight, z, a, allow_tf32=None):
    rows = weight.shape[-2] * (2 if gate_weight is not None else 1)
    return x0.new_empty(x0.shape), xl.new_empty(xl.shape), weight.new_empty((*weight.shape[:-2], rows,
                                                                              weight.shape[-1])), \
        bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x0, xl, weight, bias, gate_weight, allow_tf32, save_pre = inputs
    _, z, a = output
    ctx.gated = gate_weight is not None
    ctx.allow_tf32 = allow_tf32
    ctx.mark_non_differentiable(z, a)
    ctx.set_materialize_grads(False)  # no zero tensors for the pre-activations' (absent) gradients
    ctx.save_for_backward(x0, xl, weight, bias, gate_weight, z, a)


def _backward(ctx, grad_out, *_pre_grads):
    if grad_out is None:
        return (None,) * 7
    x0, xl, weight, bias, gate_weight, z, a = ctx.saved_tensors
    dx0, dxl, dwcat, db = torch.ops.dtn.gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight, z, a,
                                                             ctx.allow_tf32)
    D = weight.shape[-2]
    dW, dWg = (dwcat[..., :D, :], dwcat[..., D:, :]) if ctx.gated else (dwcat, None)
    return dx0, dxl, dW, db, dWg, None, None


_gated_cross.register_autograd(_backward, setup_context=_setup_context)


def gated_cross(x0: Tensor, xl: Tensor, weight: Tensor, bias: Tensor, gate_weight: Optional[Tensor] = None,
                allow_tf32: Optional[bool] = None) -> Tensor:
    """One cross layer through ``torch.ops.dtn.gated_cross``; casts to the autocast dtype (or xl's).
    The pre-activations are kept for the backward only when a gradient will be needed."""
    dt = compute_dtype(xl)
    x0, xl, weight, bias, gate_weight = cast_floats(dt, x0, xl, weight, bias, gate_weight)
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x0, xl, weight, bias, gate_weight))
    return torch.ops.dtn.gated_cross(x0, xl, weight, bias, gate_weight, allow_tf32, save_pre)[0]


def cross_network(e: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                  gate_weights: Optional[Sequence[Optional[Tensor]]] = None, allow_tf32: Optional[bool] = None) -> Tensor:
    """c_L of L stacked cross layers on e (x0 = e for every layer): one op call per layer."""
    gate_weights = gate_weights if gate_weights is not None else [None] * len(weights)
    x = e
    for w, b, g in zip(weights, biases, gate_weights):
        x = gated_cross(e, x, w, b, g, allow_tf32)
    return x
