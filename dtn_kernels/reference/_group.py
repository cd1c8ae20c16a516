"""Group form for the twins: a grouped call (parameters with a leading G) is G single calls.

``member(t, g, grouped_rank)`` picks member ``g`` of ``t`` when ``t`` has the grouped rank, and
passes a shared input (one rank lower, used by every member) through unchanged.
"""
from __future__ import annotations

import torch


def member(t, g: int, grouped_rank: int):
    if t is None or not torch.is_tensor(t) or t.dim() < grouped_rank:
        return t
    return t[g]


def stack_members(results, inputs_shared: dict[int, bool] | None = None):
    """Stack a list (over members) of tuples of tensors; entries listed in ``inputs_shared`` (index ->
    shared?) are summed over the members instead (the gradient of an input every member read)."""
    out = []
    for i, parts in enumerate(zip(*results)):
        if parts[0] is None:
            out.append(None)
        elif inputs_shared and inputs_shared.get(i):
            out.append(torch.stack(parts).sum(0))
        else:
            out.append(torch.stack(parts))
    return tuple(out)
