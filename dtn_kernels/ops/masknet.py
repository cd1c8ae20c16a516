"""``torch.ops.dtn.mask_block``: MaskNet's MaskBlock with its instance mask.

    out = ReLU(LayerNorm(W3 (mask * v))),   mask = W2 ReLU(W1 e + b1) + b2

The op returns (out, hid, mask, z, mean, rstd): the last five are the tensors its backward
reuses (not differentiable; use ``out``). A group of G blocks in one launch: every parameter with a
leading G; ``e`` / ``v`` [G, B, .] or [B, .] shared by all members; every output [G, ...]. CUDA tensors run the Triton kernels; CPU tensors
the twin unless DTN_TRITON_ON_CPU=1.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.pt_masknet import pt_mask_block, pt_mask_block_backward
from ..precision import cast_floats, compute_dtype, use_triton


@torch.library.custom_op("dtn::mask_block", mutates_args=())
def _mask_block(e: Tensor, v: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, gamma: Tensor,
                beta: Tensor, eps: float = 1e-5, allow_tf32: Optional[bool] = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if use_triton(v):
        from ..triton.triton_masknet import mask_block_forward

        return mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, eps, allow_tf32)
    return tuple(t.contiguous() for t in pt_mask_block(e, v, w1, b1, w2, b2, w3, gamma, beta, eps))


@_mask_block.register_fake
def _(e, v, w1, b1, w2, b2, w3, gamma, beta, eps=1e-5, allow_tf32=None):
    B, DV = v.shape[-2:]
    DO, HM = w3.shape[-2], w1.shape[-2]
    lead = (w3.shape[0],) if w3.dim() == 3 else ()  # a group of G blocks
    return (v.new_empty((*lead, B, DO)), v.new_empty((*lead, B, HM)), v.new_empty((*lead, B, DV)),
            v.new_empty((*lead, B, DO)), v.new_empty((*lead, B), dtype=torch.float32),
            v.new_empty((*lead, B), dtype=torch.float32))


@torch.library.custom_op("dtn::mask_block_backward", mutates_args=())
def _mask_block_backward(grad_out: Tensor, e: Tensor, v: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                         w3: Tensor, gamma: Tensor, beta: Tensor, hid: Tensor, mask: Tensor, z: Tensor,
                         mean: Tensor, rstd: Tensor, eps: float = 1e-5, allow_tf32: Optional[bool] = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(de, dv, dW1, db1, dW2, db2, dW3, dgamma, dbeta)."""
    if use_triton(v):
        from ..triton.triton_masknet import mask_block_backward

        grads = mask_block_backward(grad_out, e, v, w1, w2, w3, gamma, beta, hid, mask, z, mean, rstd, allow_tf32)
    else:
        grads = pt_mask_block_backward(grad_out, e, v, w1, b1, w2, b2, w3, gamma, beta, eps)
    return tuple(g.contiguous() for g in grads)


@_mask_block_backward.register_fake
def _(grad_out, e, v, w1, b1, w2, b2, w3, gamma, beta, hid, mask, z, mean, rstd, eps=1e-5, allow_tf32=None):
    return tuple(t.new_empty(t.shape) for t in (e, v, w1, b1, w2, b2, w3, gamma, beta))


def _setup_context(ctx, inputs, output):
    e, v, w1, b1, w2, b2, w3, gamma, beta, eps, allow_tf32 = inputs
    ctx.eps, ctx.allow_tf32 = eps, allow_tf32
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for the five saved outputs' (absent) gradients
    ctx.save_for_backward(e, v, w1, b1, w2, b2, w3, gamma, beta, *output[1:])


def _backward(ctx, grad_out, *_aux_grads):
    if grad_out is None:
        return (None,) * 11
    grads = torch.ops.dtn.mask_block_backward(grad_out, *ctx.saved_tensors, ctx.eps, ctx.allow_tf32)
    return (*grads, None, None)


_mask_block.register_autograd(_backward, setup_context=_setup_context)


def mask_block(e: Tensor, v: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, gamma: Tensor,
               beta: Tensor, eps: float = 1e-5, allow_tf32: Optional[bool] = None) -> Tensor:
    """MaskBlock output [B, DO] through ``torch.ops.dtn.mask_block``; casts to the autocast dtype (or v's)."""
    dt = compute_dtype(v)
    args = cast_floats(dt, e, v, w1, b1, w2, b2, w3, gamma, beta)
    return torch.ops.dtn.mask_block(*args, eps, allow_tf32)[0]
