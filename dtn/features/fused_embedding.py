"""The input layer's fused sparse embedding optimizer (``train.embedding_optimizer``: ``sgd``,
``rowwise_adagrad``, ``lazy_adam``).

With one attached (:meth:`dtn.features.InputLayer.use_sparse_optimizer`), a training forward of the
input layer runs the table-batched lookup through :class:`_FusedEmbeddingBag`, whose backward applies
the optimizer to the rows the batch touched (``dtn_kernels.ops.embedding_update``): no [R, d] gradient
is built, ``weight.grad`` stays None, and rows the batch did not touch (and their optimizer state) are
left bit for bit as they were. The math of each optimizer: :mod:`dtn_kernels.reference.pt_embedding_update`.

State: ``state1`` / ``state2`` (float32, the shapes of ``dtn_kernels.ops.embedding_update.state_shapes``)
are buffers of :class:`SparseEmbeddingOptimizer`, a submodule of the input layer
(``input_layer.sparse_optimizer.*`` in the model's ``state_dict``); the step count is its extra state.
So ``last.pt`` carries them. A model file without them (``best.pt``) loads into a layer that has an
optimizer (its state is kept), and a state_dict with them loads into a layer without one (ignored).

Two ways to apply the update:

* **immediate** (one process, no fp16 GradScaler): inside the backward, by the fused
  ``embedding_bag_backward_update`` op;
* **deferred** (``deferred = True``: DDP, fp16): the backward only records the touched rows and their
  gradients (``take_pending``); the trainer gathers them over ranks, lets the GradScaler decide, and
  calls :meth:`SparseEmbeddingOptimizer.apply_rows` (``embedding_rows_update``).

The dense path (a dense ``weight.grad``) is what runs in eval, without grad, and under
``torch.compile`` / ``torch.export`` (``torch.compiler.is_compiling()``); a compiled training step
therefore does not update the embedding rows through the fused optimizer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dtn_kernels.ops import embedding_bag
from dtn_kernels.ops.embedding_update import (OPTIMIZERS, embedding_bag_backward_update, embedding_rows_update,
                                              state_shapes)
from dtn_kernels.reference.pt_embedding_bag import pt_embedding_bag
from dtn_kernels.reference.pt_embedding_update import pt_touched_row_grads

import dtn_kernels

__all__ = ["SPARSE_OPTIMIZERS", "SparseEmbeddingOptimizer", "fused_embedding_bag", "touched_row_grads",
           "is_optimizer_state_key", "without_optimizer_state"]

SPARSE_OPTIMIZERS = OPTIMIZERS  # ("sgd", "rowwise_adagrad", "lazy_adam")
STATE_PREFIX = "sparse_optimizer."


def is_optimizer_state_key(key: str) -> bool:
    """Whether a model state_dict key belongs to an input layer's fused optimizer state."""
    return key.startswith(STATE_PREFIX) or ("." + STATE_PREFIX) in key


def without_optimizer_state(state: dict) -> dict:
    """A model state_dict without the fused embedding optimizer's state (what a model file keeps)."""
    return {k: v for k, v in state.items() if not is_optimizer_state_key(k)}


def _has_compiled_sparse_backward(device: torch.device) -> bool:
    return dtn_kernels.HAS_C_EXT and hasattr(torch.ops.dtn, "embedding_bag_backward_sparse") and \
        (device.type != "cuda" or dtn_kernels.HAS_CUDA_EXT)


def _has_compiled_fused_backward(device: torch.device) -> bool:
    """Whether the fused op (backward + update in one) is built; without it, but with the compiled
    sparse backward, the layer composes the two (the twin of the fused op would rebuild the rows'
    gradients in Python, several times slower)."""
    if not _has_compiled_sparse_backward(device):
        return True  # nothing compiled: the dispatcher's twin does it all
    return hasattr(torch.ops.dtn, "embedding_bag_backward_update") and \
        (device.type != "cuda" or dtn_kernels.HAS_CUDA_EXT)


def touched_row_grads(grad_output, weight, table_offsets, indices, offsets, mode, psw):
    """(rows [U] sorted unique global rows, row_grads [U, d] float32) of a lookup's backward: the
    compiled sparse backward when built, else the PyTorch twin (same order of summation)."""
    if _has_compiled_sparse_backward(weight.device):
        rows, grads, _ = torch.ops.dtn.embedding_bag_backward_sparse(grad_output, weight, table_offsets, indices,
                                                                    offsets, mode, psw, None, False)
        return rows, grads.float()
    return pt_touched_row_grads(grad_output, weight, table_offsets, indices, offsets, mode, psw, None)


class SparseEmbeddingOptimizer(nn.Module):
    """The optimizer state of an input layer's [R, d] embedding weight and the hyper-parameters of its
    fused update. ``lr`` is a plain attribute the trainer sets before every step (the LR schedule's
    factor times ``train.embedding_lr``); ``step`` counts the updates applied (lazy_adam's bias
    correction uses it; the first update is step 1)."""

    def __init__(self, optimizer: str, rows: int, dim: int, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, device=None):
        super().__init__()
        s1, s2 = state_shapes(optimizer, rows, dim)  # raises on an unknown name
        self.optimizer = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.step = 0
        self.deferred = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.register_buffer("state1", torch.zeros(s1, dtype=torch.float32, device=device))
        self.register_buffer("state2", torch.zeros(s2, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        return f"{self.optimizer}, lr={self.lr:g}, weight_decay={self.weight_decay:g}, step={self.step}"

    # the step count travels with the state (state_dict key "..._extra_state")
    def get_extra_state(self):
        return {"optimizer": self.optimizer, "step": self.step}

    def set_extra_state(self, state) -> None:
        if state.get("optimizer") != self.optimizer:
            raise RuntimeError(f"sparse_optimizer: the state is of {state.get('optimizer')!r}, this layer uses "
                               f"{self.optimizer!r}")
        self.step = int(state["step"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not any(k.startswith(prefix) for k in state_dict):  # a model file (best.pt): keep this state
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _hyper(self) -> dict:
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay)

    # ---- called by the lookup's backward ---------------------------------------------------------
    def backward_update(self, grad_output, weight, table_offsets, indices, offsets, mode, psw) -> None:
        if self.deferred:
            self._pending.append(touched_row_grads(grad_output, weight, table_offsets, indices, offsets, mode, psw))
            return
        self.step += 1
        if _has_compiled_fused_backward(weight.device):
            embedding_bag_backward_update(grad_output, weight, table_offsets, indices, offsets, mode, psw, None,
                                          self.optimizer, self.state1, self.state2, step=self.step, **self._hyper())
        else:  # the same math in two steps: the compiled sparse backward, then the rows' update
            rows, grads = touched_row_grads(grad_output, weight, table_offsets, indices, offsets, mode, psw)
            embedding_rows_update(weight, self.state1, self.state2, rows, grads, self.optimizer, step=self.step,
                                  **self._hyper())

    # ---- the deferred update ---------------------------------------------------------------------
    def take_pending(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The (rows, row_grads) the backward(s) since the last call recorded, concatenated (None if
        none), and forget them."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        if len(pending) == 1:
            return pending[0]
        return torch.cat([r for r, _ in pending]), torch.cat([g for _, g in pending])

    def apply_rows(self, weight: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor,
                   grad_scale: float = 1.0) -> None:
        """One optimizer step on ``rows`` (may repeat: summed in input order) with ``row_grads * grad_scale``."""
        self.step += 1
        embedding_rows_update(weight, self.state1, self.state2, rows, row_grads, self.optimizer, step=self.step,
                              grad_scale=grad_scale, **self._hyper())


class _FusedEmbeddingBag(torch.autograd.Function):
    """``embedding_bag`` forward; the backward hands the output gradient to the optimizer, which
    updates the weight in place, and returns no weight gradient."""

    @staticmethod
    def forward(ctx, weight, opt, reference, table_offsets, indices, offsets, mode, psw):
        bag = pt_embedding_bag if reference else embedding_bag
        # the weight is not saved for backward: the update changes it in place (the lookup only needs the ids)
        ctx.opt, ctx.weight, ctx.mode = opt, weight, mode
        ctx.inputs = (table_offsets, indices, offsets, psw)
        return bag(weight.detach(), table_offsets, indices, offsets, mode, psw)

    @staticmethod
    def backward(ctx, grad):
        table_offsets, indices, offsets, psw = ctx.inputs
        with torch.no_grad():
            ctx.opt.backward_update(grad.contiguous(), ctx.weight.detach(), table_offsets, indices, offsets, ctx.mode,
                                    psw)
        return None, None, None, None, None, None, None, None


def fused_embedding_bag(weight: torch.Tensor, opt: SparseEmbeddingOptimizer, table_offsets, indices, offsets, mode,
                        psw=None, reference: bool = False) -> torch.Tensor:
    """``embedding_bag(weight, ...)`` whose backward applies ``opt`` to the touched rows of ``weight``."""
    if psw is not None and psw.requires_grad:
        raise ValueError("a fused embedding optimizer gives per-sample weights no gradient; they must not require grad")
    return _FusedEmbeddingBag.apply(weight, opt, reference, table_offsets, indices, offsets, mode, psw)
