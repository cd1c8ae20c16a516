"""What every multi-task model shares: the input layer, towers, the loss, prediction."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..features import FeatureBatch, Schema
from ..features.torchrec_input import build_input_layer
from ..layers import MLP, build_fim


class Expert(nn.Module):
    """An MLP expert that accepts E [B, F, d] (flattened) or a vector input [B, D]."""

    def __init__(self, input_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(input_dim, hidden, dropout=dropout)
        self.output_dim = self.mlp.output_dim

    def forward(self, x: torch.Tensor, cat_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(x.flatten(1) if x.dim() == 3 else x)


class MultiTaskModel(nn.Module):
    """Base class. ``forward(batch) -> logits [B, T]``; ``predict(batch) -> probabilities``.

    ``group_kernels`` (set by ``dtn_kernels.set_kernels(model, "grouped")``): run the modules of one
    kind side by side as one group (``dtn.models.grouped``); False runs every module on its own.
    """

    group_kernels = False

    def __init__(self, schema: Schema, cfg: ModelConfig, device=None):
        super().__init__()
        self.schema = schema
        self.cfg = cfg
        self.tasks = list(schema.labels)
        self.num_tasks = len(self.tasks)
        self.input_layer = build_input_layer(schema, cfg, device=device)  # model.embeddings: own or torchrec
        self.num_fields = self.input_layer.num_fields
        self.embed_dim = cfg.embed_dim
        self.input_dim = self.input_layer.output_dim

    def make_tower(self, input_dim: int) -> MLP:
        return MLP(input_dim, self.cfg.tower_hidden, 1, dropout=self.cfg.dropout)

    def make_fim(self, kind: str, device=None) -> nn.Module:
        opts = dict(getattr(self.cfg, kind, {}) or {})
        if kind == "memonet":
            opts["fields"] = self.memonet_fields(opts.get("fields"))
        return build_fim(kind, self.num_fields, self.embed_dim, self.cfg.fim_dim, len(self.schema.categorical),
                         opts, device=device)

    def memonet_fields(self, fields) -> list[int] | None:
        """Categorical field names (or an int k = the first k fields) -> positions."""
        names = [f.name for f in self.schema.categorical]
        if fields is None:
            return None
        if isinstance(fields, int):
            return list(range(min(fields, len(names))))
        out = []
        for f in fields:
            if isinstance(f, int):
                out.append(f)
            elif f in names:
                out.append(names.index(f))
            else:
                raise ValueError(f"memonet.fields: {f!r} is not a categorical feature; categorical: {names}")
        return out

    def embed(self, batch: FeatureBatch) -> torch.Tensor:
        return self.input_layer(batch)

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        return self.forward_details(batch)["logits"]

    def forward_details(self, batch: FeatureBatch) -> dict:
        """logits [B, T] plus model-specific internals (gate weights, representations)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: FeatureBatch) -> torch.Tensor:
        return torch.sigmoid(self.forward(batch))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, task_weights: Sequence[float] | None = None):
        """sum_t w_t BCE_t; returns (total, per-task losses [T])."""
        per_task = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(0)
        w = torch.ones(self.num_tasks, device=logits.device) if task_weights is None else \
            torch.as_tensor(task_weights, dtype=logits.dtype, device=logits.device)
        return (per_task * w).sum(), per_task

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
