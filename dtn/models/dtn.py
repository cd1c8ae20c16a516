"""DTN: Deep Multiple Task-specific Feature Interactions Network (paper Fig. 3).

T task-specific MFI modules and one shared MFI module; each MFI module holds one FIM of
every kind in ``cfg.fims``. Task t's gate (a linear layer + softmax on e) weights the
outputs of MFI_t and MFI_shared, and, with the Task-Sensitive Network (TSN) on, those of
its predecessor's MFI multiplied by the predecessor's predicted probability.

Candidate order in task t's gate: [own FIMs..., shared FIMs..., predecessor FIMs...].
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import SoftmaxGate
from .base import MultiTaskModel
from .grouped import gate_logits, grouped_gates_ok, grouped_mlps_ok, mix, run_fims, run_mlps


class RemovedFIM(nn.Module):
    """Stands in for a FIM that DTN-trim removed: no parameters, zeros out (its gate weight is 0)."""

    def __init__(self, output_dim: int):
        super().__init__()
        self.output_dim = output_dim

    def forward(self, E, cat_ids=None):
        return E.new_zeros(E.shape[0], self.output_dim)


class DTN(MultiTaskModel):
    def __init__(self, schema, cfg, device=None):
        super().__init__(schema, cfg, device)
        if not cfg.fims:
            raise ValueError("DTN needs at least one FIM kind in model.fims")
        if cfg.gate_mode not in ("paper", "reference"):
            raise ValueError(f"gate_mode must be 'paper' or 'reference', got {cfg.gate_mode!r}")
        order = list(cfg.task_order or self.tasks)
        if sorted(order) != sorted(self.tasks):
            raise ValueError(f"task_order {order} must be a permutation of the tasks {self.tasks}")
        self.order = [self.tasks.index(t) for t in order]  # task indices, predecessor first
        self.predecessor = {t: (self.order[i - 1] if (cfg.tsn and i > 0) else None) for i, t in enumerate(self.order)}
        self.kinds = list(cfg.fims)
        K = len(self.kinds)
        self.K = K
        self.task_mfi = nn.ModuleList(nn.ModuleList(self.make_fim(k, device) for k in self.kinds) for _ in self.tasks)
        self.shared_mfi = nn.ModuleList(self.make_fim(k, device) for k in self.kinds)
        h = cfg.fim_dim
        self.num_candidates = [2 * K + (K if self.predecessor[t] is not None else 0) for t in range(self.num_tasks)]
        if cfg.gate_mode == "paper":
            self.gates = nn.ModuleList(SoftmaxGate(self.input_dim, n, device=device) for n in self.num_candidates)
        else:
            self.gates = nn.ModuleList(nn.Linear(h, 1, device=device) for _ in self.tasks)
        self.towers = nn.ModuleList(self.make_tower(h) for _ in self.tasks)
        active = torch.zeros(self.num_tasks, 3 * K, dtype=torch.bool, device=device)
        for t, n in enumerate(self.num_candidates):
            active[t, :n] = True
        self.register_buffer("active", active)  # DTN-trim mask over gate candidates

    # ---- names -------------------------------------------------------------------------
    def candidate_names(self, t: int) -> list[str]:
        names = [f"{self.tasks[t]}/{k}" for k in self.kinds] + [f"shared/{k}" for k in self.kinds]
        p = self.predecessor[t]
        if p is not None:
            names += [f"{self.tasks[p]}/{k}*p({self.tasks[p]})" for k in self.kinds]
        return names

    # ---- forward -----------------------------------------------------------------------
    def _gate(self, t: int, e: torch.Tensor, cand: torch.Tensor):
        n = self.num_candidates[t]
        mask = self.active[t, :n]
        if self.cfg.gate_mode == "paper":
            return self.gates[t](e, cand, mask)
        else:  # public reference code: score each expert from its own output; own / other softmaxed apart
            logits = self.gates[t](cand).squeeze(-1).masked_fill(~mask, float("-inf"))
            own = torch.softmax(logits[:, : self.K], dim=-1).nan_to_num(0.0)
            other = torch.softmax(logits[:, self.K:], dim=-1).nan_to_num(0.0)
            w = torch.cat([own, other], dim=-1)
            return torch.einsum("bk,bkh->bh", w, cand), w

    def forward_details(self, batch):
        E = self.embed(batch)
        ids = batch.categorical
        e = E.flatten(1)
        T, K = self.num_tasks, self.K
        if self.group_kernels:  # each FIM kind once for all T + 1 MFI modules
            outs = run_fims([fim for mfi in self.task_mfi for fim in mfi] + list(self.shared_mfi), E, ids)
            own = [torch.stack(outs[t * K:(t + 1) * K], dim=1) for t in range(T)]
            shared = torch.stack(outs[T * K:], dim=1)
        else:
            own = [torch.stack([fim(E, ids) for fim in mfi], dim=1) for mfi in self.task_mfi]  # T x [B, K, h]
            shared = torch.stack([fim(E, ids) for fim in self.shared_mfi], dim=1)  # [B, K, h]
        grouped_gates = self.group_kernels and self.cfg.gate_mode == "paper" and grouped_gates_ok(self.gates, e)
        gate_logit = gate_logits(self.gates, e) if grouped_gates else None  # every task's logits: one GEMM
        tsn = any(p is not None for p in self.predecessor.values())
        grouped_towers = self.group_kernels and not tsn and grouped_mlps_ok(self.towers, e)
        logits = [None] * self.num_tasks
        probs = [None] * self.num_tasks
        weights = [None] * self.num_tasks
        zs = [None] * self.num_tasks
        for t in self.order:
            parts = [own[t], shared]
            p = self.predecessor[t]
            if p is not None:
                pp = probs[p].detach() if self.cfg.tsn_stop_gradient else probs[p]
                parts.append(own[p] * pp[:, :, None])  # pp is [B, 1]
            cand = torch.cat(parts, dim=1)
            if gate_logit is not None:
                zs[t], weights[t] = mix(gate_logit[t], cand, self.active[t, :self.num_candidates[t]])
            else:
                zs[t], weights[t] = self._gate(t, e, cand)
            if not grouped_towers:  # with the TSN a tower needs its predecessor's probability first
                logits[t] = self.towers[t](zs[t])
                probs[t] = torch.sigmoid(logits[t])
        if grouped_towers:
            out = run_mlps(list(self.towers), torch.stack(zs))  # [T, B, 1]
            logits = list(out.unbind(0))
        return {"logits": torch.cat(logits, dim=1), "gate_weights": weights,
                "representations": {"own": own, "shared": shared}}

    # ---- DTN-trim ----------------------------------------------------------------------
    @torch.no_grad()
    def mean_gate_weights(self, batches) -> list[torch.Tensor]:
        """Mean gate weight of every candidate per task over an iterable of batches."""
        sums = [torch.zeros(n, dtype=torch.float64) for n in self.num_candidates]
        count = 0
        for batch in batches:
            w = self.forward_details(batch)["gate_weights"]
            for t in range(self.num_tasks):
                sums[t] += w[t].double().sum(0).cpu()
            count += batch.batch_size
        return [s / max(count, 1) for s in sums]

    def trim(self, mean_weights: list[torch.Tensor], threshold: float) -> dict:
        """Switch off every gate candidate whose mean weight is under ``threshold`` (each task keeps
        its strongest one), then remove FIMs no gate uses any more. Returns what was removed."""
        active = self.active.clone()
        for t, w in enumerate(mean_weights):
            keep = w >= threshold
            keep[int(torch.argmax(w))] = True
            active[t, : len(w)] = keep.to(active.device)
        return self.apply_trim(active)

    def apply_trim(self, active: torch.Tensor) -> dict:
        before = self.num_parameters()
        self.active.copy_(active.to(self.active.device))
        removed = []
        K = self.K
        for j, kind in enumerate(self.kinds):
            if not bool(self.active[:, K + j].any()) and not isinstance(self.shared_mfi[j], RemovedFIM):
                self.shared_mfi[j] = RemovedFIM(self.cfg.fim_dim)
                removed.append(f"shared/{kind}")
            for t in range(self.num_tasks):
                used = bool(self.active[t, j])
                for s, p in self.predecessor.items():
                    if p == t:
                        used = used or bool(self.active[s, 2 * K + j])
                if not used and not isinstance(self.task_mfi[t][j], RemovedFIM):
                    self.task_mfi[t][j] = RemovedFIM(self.cfg.fim_dim)
                    removed.append(f"{self.tasks[t]}/{kind}")
        return {"removed": removed, "params_before": before, "params_after": self.num_parameters()}
