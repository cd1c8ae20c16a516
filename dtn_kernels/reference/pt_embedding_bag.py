"""Pure-PyTorch twin of ``torch.ops.dtn.embedding_bag`` (same signature, built on F.embedding_bag).

It is the fallback when the compiled extension is missing, the test oracle, and the
documentation of the semantics. The layout is described in
:func:`dtn_kernels.ops.embedding_bag.embedding_bag`.

Checks. Shapes, dtypes and devices are always checked. Values (id ranges, offsets, table offsets)
are checked, with the compiled op's messages, when the ids are on the host (CPU tensors): reading
a check's result back from a GPU would make the host wait for the device on every step, as a user's
plain ``F.embedding_bag`` never does. Ids on a device take a path with no host synchronisation
(no value checks, no data-dependent shapes): check the host batch before the copy, as
``dtn.features.InputLayer.check_batch`` and the trainer do. It assumes what the checks establish:
valid ids, ``offsets[0] == 0`` and ``offsets[-1] == indices.numel()``. ``padding_idx`` on a device
still takes the checked path (dropping padding ids needs a data-dependent shape). Inside
:func:`device_path` CPU tensors take the device path too (``benchmarks/count_launches.py`` counts
a step's kernels and host syncs on the CPU as a GPU would run it).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["pt_embedding_bag", "check_jagged_input", "device_path", "checks_values"]

_OP = "dtn::embedding_bag"
_DEVICE_PATH = False


@contextlib.contextmanager
def device_path():
    """Within this context CPU tensors take the path device tensors take: no value checks and no
    host synchronisation (for counting what a step issues on a GPU, on the CPU)."""
    global _DEVICE_PATH
    prev, _DEVICE_PATH = _DEVICE_PATH, True
    try:
        yield
    finally:
        _DEVICE_PATH = prev


def checks_values(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the op checks values for these inputs: all on the CPU, outside :func:`device_path`."""
    return not _DEVICE_PATH and all(t.device.type == "cpu" for t in tensors if t is not None)


def _first_true(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def check_jagged_input(weight: torch.Tensor, table_offsets: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                       mode: str = "sum", per_sample_weights: Optional[torch.Tensor] = None,
                       padding_idx: Optional[int] = None, values: bool = True) -> tuple[int, int]:
    """Validates the input exactly like the compiled op (same messages); returns (T, B).

    ``values=False``: shapes, dtypes and devices only (no tensor is read, so no host sync)."""
    if mode not in ("sum", "mean", "max"):
        raise RuntimeError(f"{_OP}: mode must be 'sum', 'mean' or 'max', got '{mode}'")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise RuntimeError(f"{_OP}: weight must be a 2-D floating point tensor, got {weight.dtype} {tuple(weight.shape)}")
    if table_offsets.dim() != 1 or table_offsets.numel() < 2 or table_offsets.dtype != torch.int64:
        raise RuntimeError(f"{_OP}: table_offsets must be 1-D int64 with T+1 >= 2 entries")
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"{_OP}: indices must be 1-D int32 or int64, got {indices.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != indices.dtype:
        raise RuntimeError(f"{_OP}: offsets must have the dtype of indices ({indices.dtype}), got {offsets.dtype}")
    devs = {weight.device, table_offsets.device, indices.device, offsets.device}
    if len(devs) != 1:
        raise RuntimeError(f"{_OP}: weight, table_offsets, indices and offsets must be on one device, got {devs}")
    T = table_offsets.numel() - 1
    if (offsets.numel() - 1) % T:
        raise RuntimeError(f"{_OP}: offsets must have T*B+1 entries (T={T} tables), got {offsets.numel()}")
    B = (offsets.numel() - 1) // T
    N = indices.numel()
    if per_sample_weights is not None:
        if mode == "max":
            raise RuntimeError(f"{_OP}: per_sample_weights are only supported with mode 'sum' or 'mean'")
        if per_sample_weights.shape != (N,) or per_sample_weights.dtype != weight.dtype:
            raise RuntimeError(
                f"{_OP}: per_sample_weights must be 1-D with one weight per index ({N}) and the dtype of weight"
            )
        if per_sample_weights.device != weight.device:
            raise RuntimeError(f"{_OP}: per_sample_weights must be on {weight.device}")
    if not values:
        return T, B
    toff = table_offsets
    bad_tables = (toff[:-1] != 0).logical_and(torch.arange(T, device=toff.device) == 0)
    bad_tables |= toff[1:] < toff[:-1]
    bad_tables |= toff[1:] > weight.shape[0]
    if bool(bad_tables.any()):
        t = _first_true(bad_tables)
        raise RuntimeError(
            f"{_OP}: table {t}: table_offsets must be non-decreasing, start at 0 and end at most at weight.size(0); "
            f"got table_offsets[{t}]={int(toff[t])}, table_offsets[{t + 1}]={int(toff[t + 1])}"
        )
    off = offsets.long()
    s, e = off[:-1], off[1:]
    # first bad bag in bag order; within a bag, bounds before ids (as the kernels check)
    bag_bad = (s < 0) | (e < s) | (e > N)
    first_bag_bad = _first_true(bag_bad) if bool(bag_bad.any()) else T * B
    ids = indices.long()
    if N and T * B:
        lengths = (e - s).clamp_min(0)
        valid_bags = ~bag_bad
        bag_of = torch.repeat_interleave(torch.arange(T * B, device=off.device), torch.where(valid_bags, lengths, 0))
        pos = torch.arange(int(bag_of.numel()), device=off.device)
        # position of each of those ids in `indices`
        starts = torch.where(valid_bags, s, 0)
        first_of_bag = torch.cumsum(torch.where(valid_bags, lengths, 0), 0) - torch.where(valid_bags, lengths, 0)
        pos = starts[bag_of] + pos - first_of_bag[bag_of]
        rows = (toff[1:] - toff[:-1])[bag_of // max(B, 1)]
        v = ids[pos]
        bad = (v < 0) | (v >= rows)
        if padding_idx is not None:
            bad &= v != padding_idx
        if bool(bad.any()):
            j = _first_true(bad)
            k, i = int(bag_of[j]), int(pos[j])
            if k < first_bag_bad:
                raise RuntimeError(
                    f"{_OP}: table {k // B}: id {int(ids[i])} at indices[{i}] (bag {k % B}) is outside the "
                    f"table's rows [0, {int(rows[j])})"
                )
    if first_bag_bad < T * B:
        k = first_bag_bad
        t, b = k // B, k % B
        sk, ek = int(s[k]), int(e[k])
        if sk < 0:
            msg = f"offsets[{k}]={sk} (bag {b}) is negative"
        elif ek < sk:
            msg = f"offsets decrease at bag {b}: offsets[{k}]={sk} > offsets[{k + 1}]={ek}"
        else:
            msg = f"offsets[{k + 1}]={ek} (bag {b}) runs past the end of indices (numel {N})"
        raise RuntimeError(f"{_OP}: table {t}: {msg}")
    return T, B


def pt_embedding_bag(weight: torch.Tensor, table_offsets: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                     mode: str = "sum", per_sample_weights: Optional[torch.Tensor] = None,
                     padding_idx: Optional[int] = None, sparse: bool = False) -> torch.Tensor:
    """Reference table-batched embedding bag: one ``F.embedding_bag`` over shifted ids.

    With ``mode="max"`` the weight gradient is dense even if ``sparse`` (F.embedding_bag
    has no sparse max gradient). Padding ids are dropped before pooling (they neither contribute nor count towards a
    mean); ``mean`` with per-sample weights is the weighted sum divided by the number of
    non-padding ids.

    Values are checked only for host (CPU) ids; ids on a device take a path without host syncs
    (see the module docstring).
    """
    if torch.compiler.is_compiling() and padding_idx is None:
        return _pt_embedding_bag_traceable(weight, table_offsets, indices, offsets, mode, per_sample_weights, sparse)
    if padding_idx is None and not checks_values(table_offsets, indices, offsets):
        check_jagged_input(weight, table_offsets, indices, offsets, mode, per_sample_weights, None, values=False)
        return _pt_embedding_bag_traceable(weight, table_offsets, indices, offsets, mode, per_sample_weights, sparse)
    T, B = check_jagged_input(weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx)
    D = weight.shape[1]
    off = offsets.long()
    lengths = off[1:] - off[:-1]
    bag_of = torch.repeat_interleave(torch.arange(T * B, device=off.device), lengths)
    ids = indices.long()[int(off[0]) : int(off[-1])] if off.numel() > 1 else indices.long()[:0]
    rows = ids + table_offsets[bag_of // max(B, 1)]
    psw = per_sample_weights[int(off[0]) : int(off[-1])] if per_sample_weights is not None else None
    if padding_idx is not None:
        keep = ids != padding_idx
        rows, bag_of = rows[keep], bag_of[keep]
        psw = psw[keep] if psw is not None else None
    counts = torch.bincount(bag_of, minlength=T * B)
    new_off = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    pooled = F.embedding_bag(
        rows, weight, new_off, mode="sum" if psw is not None else mode, per_sample_weights=psw,
        include_last_offset=True, sparse=sparse and mode != "max",  # F.embedding_bag has no sparse max
    )
    if psw is not None and mode == "mean":
        pooled = pooled / counts.clamp_min(1).to(pooled.dtype)[:, None]
    return pooled.view(T, B, D).transpose(0, 1).reshape(B, T * D)


def _pt_embedding_bag_traceable(weight, table_offsets, indices, offsets, mode, per_sample_weights, sparse):
    """Graph-break-free, host-sync-free form (torch.compile; ids on a device): no value checks, no
    data-dependent shapes.

    Assumes what the eager path checks: valid ids, offsets[0] == 0 and offsets[-1] == N.
    """
    T = table_offsets.shape[0] - 1
    B = (offsets.shape[0] - 1) // T
    D = weight.shape[1]
    off = offsets.long()
    lengths = off[1:] - off[:-1]
    bag_of = torch.repeat_interleave(torch.arange(T * B, device=off.device), lengths, output_size=indices.shape[0])
    rows = indices.long() + table_offsets[bag_of // B]
    psw = per_sample_weights
    pooled = F.embedding_bag(rows, weight, off, mode="sum" if psw is not None else mode, per_sample_weights=psw,
                             include_last_offset=True, sparse=sparse and mode != "max")
    if psw is not None and mode == "mean":
        pooled = pooled / lengths.clamp_min(1).to(pooled.dtype)[:, None]
    return pooled.view(T, B, D).transpose(0, 1).reshape(B, T * D)
