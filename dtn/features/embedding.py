"""The input layer: every field becomes one d-vector, E in R^{B x F x d}.

All categorical and multi-valued tables live in one weight buffer with per-table row
offsets (the table-batched layout), so a single lookup serves every field.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .schema import FeatureBatch, Schema


class InputLayer(nn.Module):
    """Embeds a :class:`FeatureBatch` into E [B, F, d].

    Field order: categorical fields, multi-valued fields, numeric fields (as listed in
    the schema within each kind).

    Example::

        >>> from dtn.features import FeatureSpec, Schema, FeatureBatch
        >>> s = Schema([FeatureSpec("a", cardinality=5), FeatureSpec("x", kind="numeric")], labels=["t"])
        >>> layer = InputLayer(s, embed_dim=4)
        >>> E = layer(FeatureBatch(torch.tensor([[1], [4]]), torch.tensor([[0.5], [-1.0]])))
        >>> tuple(E.shape)
        (2, 2, 4)
    """

    def __init__(self, schema: Schema, embed_dim: int, validate: bool = True, init_std: float = 0.05, device=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.validate = validate
        self.cat_names = [f.name for f in schema.categorical]
        self.multi_names = [f.name for f in schema.multi]
        self.num_names = [f.name for f in schema.numeric]
        self.multi_pooling = [f.pooling for f in schema.multi]
        tables = schema.categorical + schema.multi
        for f in tables:
            if f.cardinality < 1:
                raise ValueError(f"feature {f.name!r}: cardinality must be >= 1 (fit the encoder first), got {f.cardinality}")
        cards = [f.cardinality for f in tables]
        self.cardinalities = cards
        offsets = [0]
        for c in cards:
            offsets.append(offsets[-1] + c)
        self.register_buffer("table_offsets", torch.tensor(offsets, dtype=torch.long, device=device), persistent=False)
        self.weight = nn.Parameter(torch.randn(max(offsets[-1], 1), embed_dim, device=device) * init_std)
        n_num = len(self.num_names)
        self.numeric_weight = nn.Parameter(torch.randn(n_num, embed_dim, device=device) * init_std)
        self.numeric_bias = nn.Parameter(torch.zeros(n_num, embed_dim, device=device))

    @property
    def num_fields(self) -> int:
        return len(self.cat_names) + len(self.multi_names) + len(self.num_names)

    @property
    def field_names(self) -> list[str]:
        return self.cat_names + self.multi_names + self.num_names

    @property
    def output_dim(self) -> int:
        return self.num_fields * self.embed_dim

    def _check_ids(self, ids: torch.Tensor, start: int, names: Sequence[str]) -> None:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"categorical ids must be int32/int64, got {ids.dtype}")
        for j, name in enumerate(names):
            col = ids[:, j] if ids.dim() == 2 else ids
            card = self.cardinalities[start + j]
            bad = (col < 0) | (col >= card)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise IndexError(
                    f"feature {name!r}: id {int(col[row])} at row {row} is outside its table [0, {card})"
                )

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        cat = batch.categorical
        B = cat.shape[0]
        n_cat = len(self.cat_names)
        if cat.dim() != 2 or cat.shape[1] != n_cat:
            raise ValueError(f"categorical ids must be [B, {n_cat}] ({self.cat_names}), got {tuple(cat.shape)}")
        if len(batch.multi) != len(self.multi_names):
            raise ValueError(f"expected {len(self.multi_names)} multi-valued fields {self.multi_names}, got {len(batch.multi)}")
        parts = []
        if n_cat:
            if self.validate and not torch.compiler.is_compiling():
                self._check_ids(cat, 0, self.cat_names)
            shifted = cat.long() + self.table_offsets[:n_cat]
            parts.append(F.embedding(shifted, self.weight))  # [B, C, d]
        for j, jf in enumerate(batch.multi):
            t = n_cat + j
            if self.validate and not torch.compiler.is_compiling():
                self._check_ids(jf.values, t, [self.multi_names[j]])
            pooled = F.embedding_bag(
                jf.values.long() + self.table_offsets[t], self.weight, jf.offsets[:-1].long(),
                mode=self.multi_pooling[j] if jf.weights is None else "sum",
                per_sample_weights=jf.weights,
            )
            if jf.weights is not None and self.multi_pooling[j] == "mean":
                counts = (jf.offsets[1:] - jf.offsets[:-1]).clamp_min(1).to(pooled.dtype)
                pooled = pooled / counts[:, None]
            parts.append(pooled[:, None, :])
        n_num = len(self.num_names)
        if n_num:
            x = batch.numeric
            if x.dim() != 2 or x.shape[1] != n_num:
                raise ValueError(f"numeric values must be [B, {n_num}] ({self.num_names}), got {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"numeric values must be floating point, got {x.dtype}")
            parts.append(x[:, :, None].to(self.numeric_weight.dtype) * self.numeric_weight + self.numeric_bias)
        if not parts:
            raise ValueError("the schema has no features")
        E = torch.cat(parts, dim=1)
        assert E.shape[0] == B
        return E
