"""``torch.ops.dtn.softmax_gate``: a linear gate + softmax over experts + the weighted sum.

    weights = softmax(x W^T + b)  (experts with mask False at -inf),  out = sum_k weights_k * experts_k

Returns (out [B, h], weights [B, K]); both are differentiable. CUDA tensors run the Triton
kernels; CPU tensors the twin unless DTN_TRITON_ON_CPU=1.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.pt_softmax_gate import (pt_softmax_gate, pt_softmax_gate_backward, pt_softmax_mix,
                                        pt_softmax_mix_backward)
from ..precision import cast_floats, compute_dtype, use_triton


@torch.library.custom_op("dtn::softmax_gate", mutates_args=())
def _softmax_gate(x: Tensor, experts: Tensor, weight: Tensor, bias: Tensor, mask: Optional[Tensor],
                  allow_tf32: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from ..triton.triton_softmax_gate import softmax_gate_forward

        return softmax_gate_forward(x, experts, weight, bias, mask, allow_tf32)
    out, w = pt_softmax_gate(x, experts, weight, bias, mask)
    return out.contiguous(), w.contiguous()


@_softmax_gate.register_fake
def _(x, experts, weight, bias, mask, allow_tf32=None):
    return experts.new_empty((x.shape[0], experts.shape[2])), x.new_empty((x.shape[0], experts.shape[1]))


@torch.library.custom_op("dtn::softmax_gate_backward", mutates_args=())
def _softmax_gate_backward(grad_out: Tensor, grad_weights: Optional[Tensor], x: Tensor, experts: Tensor, weight: Tensor,
                           bias: Tensor, mask: Optional[Tensor], weights: Tensor, allow_tf32: Optional[bool] = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d experts, dW, db); ``grad_weights=None``: the weights were not used downstream."""
    if use_triton(x):
        from ..triton.triton_softmax_gate import softmax_gate_backward

        grads = softmax_gate_backward(grad_out, grad_weights, x, experts, weight, weights, allow_tf32)
    else:
        grads = pt_softmax_gate_backward(grad_out, grad_weights if grad_weights is not None else 0.0, x, experts,
                                         weight, bias, mask)
    return tuple(g.contiguous() for g in grads)


@_softmax_gate_backward.register_fake
def _(grad_out, grad_weights, x, experts, weight, bias, mask, weights, allow_tf32=None):
    return x.new_empty(x.shape), experts.new_empty(experts.shape), weight.new_empty(weight.shape), \
        bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, experts, weight, bias, mask, allow_tf32 = inputs
    ctx.allow_tf32 = allow_tf32
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensor
    ctx.save_for_backward(x, experts, weight, bias, mask, output[1])


def _backward(ctx, grad_out, grad_weights):
    x, experts, weight, bias, mask, weights = ctx.saved_tensors
    if grad_out is None and grad_weights is None:
        return (None,) * 6
    if grad_out is None:
        grad_out = x.new_zeros((x.shape[0], experts.shape[2]))
    dx, dexp, dW, db = torch.ops.dtn.softmax_gate_backward(grad_out, grad_weights, x, experts, weight, bias, mask,
                                                           weights, ctx.allow_tf32)
    return dx, dexp, dW, db, None, None


_softmax_gate.register_autograd(_backward, setup_context=_setup_context)


def softmax_gate(x: Tensor, experts: Tensor, weight: Tensor, bias: Tensor, mask: Optional[Tensor] = None,
                 allow_tf32: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """(out, weights) through ``torch.ops.dtn.softmax_gate``; casts to the autocast dtype (or x's)."""
    dt = compute_dtype(x)
    x, experts, weight, bias = cast_floats(dt, x, experts, weight, bias)
    return torch.ops.dtn.softmax_gate(x, experts, weight, bias, mask, allow_tf32)


# ----------------------------------------------------------------------------- softmax_mix: logits given


@torch.library.custom_op("dtn::softmax_mix", mutates_args=())
def _softmax_mix(logits: Tensor, experts: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if use_triton(experts):
        from ..triton.triton_softmax_gate import softmax_gate_forward

        return softmax_gate_forward(logits, experts, None, None, mask)
    out, w = pt_softmax_mix(logits, experts, mask)
    return out.contiguous(), w.contiguous()


@_softmax_mix.register_fake
def _(logits, experts, mask):
    return experts.new_empty((experts.shape[0], experts.shape[2])), logits.new_empty(logits.shape)


@torch.library.custom_op("dtn::softmax_mix_backward", mutates_args=())
def _softmax_mix_backward(grad_out: Tensor, grad_weights: Optional[Tensor], logits: Tensor, experts: Tensor,
                          weights: Tensor) -> tuple[Tensor, Tensor]:
    """(d logits, d experts)."""
    if use_triton(experts):
        from ..triton.triton_softmax_gate import softmax_gate_backward

        dl, dexp, _, _ = softmax_gate_backward(grad_out, grad_weights, logits, experts, None, weights)
    else:
        dl, dexp = pt_softmax_mix_backward(grad_out, grad_weights if grad_weights is not None else 0.0, experts,
                                           weights)
    return dl.to(logits.dtype).contiguous(), dexp.contiguous()


@_softmax_mix_backward.register_fake
def _(grad_out, grad_weights, logits, experts, weights):
    return logits.new_empty(logits.shape), experts.new_empty(experts.shape)


def _mix_setup_context(ctx, inputs, output):
    logits, experts, mask = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, experts, output[1])


def _mix_backward(ctx, grad_out, grad_weights):
    logits, experts, weights = ctx.saved_tensors
    if grad_out is None and grad_weights is None:
        return None, None, None
    if grad_out is None:
        grad_out = experts.new_zeros((experts.shape[0], experts.shape[2]))
    dl, dexp = torch.ops.dtn.softmax_mix_backward(grad_out, grad_weights, logits, experts, weights)
    return dl, dexp, None


_softmax_mix.register_autograd(_mix_backward, setup_context=_mix_setup_context)


def softmax_mix(logits: Tensor, experts: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, weights) = softmax over ``logits`` [B, K] (masked experts off), weighted sum of ``experts``
    [B, K, h]: the gate after its linear layer, for logits of several gates computed by one GEMM (the
    logits may be a column slice). Casts to the autocast dtype (or the experts')."""
    dt = compute_dtype(experts)
    logits, experts = cast_floats(dt, logits, experts)
    return torch.ops.dtn.softmax_mix(logits, experts, mask)
