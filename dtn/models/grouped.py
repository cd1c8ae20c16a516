"""Grouped execution: the modules of one kind that a multi-task model runs side by side, run as one.

DTN runs T + 1 MFI modules, each with one FIM of every kind, all on the same embeddings E; MMoE,
PLE, CGC and TFI run several experts on one input and a gate per task. Modules of one kind with
one configuration have the same shapes, so ``dtn_kernels.set_kernels(model, "grouped")`` makes the
models run each kind once: the group's parameters live in one storage stacked along a leading G axis,
each member's parameter a view of its slice (moved there on the first grouped step, no copy after
that; the state_dict and the parameters' identity stay per module), and are fed to the
grouped ops (``torch.ops.dtn.gated_cross`` / ``mask_block`` / ``hcnet`` with a leading G), to
batched cuBLAS GEMMs (``baddbmm``) for the projections, MLP experts and towers, and to one GEMM
for every gate's logits followed by ``torch.ops.dtn.softmax_mix`` per gate.

Grouping applies where the fused ops run their Triton kernels (CUDA; the interpreter in tests).
Elsewhere (CPU) every module runs its own forward, exactly as in "fused" mode: the grouped twins
would only loop over the members. DTN-trim's removed FIMs drop out of their group.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtn_kernels.nn import FusedCrossNetwork, FusedHCNet, FusedMaskBlock, FusedSoftmaxGate, grouping_here
from dtn_kernels.ops import gated_cross, hcnet, mask_block, softmax_mix

from ..layers.gdcn import GDCN
from ..layers.masknet import MaskNet
from ..layers.memonet import MemoNet
from ..layers.mlp import MLP


class _StackedParams(torch.autograd.Function):
    """The group's stacked storage as an autograd node over the members' parameters: forward returns
    the storage itself (no copy: every member's parameter is a view of its slice), backward hands
    member g slice g of the gradient."""

    @staticmethod
    def forward(ctx, storage, *members):
        return storage.view_as(storage)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(0))


def _aliases(storage: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether member g of ``tensors`` is exactly slice g of ``storage`` (pointer, shape, strides)."""
    if storage.shape[0] != len(tensors):
        return False
    step = storage.stride(0) * storage.element_size()
    base, shape, strides = storage.data_ptr(), storage.shape[1:], storage.stride()[1:]
    return all(t.data_ptr() == base + g * step and t.shape == shape and t.stride() == strides
               and t.dtype == storage.dtype and t.device == storage.device for g, t in enumerate(tensors))


def _restack(tensors: list) -> torch.Tensor:
    """Move the members into one [G, ...] storage; each member's ``.data`` becomes a view of its slice
    (values, identity, requires_grad and the state_dict keys are unchanged). Done once: later steps
    find them there."""
    storage = torch.stack([t.detach() for t in tensors])
    for g, t in enumerate(tensors):
        t.data = storage[g]
        t._dtn_group_storage = storage
    # the host-side fast check of later steps: the same member objects at the same addresses
    storage._dtn_members = (tuple(tensors), tuple(t.data_ptr() for t in tensors))
    return storage


def _still_stacked(storage, tensors: list) -> bool:
    members, ptrs = getattr(storage, "_dtn_members", ((), ()))
    return len(members) == len(tensors) and all(a is b for a, b in zip(members, tensors)) \
        and all(t.data_ptr() == p for t, p in zip(tensors, ptrs))


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[G, ...] of a group's parameters (or buffers) without a per-step copy: the first call moves them
    into one stacked storage that they then view (``_restack``); every later step checks on the host
    (the same member objects at the same addresses: no device work) that they still alias it and
    reads it in place. Anything that moved
    them (``model.to(...)``, assigning ``.data``) is detected and restacked. Under torch.compile, or for
    non-leaf tensors, it is a plain ``torch.stack``."""
    tensors = list(tensors)
    if torch.compiler.is_compiling():
        return torch.stack(tensors)
    storage = getattr(tensors[0], "_dtn_group_storage", None)
    if storage is None or not _still_stacked(storage, tensors):  # host-side: object identity and pointers
        if any(t.grad_fn is not None for t in tensors) or len({(t.shape, t.dtype, t.device) for t in tensors}) != 1:
            return torch.stack(tensors)
        storage = _restack(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StackedParams.apply(storage, *tensors)
    return storage


# ----------------------------------------------------------------------------- FIMs


def _gdcn_group(mods: list, E: torch.Tensor) -> torch.Tensor:
    e = E.flatten(1)
    x = e  # the first layer's x0 = xl = e is shared by every member: read, not copied
    for layer in zip(*(m.cross.layers for m in mods)):
        gated = layer[0].gated
        x = gated_cross(e, x, _stack(m.weight for m in layer), _stack(m.bias for m in layer),
                        _stack(m.gate_weight for m in layer) if gated else None)
    if x.dim() == 2:  # no cross layers
        x = x.expand(len(mods), *x.shape)
    return torch.baddbmm(_stack(m.proj.bias for m in mods)[:, None, :], x,
                         _stack(m.proj.weight for m in mods).transpose(1, 2))


def _masknet_group(mods: list, E: torch.Tensor) -> torch.Tensor:
    e = E.flatten(1)
    norms = [m.field_norm for m in mods]
    # the field LayerNorm's statistics are the same for every member: normalise once, one affine each
    xhat = F.layer_norm(E, norms[0].normalized_shape, eps=norms[0].eps)
    v = (xhat[None] * _stack(n.weight for n in norms)[:, None, None, :]
         + _stack(n.bias for n in norms)[:, None, None, :]).flatten(2)
    for blocks in zip(*(m.blocks for m in mods)):
        v = mask_block(e, v, _stack(b.mask.fc1.weight for b in blocks), _stack(b.mask.fc1.bias for b in blocks),
                       _stack(b.mask.fc2.weight for b in blocks), _stack(b.mask.fc2.bias for b in blocks),
                       _stack(b.hidden.weight for b in blocks), _stack(b.norm.weight for b in blocks),
                       _stack(b.norm.bias for b in blocks), float(blocks[0].norm.eps))
    return torch.baddbmm(_stack(m.proj.bias for m in mods)[:, None, :], v,
                         _stack(m.proj.weight for m in mods).transpose(1, 2))


def _hcnet_attention(nets: list, E: torch.Tensor) -> torch.Tensor:
    """The SENets of every HCNet in the group ([G, B, M]): one batched MLP on the shared E.mean(-1)."""
    x = E.mean(dim=-1)
    first = [n.senet[0] for n in nets]
    second = [n.senet[2] for n in nets]
    h = torch.relu(F.linear(x, _stack(lin.weight for lin in first).flatten(0, 1),
                            _stack(lin.bias for lin in first).flatten()))
    h = h.view(x.shape[0], len(nets), -1).transpose(0, 1)  # [G, B, r]
    return torch.sigmoid(torch.baddbmm(_stack(lin.bias for lin in second)[:, None, :], h,
                                       _stack(lin.weight for lin in second).transpose(1, 2)))


def _memonet_group(mods: list, E: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    nets = [net for m in mods for net in m.hcnets]
    first = nets[0]
    U = hcnet(ids[:, first.fields], first.salts, _stack(n.seed_tensor for n in nets), _stack(n.codebook for n in nets),
              _stack(n.restore.weight for n in nets), _hcnet_attention(nets, E))  # [G * n, B, S, d]
    G, n, B = len(mods), len(mods[0].hcnets), E.shape[0]
    U = U.reshape(G, n, B, -1).transpose(1, 2).reshape(G, B, -1)  # member m: [U_{m,1} | ... | U_{m,n}]
    x = torch.cat([E.flatten(1).expand(G, B, -1).to(U.dtype), U], dim=2)
    return torch.baddbmm(_stack(m.proj.bias for m in mods)[:, None, :], x,
                         _stack(m.proj.weight for m in mods).transpose(1, 2))


def _signature(m: nn.Module):
    """Modules with equal signatures can run as one group (same kind, same parameter shapes)."""
    if isinstance(m, GDCN) and isinstance(m.cross, FusedCrossNetwork):
        return ("gdcn", type(m).__name__, tuple((k, tuple(p.shape)) for k, p in m.named_parameters()))
    if isinstance(m, MaskNet) and m.mode == "serial" and all(isinstance(b, FusedMaskBlock) for b in m.blocks):
        return ("masknet", tuple((k, tuple(p.shape)) for k, p in m.named_parameters()),
                tuple(float(b.norm.eps) for b in m.blocks), float(m.field_norm.eps))
    if isinstance(m, MemoNet) and all(isinstance(h, FusedHCNet) for h in m.hcnets):
        return ("memonet", tuple((k, tuple(p.shape)) for k, p in m.named_parameters()),
                tuple(h.field_list for h in m.hcnets))
    return None


_RUNNERS = {"gdcn": lambda mods, E, ids: _gdcn_group(mods, E),
            "masknet": lambda mods, E, ids: _masknet_group(mods, E),
            "memonet": _memonet_group}


def run_fims(fims: Sequence[nn.Module], E: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every FIM's output [B, h], in order; FIMs of one kind and configuration run as one group (a
    module that cannot be grouped, e.g. a parallel MaskNet or a removed FIM, runs on its own)."""
    if not grouping_here(E):
        return [m(E, ids) for m in fims]
    outs: list = [None] * len(fims)
    groups: dict = {}
    for i, m in enumerate(fims):
        sig = _signature(m)
        if sig is None:
            outs[i] = m(E, ids)
        else:
            groups.setdefault(sig, []).append(i)
    for sig, idx in groups.items():
        if len(idx) == 1:
            outs[idx[0]] = fims[idx[0]](E, ids)
            continue
        res = _RUNNERS[sig[0]]([fims[i] for i in idx], E, ids)
        for g, i in enumerate(idx):
            outs[i] = res[g]
    return outs


# ----------------------------------------------------------------------------- MLPs and gates


def _linears(mlp: MLP) -> list:
    return [m for m in mlp if isinstance(m, nn.Linear)]


def mlp_signature(mlp: MLP):
    return tuple((type(m).__name__, tuple(m.weight.shape) if isinstance(m, nn.Linear) else getattr(m, "p", None))
                 for m in mlp)


def run_mlps(mlps: Sequence[MLP], x) -> torch.Tensor:
    """[G, B, out] of G MLPs of one architecture: ``x`` [B, d] shared by all, or [G, B, d]. One batched
    GEMM per layer (the first one a single GEMM when the input is shared)."""
    layers = list(zip(*mlps))
    h = x
    for parts in layers:
        m = parts[0]
        if isinstance(m, nn.Linear):
            W = _stack(p.weight for p in parts)
            b = _stack(p.bias for p in parts)
            if h.dim() == 2:  # a shared input: one GEMM against every member's weights
                h = F.linear(h, W.flatten(0, 1), b.flatten()).view(h.shape[0], len(parts), -1).transpose(0, 1)
            else:
                h = torch.baddbmm(b[:, None, :], h, W.transpose(1, 2))
        elif isinstance(m, nn.Dropout):
            h = F.dropout(h, m.p, m.training)
        else:  # the activation (the same module class for every member)
            h = m(h)
    if h.dim() == 2:  # an MLP without layers
        h = h.expand(len(mlps), *h.shape)
    return h


def grouped_mlps_ok(mlps: Sequence[nn.Module], x: torch.Tensor) -> bool:
    return (len(mlps) > 1 and grouping_here(x) and all(isinstance(m, MLP) for m in mlps)
            and len({mlp_signature(m) for m in mlps}) == 1)


def gate_logits(gates: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Every gate's logits from one GEMM on their shared input ``x``: column slices of [B, sum K]."""
    if len({tuple(g.linear.weight.shape) for g in gates}) == 1:  # stacked storage, flattened: the cat, no copy
        W = _stack(g.linear.weight for g in gates).flatten(0, 1)
        b = _stack(g.linear.bias for g in gates).flatten()
    else:  # gates over different numbers of experts
        W, b = torch.cat([g.linear.weight for g in gates]), torch.cat([g.linear.bias for g in gates])
    logits = F.linear(x, W, b)
    out, start = [], 0
    for g in gates:
        out.append(logits[:, start:start + g.num_experts])
        start += g.num_experts
    return out


def grouped_gates_ok(gates: Sequence[nn.Module], x: torch.Tensor) -> bool:
    return len(gates) > 1 and grouping_here(x) and all(isinstance(g, FusedSoftmaxGate) for g in gates)


def mix(logits: torch.Tensor, experts: torch.Tensor, mask=None):
    """A gate's softmax and weighted sum from its logits (``torch.ops.dtn.softmax_mix``)."""
    return softmax_mix(logits, experts, mask)
