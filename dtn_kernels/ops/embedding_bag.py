"""Table-batched embedding bag: many embedding tables pooled in one op.

``embedding_bag`` dispatches to ``torch.ops.dtn.embedding_bag`` (C++ on CPU, CUDA on GPU)
when ``dtn_kernels._C`` is built, and to the pure-PyTorch twin
:func:`dtn_kernels.reference.pt_embedding_bag` otherwise (with a one-time warning).
This module also registers the op's fake (meta) kernels and its autograd formula.

Bad ids on CUDA: the CUDA kernels never make the host wait for them. They skip a bad entry
and set a device-side flag; :func:`raise_pending_errors` (called at a point that synchronises
anyway, e.g. by the trainer every few steps and at the end of an epoch) raises it with the same
message the CPU kernel raises at once. :func:`set_check_every_call` (or
``DTN_CHECK_EVERY_CALL=1``) makes every CUDA call check at once instead, synchronising
(a debug mode). docs/embedding_bag.md says where each check happens.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

import dtn_kernels
from dtn_kernels.reference.pt_embedding_bag import pt_embedding_bag

__all__ = ["embedding_bag", "raise_pending_errors", "set_check_every_call", "check_every_call"]


def embedding_bag(weight: torch.Tensor, table_offsets: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                  mode: str = "sum", per_sample_weights: Optional[torch.Tensor] = None,
                  padding_idx: Optional[int] = None, sparse: bool = False) -> torch.Tensor:
    """Pools bags of ids from T embedding tables stacked in one ``weight``; returns [B, T*d].

    Layout (FBGEMM-style, table-major):

    * ``weight`` [R, d]: all tables stacked; table ``t`` owns rows
      ``table_offsets[t] : table_offsets[t+1]`` (tables may differ in size, and R may
      exceed ``table_offsets[-1]``).
    * ``table_offsets`` int64 [T+1], ``0 = table_offsets[0] <= ... <= table_offsets[T] <= R``.
    * ``indices`` int32/int64 [N]: the ids of every bag, **local to their table**.
    * ``offsets`` [T*B+1], same dtype as ``indices``, non-decreasing, ``<= N``: bag ``k = t*B + b``
      (sample ``b`` of table ``t``) is ``indices[offsets[k]:offsets[k+1]]``; it may be empty.
    * ``mode``: ``"sum"``, ``"mean"`` or ``"max"``; an empty bag gives zeros.
    * ``per_sample_weights`` [N] (same dtype as ``weight``, sum / mean only): id ``i``
      contributes ``w[i] * row``; ``mean`` divides the weighted sum by the bag's id count.
      Differentiable.
    * ``padding_idx``: ids equal to it (in any table, e.g. ``-1``) contribute nothing and
      are not counted by ``mean``. Any other id outside ``[0, rows of its table)`` is an error.
    * ``sparse``: the weight gradient is a coalesced sparse COO tensor holding only the
      touched rows (for large tables); otherwise dense.
    * Output [B, T*d]: ``out[b, t*d:(t+1)*d]`` is bag ``(t, b)``, i.e. ``out.view(B, T, d)``
      is ready to concatenate with other fields.

    Worked example: two tables (3 rows and 2 rows, d = 2), batch B = 2::

        >>> w = torch.arange(10.).view(5, 2)           # rows 0-2: table 0, rows 3-4: table 1
        >>> table_offsets = torch.tensor([0, 3, 5])
        >>> # table 0: sample 0 -> [2], sample 1 -> [0, 1];  table 1: sample 0 -> [], sample 1 -> [1, 1]
        >>> indices = torch.tensor([2, 0, 1, 1, 1])
        >>> offsets = torch.tensor([0, 1, 3, 3, 5])    # bags (t0,b0) (t0,b1) (t1,b0) (t1,b1)
        >>> embedding_bag(w, table_offsets, indices, offsets, mode="sum")
        tensor([[ 4.,  5.,  0.,  0.],
                [ 2.,  4., 16., 18.]])

    Sample 0: table 0 is row 2 = [4, 5], table 1's bag is empty = [0, 0]. Sample 1:
    rows 0 + 1 = [2, 4], and table 1's local id 1 twice = global row 4 twice = [16, 18].

    Errors (``RuntimeError``) name the table and the bad value, e.g.
    ``dtn::embedding_bag: table 1: id 7 at indices[4] (bag 1) is outside the table's rows [0, 2)``.
    On CPU they are raised by the call; on CUDA by :func:`raise_pending_errors` (the call does
    not synchronise), or by the call itself in the :func:`set_check_every_call` debug mode.
    """
    if dtn_kernels.HAS_C_EXT and (weight.device.type != "cuda" or dtn_kernels.HAS_CUDA_EXT):
        return torch.ops.dtn.embedding_bag(
            weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx, sparse
        )
    dtn_kernels.warn_missing_extension("embedding_bag op" if not dtn_kernels.HAS_C_EXT else "embedding_bag CUDA kernel")
    return pt_embedding_bag(weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx, sparse)


# ----------------------------------------------------------------------------- deferred errors (CUDA)


def _ext_fn(name: str):
    """A host utility of the CUDA build of ``dtn_kernels._C``, or None (CPU build, no build)."""
    return getattr(dtn_kernels._C, name, None) if dtn_kernels.HAS_C_EXT else None


def raise_pending_errors(device: Union[None, int, str, torch.device] = None) -> None:
    """Raise the bad-input error the CUDA kernels flagged since the last check, if any.

    On CUDA, ``embedding_bag`` and its backward skip a bad id or offset and record the first
    one in a per-device flag instead of synchronising to raise at once. This reads that flag
    (waiting for the device: it is a sync point), clears it and raises the ``RuntimeError``
    the CPU kernel would have raised, e.g.
    ``dtn::embedding_bag: table 1: id 7 at indices[3] (bag 1) is outside the table's rows [0, 2)``.
    When several entries were bad, it names one of them (the CPU kernel names the first).

    ``device``: a CUDA device (index, name or ``torch.device``); ``None``: every CUDA device the
    op has run on. A no-op on CPU (the CPU kernels raise at once), without the CUDA build, and
    when nothing is pending. Not callable while a CUDA graph is being captured.
    """
    take = _ext_fn("_embedding_bag_take_error")
    if take is None:
        return
    if device is None:
        indices = range(torch.cuda.device_count())
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            return
        indices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    for index in indices:
        message = take(index)
        if message:
            raise RuntimeError(message)


_CHECK_EVERY_CALL = os.environ.get("DTN_CHECK_EVERY_CALL", "0").lower() in ("1", "true", "yes")


def set_check_every_call(on: bool) -> None:
    """Debug mode: every CUDA call of the op synchronises and raises a bad id at once (as the
    CPU kernels do), except while a CUDA graph is being captured. Off by default; also switched
    on by ``DTN_CHECK_EVERY_CALL=1`` in the environment. CPU calls always raise at once."""
    global _CHECK_EVERY_CALL
    _CHECK_EVERY_CALL = bool(on)
    fn = _ext_fn("_embedding_bag_set_check_every_call")
    if fn is not None:
        fn(_CHECK_EVERY_CALL)


def check_every_call() -> bool:
    """Whether the debug mode of :func:`set_check_every_call` is on."""
    fn = _ext_fn("_embedding_bag_check_every_call")
    return bool(fn()) if fn is not None else _CHECK_EVERY_CALL


# ----------------------------------------------------------------------------- registration


def _num_bags(table_offsets: torch.Tensor, offsets: torch.Tensor) -> tuple[int, int]:
    T = table_offsets.shape[0] - 1
    return T, (offsets.shape[0] - 1) // T


def _check_devices(*tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"dtn::embedding_bag: all tensors must be on one device, got {sorted(map(str, devices))}")


def _fake_embedding_bag(weight, table_offsets, indices, offsets, mode="sum", per_sample_weights=None,
                        padding_idx=None, sparse=False):
    _check_devices(weight, table_offsets, indices, offsets, per_sample_weights)
    T, B = _num_bags(table_offsets, offsets)
    return weight.new_empty((B, T * weight.shape[1]))


def _fake_backward(grad_output, weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx,
                   compute_psw_grad):
    n = indices.shape[0] if (compute_psw_grad and per_sample_weights is not None) else 0
    return weight.new_empty(weight.shape), weight.new_empty((n,))


def _fake_backward_sparse(grad_output, weight, table_offsets, indices, offsets, mode, per_sample_weights,
                          padding_idx, compute_psw_grad):
    u = torch.library.get_ctx().new_dynamic_size()
    n = indices.shape[0] if (compute_psw_grad and per_sample_weights is not None) else 0
    return (weight.new_empty((u,), dtype=torch.int64), weight.new_empty((u, weight.shape[1])),
            weight.new_empty((n,)))


def _setup_context(ctx, inputs, output):
    weight, table_offsets, indices, offsets, mode, psw, padding_idx, sparse = inputs
    ctx.save_for_backward(weight, table_offsets, indices, offsets, psw)
    ctx.mode, ctx.padding_idx, ctx.sparse = mode, padding_idx, sparse


def _backward(ctx, grad):
    weight, table_offsets, indices, offsets, psw = ctx.saved_tensors
    want_psw = psw is not None and ctx.needs_input_grad[5]
    args = (grad, weight, table_offsets, indices, offsets, ctx.mode, psw, ctx.padding_idx, want_psw)
    if ctx.sparse:
        rows, row_grads, grad_psw = torch.ops.dtn.embedding_bag_backward_sparse(*args)
        grad_weight = torch.sparse_coo_tensor(rows[None], row_grads, weight.shape, is_coalesced=True,
                                              check_invariants=False)
    else:
        grad_weight, grad_psw = torch.ops.dtn.embedding_bag_backward(*args)
    return (grad_weight if ctx.needs_input_grad[0] else None, None, None, None, None,
            grad_psw if want_psw else None, None, None)


if dtn_kernels.HAS_C_EXT:
    torch.library.register_fake("dtn::embedding_bag")(_fake_embedding_bag)
    torch.library.register_fake("dtn::embedding_bag_backward")(_fake_backward)
    torch.library.register_fake("dtn::embedding_bag_backward_sparse")(_fake_backward_sparse)
    torch.library.register_autograd("dtn::embedding_bag", _backward, setup_context=_setup_context)
