"""Pure-PyTorch twins of the fused sparse embedding optimizers (same signatures as the compiled
``torch.ops.dtn.embedding_bag_backward_update`` and ``torch.ops.dtn.embedding_rows_update``).

They are the fallback without the extension, the test oracle and the documentation of the math.

**Touched rows.** A step touches the rows that a non-padding id of the batch names (global row
``table_offsets[t] + id``), whatever their gradient (a zero gradient still decays Adam's moments
and still gets weight decay). Every other row of ``weight`` and of the state is left bit for bit
as it was. Duplicate ids are reduced first, in input order (deterministic), in float32.

**The math**, per touched row ``r`` with reduced gradient ``g`` (float32, ``g *= grad_scale``),
weight ``w`` (read in float32, written back in the weight's dtype) and the step count ``t``
(1 for the first step; the caller counts, once per optimizer step):

* weight decay (L2, coupled, touched rows only): ``g = g + weight_decay * w``
* ``sgd``:              ``w = w - lr * g``
* ``rowwise_adagrad``:  ``s[r] = s[r] + mean(g * g)``;  ``w = w - lr * g / (sqrt(s[r]) + eps)``
  (``state1`` [R] float32; FBGEMM's EXACT_ROWWISE_ADAGRAD)
* ``lazy_adam``:        ``m = beta1 * m + (1 - beta1) * g``;  ``v = beta2 * v + (1 - beta2) * g * g``;
  ``w = w - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``
  (``state1`` = m, ``state2`` = v, both [R, d] float32: torch.optim.Adam's formula, applied only to
  the rows the batch touched; untouched rows keep stale moments: "lazy" Adam)

``state1`` / ``state2`` of an optimizer that does not use them are empty tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .pt_embedding_bag import check_jagged_input, pt_embedding_bag

__all__ = ["OPTIMIZERS", "pt_embedding_bag_backward_update", "pt_embedding_rows_update", "pt_touched_row_grads",
           "pt_apply_row_update"]

OPTIMIZERS = ("sgd", "rowwise_adagrad", "lazy_adam")


def pt_touched_row_grads(grad_output: torch.Tensor, weight: torch.Tensor, table_offsets: torch.Tensor,
                         indices: torch.Tensor, offsets: torch.Tensor, mode: str = "sum",
                         per_sample_weights: Optional[torch.Tensor] = None,
                         padding_idx: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [U] int64 sorted unique global rows, grads [U, d] float32): the weight gradient of the
    rows the batch touched, duplicates summed in input order. No [R, d] tensor (except for ``max``)."""
    T, B = check_jagged_input(weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx)
    D = weight.shape[1]
    off = offsets.long()
    lengths = off[1:] - off[:-1]
    bag_of = torch.repeat_interleave(torch.arange(T * B, device=off.device), lengths)
    lo = int(off[0]) if off.numel() else 0
    ids = indices.long()[lo: lo + bag_of.numel()]
    rows = ids + table_offsets[bag_of // max(B, 1)]
    keep = ids != padding_idx if padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
    if mode == "max":  # the gradient goes to each column's argmax: take it from autograd, keep touched rows
        w = weight.detach().float().requires_grad_()
        pt_embedding_bag(w, table_offsets, indices, offsets, mode, None, padding_idx).backward(grad_output.float())
        uniq = torch.unique(rows[keep], sorted=True)
        return uniq, w.grad[uniq]
    scale = torch.ones(ids.shape[0], dtype=torch.float32, device=ids.device)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights[lo: lo + ids.shape[0]].float()
    if mode == "mean":
        counts = torch.zeros(T * B, dtype=torch.float32, device=ids.device).index_add_(0, bag_of, keep.float())
        scale = scale / counts.clamp_min(1)[bag_of]
    bag_of, rows, scale = bag_of[keep], rows[keep], scale[keep]
    g = grad_output.float().view(B, T, D)[bag_of % max(B, 1), bag_of // max(B, 1)] * scale[:, None]
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    grads = torch.zeros(uniq.shape[0], D, dtype=torch.float32, device=g.device).index_add_(0, inverse, g)
    return uniq, grads


def _check_state(optimizer: str, weight: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, op: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise RuntimeError(f"{op}: optimizer must be one of {list(OPTIMIZERS)}, got '{optimizer}'")
    R, D = weight.shape
    want = {"sgd": ((0,), (0,)), "rowwise_adagrad": ((R,), (0,)), "lazy_adam": ((R, D), (R, D))}[optimizer]
    for name, st, shape in (("state1", state1, want[0]), ("state2", state2, want[1])):
        if tuple(st.shape) != shape or (st.numel() and st.dtype != torch.float32) or st.device != weight.device:
            raise RuntimeError(f"{op}: {optimizer} needs {name} of shape {list(shape)} float32 on {weight.device}, "
                               f"got {list(st.shape)} {st.dtype} on {st.device}")


def _check_step(optimizer: str, step: int, op: str) -> None:
    if optimizer == "lazy_adam" and step < 1:  # the bias corrections 1 - beta**step would be 0
        raise RuntimeError(f"{op}: lazy_adam needs step >= 1 (the first step is 1), got {step}")


def pt_apply_row_update(weight: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, rows: torch.Tensor,
                        grads: torch.Tensor, optimizer: str, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, step: int, grad_scale: float) -> None:
    """Applies the update to ``rows`` (unique) with their reduced gradients ``grads`` [U, d], in place."""
    if rows.numel() == 0:
        return
    with torch.no_grad():
        g = grads.float() * grad_scale
        w = weight[rows].float()
        if weight_decay:
            g = g + weight_decay * w
        if optimizer == "sgd":
            w = w - lr * g
        elif optimizer == "rowwise_adagrad":
            s = state1[rows] + (g * g).mean(1)
            state1[rows] = s
            w = w - lr * g / (s.sqrt() + eps)[:, None]
        else:
            m = beta1 * state1[rows] + (1 - beta1) * g
            v = beta2 * state2[rows] + (1 - beta2) * g * g
            state1[rows], state2[rows] = m, v
            bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
            w = w - (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
        weight[rows] = w.to(weight.dtype)


def pt_embedding_bag_backward_update(grad_output: torch.Tensor, weight: torch.Tensor, table_offsets: torch.Tensor,
                                     indices: torch.Tensor, offsets: torch.Tensor, mode: str,
                                     per_sample_weights: Optional[torch.Tensor], padding_idx: Optional[int],
                                     optimizer: str, state1: torch.Tensor, state2: torch.Tensor, lr: float,
                                     beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                                     grad_scale: float = 1.0) -> None:
    """The embedding bag's backward with the optimizer fused in: updates ``weight`` (and the optimizer
    state) in place on the rows the batch touched. No weight gradient is returned or built."""
    _check_state(optimizer, weight, state1, state2, "dtn::embedding_bag_backward_update")
    _check_step(optimizer, step, "dtn::embedding_bag_backward_update")
    rows, grads = pt_touched_row_grads(grad_output, weight, table_offsets, indices, offsets, mode, per_sample_weights,
                                       padding_idx)
    pt_apply_row_update(weight, state1, state2, rows, grads, optimizer, lr, beta1, beta2, eps, weight_decay, step,
                        grad_scale)


def pt_embedding_rows_update(weight: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, rows: torch.Tensor,
                             row_grads: torch.Tensor, optimizer: str, lr: float, beta1: float, beta2: float, eps: float,
                             weight_decay: float, step: int, grad_scale: float = 1.0) -> None:
    """The update alone, from row gradients (e.g. gathered from every rank): ``rows`` [n] int64 global
    rows, may repeat (duplicates are summed in input order first), ``row_grads`` [n, d]."""
    op = "dtn::embedding_rows_update"
    _check_state(optimizer, weight, state1, state2, op)
    _check_step(optimizer, step, op)
    if rows.dim() != 1 or row_grads.dim() != 2 or row_grads.shape != (rows.shape[0], weight.shape[1]):
        raise RuntimeError(f"{op}: rows must be [n] and row_grads [n, {weight.shape[1]}], got {list(rows.shape)} and "
                           f"{list(row_grads.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weight.shape[0]):
        bad = rows[(rows < 0) | (rows >= weight.shape[0])][0]
        raise RuntimeError(f"{op}: row {int(bad)} is outside weight's rows [0, {weight.shape[0]})")
    uniq, inverse = torch.unique(rows.long(), sorted=True, return_inverse=True)
    grads = torch.zeros(uniq.shape[0], weight.shape[1], dtype=torch.float32, device=weight.device)
    grads.index_add_(0, inverse, row_grads.float())
    pt_apply_row_update(weight, state1, state2, uniq, grads, optimizer, lr, beta1, beta2, eps, weight_decay, step,
                        grad_scale)
