"""Fused sparse embedding optimizers: the embedding bag's backward with the optimizer applied to the
rows the batch touched (``embedding_bag_backward_update``), and the update alone from row gradients
(``embedding_rows_update``, for row gradients gathered across ranks).

Each dispatches to the compiled ``torch.ops.dtn.*`` op (C++ on CPU, CUDA on GPU) when the extension
has it, and otherwise to its pure-PyTorch twin in :mod:`dtn_kernels.reference.pt_embedding_update`,
which documents the math (sgd, rowwise_adagrad, lazy_adam; weight decay on touched rows only).
Both update ``weight`` and the optimizer state in place and return nothing; neither builds an
[R, d] gradient. This module also registers the ops' fake (meta) kernels.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

import dtn_kernels
from dtn_kernels.reference.pt_embedding_update import (OPTIMIZERS, pt_embedding_bag_backward_update,
                                                       pt_embedding_rows_update)

__all__ = ["OPTIMIZERS", "embedding_bag_backward_update", "embedding_rows_update", "state_shapes"]


def state_shapes(optimizer: str, rows: int, dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of (state1, state2) that ``optimizer`` keeps for a [rows, dim] weight (float32)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"embedding optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    return {"sgd": ((0,), (0,)), "rowwise_adagrad": ((rows,), (0,)),
            "lazy_adam": ((rows, dim), (rows, dim))}[optimizer]


_HAS_OP: dict[str, bool] = {}


def _has_op(name: str) -> bool:
    if name not in _HAS_OP:
        _HAS_OP[name] = dtn_kernels.HAS_C_EXT and hasattr(torch.ops.dtn, name)
    return _HAS_OP[name]


_warned_stale: set[str] = set()


def _compiled(name: str, device: torch.device) -> bool:
    if not dtn_kernels.HAS_C_EXT:
        dtn_kernels.warn_missing_extension(f"{name} op")
        return False
    if not _has_op(name):  # _C loaded, but it was compiled from sources older than the op
        if name not in _warned_stale:
            _warned_stale.add(name)
            warnings.warn(f"dtn_kernels: dtn_kernels._C is built but has no {name} op (a stale build, compiled "
                          "before the op existed); using the pure-PyTorch reference instead. Rebuild with "
                          "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) to "
                          "get it.", RuntimeWarning, stacklevel=3)
        return False
    if device.type == "cuda" and not dtn_kernels.HAS_CUDA_EXT:
        dtn_kernels.warn_missing_extension(f"{name} CUDA kernel")
        return False
    return True


def embedding_bag_backward_update(grad_output: torch.Tensor, weight: torch.Tensor, table_offsets: torch.Tensor,
                                  indices: torch.Tensor, offsets: torch.Tensor, mode: str,
                                  per_sample_weights: Optional[torch.Tensor], padding_idx: Optional[int],
                                  optimizer: str, state1: torch.Tensor, state2: torch.Tensor, lr: float,
                                  beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                                  weight_decay: float = 0.0, step: int = 1, grad_scale: float = 1.0) -> None:
    """The backward of :func:`dtn_kernels.ops.embedding_bag` (same layout arguments) with ``optimizer``
    applied in place to the touched rows of ``weight``. See the module docstring of
    :mod:`dtn_kernels.reference.pt_embedding_update` for the math and the state each optimizer keeps."""
    if _compiled("embedding_bag_backward_update", weight.device):
        torch.ops.dtn.embedding_bag_backward_update(grad_output, weight, table_offsets, indices, offsets, mode,
                                                    per_sample_weights, padding_idx, optimizer, state1, state2,
                                                    float(lr), float(beta1), float(beta2), float(eps),
                                                    float(weight_decay), int(step), float(grad_scale))
        return
    pt_embedding_bag_backward_update(grad_output, weight, table_offsets, indices, offsets, mode, per_sample_weights,
                                     padding_idx, optimizer, state1, state2, lr, beta1, beta2, eps, weight_decay, step,
                                     grad_scale)


def embedding_rows_update(weight: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, rows: torch.Tensor,
                          row_grads: torch.Tensor, optimizer: str, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                          eps: float = 1e-8, weight_decay: float = 0.0, step: int = 1, grad_scale: float = 1.0) -> None:
    """``optimizer`` applied in place to ``rows`` (global rows, may repeat: summed in input order first)
    with gradients ``row_grads`` [n, d]."""
    if _compiled("embedding_rows_update", weight.device):
        torch.ops.dtn.embedding_rows_update(weight, state1, state2, rows, row_grads, optimizer, float(lr), float(beta1),
                                            float(beta2), float(eps), float(weight_decay), int(step), float(grad_scale))
        return
    pt_embedding_rows_update(weight, state1, state2, rows, row_grads, optimizer, lr, beta1, beta2, eps, weight_decay,
                             step, grad_scale)


# ----------------------------------------------------------------------------- registration


def _fake_backward_update(grad_output, weight, table_offsets, indices, offsets, pooling, per_sample_weights,
                          padding_idx, optimizer, state1, state2, lr, beta1, beta2, eps, weight_decay, step,
                          grad_scale):
    """Updates in place and returns nothing: the fake kernel only checks what shapes can tell."""
    if optimizer not in OPTIMIZERS:
        raise RuntimeError(f"dtn::embedding_bag_backward_update: optimizer must be one of {list(OPTIMIZERS)}, "
                           f"got '{optimizer}'")
    return None


def _fake_rows_update(weight, state1, state2, rows, row_grads, optimizer, lr, beta1, beta2, eps, weight_decay, step,
                      grad_scale):
    if optimizer not in OPTIMIZERS:
        raise RuntimeError(f"dtn::embedding_rows_update: optimizer must be one of {list(OPTIMIZERS)}, "
                           f"got '{optimizer}'")
    return None


if _has_op("embedding_bag_backward_update"):
    torch.library.register_fake("dtn::embedding_bag_backward_update")(_fake_backward_update)
if _has_op("embedding_rows_update"):
    torch.library.register_fake("dtn::embedding_rows_update")(_fake_rows_update)
