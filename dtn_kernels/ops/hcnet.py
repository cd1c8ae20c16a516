"""``torch.ops.dtn.hcnet``: MemoNet HCNet's hashing, codebook gather, linear restoring and global
attentive shrinking in one op (the SENet producing the attention weights stays in PyTorch).

    U[b, s] = sum_{k ∋ s} attn[b, k] * W_o [C[h_1(k)] | ... | C[h_H(k)]]     -> [B, S, d]

CUDA tensors run the Triton kernel (no [B, M, H, d_c] tensor); CPU tensors the twin unless
DTN_TRITON_ON_CPU=1. The codebook stays in its own dtype (the fp32 parameter; only gathered rows
are converted, in registers) while the restore weight, the attention weights and U are in the compute
dtype. Gradients: codebook (dense, in the codebook's dtype, like the reference), restore weight,
attention weights; none for ids, salts, seeds. A group of G HCNets over the same fields in one
launch: ``seeds`` [G, H], ``codebook`` [G, books, N, d_c], ``restore_weight`` [G, d, H*d_c], ``attn``
[G, B, M] -> [G, B, S, d] (ids and salts shared). ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)`` through :func:`hcnet`) makes the codebook
gradient's summation order fixed (sort + segmented sums instead of atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.pt_hcnet import pt_hcnet, pt_hcnet_backward
from ..precision import cast_floats, compute_dtype, use_triton


@torch.library.custom_op("dtn::hcnet", mutates_args=())
def _hcnet(ids: Tensor, salts: Tensor, seeds: Tensor, codebook: Tensor, restore_weight: Tensor, attn: Tensor,
           deterministic: bool = False, allow_tf32: Optional[bool] = None) -> Tensor:
    if use_triton(codebook) and use_triton(restore_weight):
        from ..triton.triton_hcnet import hcnet_forward

        return hcnet_forward(ids, salts, seeds, codebook, restore_weight, attn, allow_tf32)
    return pt_hcnet(ids, salts, seeds, codebook, restore_weight, attn).contiguous()


@_hcnet.register_fake
def _(ids, salts, seeds, codebook, restore_weight, attn, deterministic=False, allow_tf32=None):
    lead = (codebook.shape[0],) if codebook.dim() == 4 else ()  # a group of G HCNets
    return restore_weight.new_empty((*lead, ids.shape[0], ids.shape[1], restore_weight.shape[-2]))


@torch.library.custom_op("dtn::hcnet_backward", mutates_args=())
def _hcnet_backward(grad_u: Tensor, ids: Tensor, salts: Tensor, seeds: Tensor, codebook: Tensor,
                    restore_weight: Tensor, attn: Tensor, deterministic: bool = False, allow_tf32: Optional[bool] = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(d codebook, d restore weight, d attn)."""
    if use_triton(codebook) and use_triton(restore_weight):
        from ..triton.triton_hcnet import hcnet_backward

        grads = hcnet_backward(grad_u, ids, salts, seeds, codebook, restore_weight, attn, deterministic, allow_tf32)
    else:
        grads = pt_hcnet_backward(grad_u, ids, salts, seeds, codebook, restore_weight, attn)
    return tuple(g.contiguous() for g in grads)


@_hcnet_backward.register_fake
def _(grad_u, ids, salts, seeds, codebook, restore_weight, attn, deterministic=False, allow_tf32=None):
    return codebook.new_empty(codebook.shape), restore_weight.new_empty(restore_weight.shape), \
        attn.new_empty(attn.shape)


def _setup_context(ctx, inputs, output):
    ids, salts, seeds, codebook, restore_weight, attn, deterministic, allow_tf32 = inputs
    ctx.deterministic, ctx.allow_tf32 = deterministic, allow_tf32
    ctx.save_for_backward(ids, salts, seeds, codebook, restore_weight, attn)


def _backward(ctx, grad_u):
    dcb, dwr, dattn = torch.ops.dtn.hcnet_backward(grad_u, *ctx.saved_tensors, ctx.deterministic, ctx.allow_tf32)
    return None, None, None, dcb, dwr, dattn, None, None


_hcnet.register_autograd(_backward, setup_context=_setup_context)


def hcnet(ids: Tensor, salts: Tensor, seeds: Tensor, codebook: Tensor, restore_weight: Tensor, attn: Tensor,
          deterministic: bool | None = None, allow_tf32: Optional[bool] = None) -> Tensor:
    """U [B, S, d] through ``torch.ops.dtn.hcnet``; ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``. Casts the restore weight and the attention weights
    to the autocast dtype (or attn's), never the codebook: the kernels read it in its own dtype (fp32)
    and convert only the rows they gather, and its gradient comes back in that dtype."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dt = compute_dtype(attn)
    restore_weight, attn = cast_floats(dt, restore_weight, attn)
    return torch.ops.dtn.hcnet(ids, salts, seeds, codebook, restore_weight, attn, deterministic, allow_tf32)
