"""Shared-Bottom, MMoE and PLE / CGC with MLP (or FIM) experts."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers import MLP, SoftmaxGate
from .base import Expert, MultiTaskModel
from .grouped import gate_logits, grouped_gates_ok, grouped_mlps_ok, mix, run_fims, run_mlps


class SharedBottom(MultiTaskModel):
    """One MLP on e, one tower per task."""

    def __init__(self, schema, cfg, device=None):
        super().__init__(schema, cfg, device)
        self.bottom = MLP(self.input_dim, cfg.bottom_hidden, dropout=cfg.dropout)
        self.towers = nn.ModuleList(self.make_tower(self.bottom.output_dim) for _ in self.tasks)

    def forward_details(self, batch):
        E = self.embed(batch)
        z = self.bottom(E.flatten(1))
        return {"logits": torch.cat([tower(z) for tower in self.towers], dim=1)}


class CGCLevel(nn.Module):
    """One extraction level: task-specific + shared experts, a gate per task (+ a shared gate if not last).

    ``forward(inputs, gate_inputs, cat_ids)``: ``inputs`` has T+1 entries (the last is the
    shared path), each handed to that path's experts; ``gate_inputs`` likewise [B, D_g].
    Returns T (+1 unless last) outputs and the gate weights.

    ``group_kernels``: the experts run as one group (one batched MLP, or the grouped FIM ops for
    TFI's FIM experts) and, when every gate reads the same input, all gate logits come from one GEMM.
    """

    group_kernels = False

    def __init__(self, num_tasks: int, num_specific: int, num_shared: int, make_expert: Callable[[], nn.Module],
                 gate_input_dim: int, last: bool):
        super().__init__()
        self.num_tasks, self.num_specific, self.num_shared = num_tasks, num_specific, num_shared
        self.specific = nn.ModuleList(nn.ModuleList(make_expert() for _ in range(num_specific)) for _ in range(num_tasks))
        self.shared = nn.ModuleList(make_expert() for _ in range(num_shared))
        self.gates = nn.ModuleList(SoftmaxGate(gate_input_dim, num_specific + num_shared) for _ in range(num_tasks))
        self.shared_gate = None if last else SoftmaxGate(gate_input_dim, num_tasks * num_specific + num_shared)

    def _experts(self, inputs, cat_ids):
        """(specific [T][n], shared [n]) expert outputs."""
        experts = [ex for group in self.specific for ex in group] + list(self.shared)
        paths = [t for t, group in enumerate(self.specific) for _ in group] + [len(inputs) - 1] * len(self.shared)
        outs = None
        if self.group_kernels and paths and all(inputs[p] is inputs[paths[0]] for p in paths):  # one input for all
            x = inputs[paths[0]]
            mlps = [ex.mlp for ex in experts if isinstance(ex, Expert)]
            if len(mlps) == len(experts) and grouped_mlps_ok(mlps, x):
                outs = list(run_mlps(mlps, x.flatten(1) if x.dim() == 3 else x).unbind(0))
            elif x.dim() == 3 and not mlps:  # FIM experts (TFI) on E
                outs = run_fims(experts, x, cat_ids)
        if outs is None:
            outs = [ex(inputs[p], cat_ids) for ex, p in zip(experts, paths)]
        n = self.num_specific
        specific = [outs[t * n:(t + 1) * n] for t in range(self.num_tasks)]
        return specific, outs[self.num_tasks * n:]

    def forward(self, inputs, gate_inputs, cat_ids=None):
        specific, shared = self._experts(inputs, cat_ids)
        gates, g_in = list(self.gates), list(gate_inputs[:self.num_tasks])
        candidates = [torch.stack(specific[t] + shared, dim=1) for t in range(self.num_tasks)]
        if self.shared_gate is not None:  # the shared path's gate, on the last gate input, over every expert
            gates.append(self.shared_gate)
            g_in.append(gate_inputs[-1])
            candidates.append(torch.stack([o for group in specific for o in group] + shared, dim=1))
        logits = None
        if self.group_kernels and all(x is g_in[0] for x in g_in) and grouped_gates_ok(gates, g_in[0]):
            logits = gate_logits(gates, g_in[0])  # every gate's logits: one GEMM on the shared input
        outs, weights = [], []
        for i, (gate, cand) in enumerate(zip(gates, candidates)):
            o, w = mix(logits[i], cand) if logits is not None else gate(g_in[i], cand)
            outs.append(o)
            weights.append(w)
        return outs, weights


class PLE(MultiTaskModel):
    """PLE (Tang et al. 2020) with ``num_levels`` levels; CGC is one level.

    ``expert_factory(level, input_dim)`` builds one expert (default: an MLP) and
    ``expert_dim(level, input_dim)`` gives its output width.
    ``MMoE`` is the special case of one level with shared experts only.
    """

    def __init__(self, schema, cfg, device=None, num_specific=None, num_shared=None, num_levels=None,
                 expert_factory=None, expert_dim=None, input_dim=None):
        super().__init__(schema, cfg, device)
        num_specific = cfg.num_specific_experts if num_specific is None else num_specific
        num_shared = cfg.num_shared_experts if num_shared is None else num_shared
        num_levels = cfg.num_levels if num_levels is None else num_levels
        factory = expert_factory or (lambda level, d: Expert(d, cfg.expert_hidden, cfg.dropout))
        expert_dim = expert_dim or (lambda level, d: cfg.expert_hidden[-1] if cfg.expert_hidden else d)
        d_in = self.input_dim if input_dim is None else input_dim
        levels = []
        for level in range(num_levels):
            d_out = expert_dim(level, d_in)
            levels.append(CGCLevel(self.num_tasks, num_specific, num_shared,
                                   lambda level=level, d_in=d_in: factory(level, d_in),
                                   gate_input_dim=d_in, last=level == num_levels - 1))
            d_in = d_out
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleList(self.make_tower(d_in) for _ in self.tasks)

    def bottom_input(self, E: torch.Tensor, cat_ids: torch.Tensor):
        """What level 1 receives: (expert input, gate input)."""
        return E, E.flatten(1)

    def forward_details(self, batch):
        E = self.embed(batch)
        x, g = self.bottom_input(E, batch.categorical)
        inputs = [x] * (self.num_tasks + 1)
        gates = [g] * (self.num_tasks + 1)
        all_weights = []
        for level in self.levels:
            inputs, w = level(inputs, gates, batch.categorical)
            gates = inputs  # deeper levels gate on the previous level's outputs
            all_weights.append(w)
        if self.group_kernels and grouped_mlps_ok(self.towers, inputs[0]):
            logits = run_mlps(list(self.towers), torch.stack(inputs[:self.num_tasks])).squeeze(-1).t()
        else:
            logits = torch.cat([tower(inputs[t]) for t, tower in enumerate(self.towers)], dim=1)
        return {"logits": logits, "gate_weights": all_weights}


class MMoE(PLE):
    """MMoE (Ma et al. 2018): K shared experts, one softmax gate per task."""

    def __init__(self, schema, cfg, device=None, **kw):
        super().__init__(schema, cfg, device, num_specific=0, num_shared=cfg.num_experts, num_levels=1, **kw)


class CGC(PLE):
    def __init__(self, schema, cfg, device=None, **kw):
        super().__init__(schema, cfg, device, num_levels=1, **kw)
