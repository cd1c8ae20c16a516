"""Fit-on-train encoders: raw DataFrame columns -> model-ready tensors.

* categorical: vocabulary of the train values (as strings); id 0 is reserved for
  out-of-vocabulary / unseen values, so inference never crashes on a new id.
* numeric: "standard" (z-score), "log1p" (sign-preserving log1p, then z-score),
  "minmax" or "none". NaN or a non-number is an error naming the column, row and value.
* multi: delimiter-separated ids ("a|b|c"), vocabulary as for categorical; an empty
  cell is an empty bag.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..features import FeatureBatch, JaggedField, Schema


class DataError(ValueError):
    """Bad input data; the message names the file, column, row and value where known."""


@dataclass
class EncodedData:
    categorical: torch.Tensor  # [N, C] int64
    numeric: torch.Tensor  # [N, Nn] float32
    multi: list[JaggedField]
    labels: torch.Tensor  # [N, T] float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor | slice) -> tuple[FeatureBatch, torch.Tensor]:
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        multi = tuple(_take_jagged(m, idx) for m in self.multi)
        return FeatureBatch(self.categorical[idx], self.numeric[idx], multi), self.labels[idx]

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None):
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self.batch(order[start:start + batch_size])


@dataclass
class SplitData:
    """A data set ready for training: schema, fitted encoder, encoded splits and the raw frames."""

    schema: Schema
    encoder: "TabularEncoder"
    train: EncodedData
    valid: EncodedData
    test: EncodedData
    frames: dict[str, pd.DataFrame]


def _take_jagged(m: JaggedField, idx: torch.Tensor) -> JaggedField:
    starts = m.offsets[idx]
    lens = m.offsets[idx + 1] - starts
    offsets = torch.zeros(len(idx) + 1, dtype=m.offsets.dtype)
    offsets[1:] = torch.cumsum(lens, 0)
    total = int(offsets[-1])
    # position of every output value in the source: start of its bag + rank within the bag
    bag = torch.repeat_interleave(torch.arange(len(idx)), lens)
    pos = starts[bag] + (torch.arange(total) - offsets[:-1][bag])
    w = None if m.weights is None else m.weights[pos]
    return JaggedField(m.values[pos], offsets, w)


def _where(source: str | None, column: str, row) -> str:
    """Rows are 0-based positions among the data rows (a CSV header line is not counted)."""
    at = f"{source}: " if source else ""
    return f"{at}column {column!r}, row {row}"


@dataclass
class TabularEncoder:
    schema: Schema
    vocab: dict[str, dict[str, int]] = field(default_factory=dict)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    edges: dict[str, list[float]] = field(default_factory=dict)  # bucketised categorical features
    fitted: bool = False

    # ---- fitting -----------------------------------------------------------------------
    def fit(self, df: pd.DataFrame, source: str | None = None, min_count: int = 1) -> "TabularEncoder":
        self._check_columns(df, source)
        if len(df) == 0:
            raise DataError(f"{source or 'data'}: no rows to fit the encoders on")
        for f in self.schema.features:
            col = df[f.source]
            if f.kind == "categorical" and f.bins:
                x = self._numeric(col, f, source, transform_only=True)
                qs = np.quantile(x, np.linspace(0, 1, f.bins + 1)[1:-1])
                self.edges[f.name] = sorted(set(float(q) for q in qs))
                f.cardinality = len(self.edges[f.name]) + 2  # buckets 1..len+1, 0 stays OOV
            elif f.kind == "categorical":
                counts = Counter(col.astype(str).tolist())
                self._set_vocab(f, counts, max(min_count, f.min_count))
            elif f.kind == "multi":
                counts = Counter(tok for cell in col.fillna("").astype(str) for tok in _split(cell, f.delimiter))
                self._set_vocab(f, counts, max(min_count, f.min_count))
            else:
                x = self._numeric(col, f, source, transform_only=True)
                if f.transform == "minmax":
                    lo, hi = float(x.min()), float(x.max())
                    self.stats[f.name] = (lo, (hi - lo) or 1.0)
                elif f.transform == "none":
                    self.stats[f.name] = (0.0, 1.0)
                else:
                    sd = float(x.std())
                    self.stats[f.name] = (float(x.mean()), sd if sd > 0 else 1.0)
        self.fitted = True
        return self

    def _set_vocab(self, f, counts: Counter, min_count: int) -> None:
        keep = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
        self.vocab[f.name] = {v: i + 1 for i, v in enumerate(keep)}  # 0 = OOV
        f.cardinality = len(keep) + 1

    # ---- transforming ------------------------------------------------------------------
    def _check_columns(self, df: pd.DataFrame, source: str | None) -> None:
        needed = [f.source for f in self.schema.features] + self.label_columns
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise DataError(f"{source or 'data'}: missing column(s) {missing}; the schema needs them "
                            f"(columns present: {list(df.columns)[:50]})")

    @property
    def label_columns(self) -> list[str]:
        return list(self.schema.label_columns or self.schema.labels)

    def _numeric(self, col: pd.Series, f, source, transform_only=False) -> np.ndarray:
        if col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
            conv = pd.to_numeric(col.astype(str).str.strip(), errors="coerce")
            bad = conv.isna() & col.notna()
            if bad.any():
                row = int(np.argmax(bad.to_numpy()))
                raise DataError(f"{_where(source, f.source, row)}: value {col.iloc[row]!r} "
                                f"is not a number (feature {f.name!r} is numeric)")
            col = conv
        elif not pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            raise DataError(f"{source or 'data'}: column {f.source!r} has dtype {col.dtype}, but feature {f.name!r} is numeric")
        x = col.to_numpy(dtype=np.float64)
        nan = ~np.isfinite(x)
        if nan.any():
            row = int(np.argmax(nan))
            raise DataError(f"{_where(source, f.source, row)}: value {x[row]} (NaN/inf) in numeric feature {f.name!r}; "
                            "fill or drop missing values first")
        if f.transform == "log1p" and f.kind == "numeric":
            x = np.sign(x) * np.log1p(np.abs(x))
        if transform_only:
            return x
        a, b = self.stats[f.name]
        return (x - a) / b

    def transform(self, df: pd.DataFrame, source: str | None = None, with_labels: bool = True) -> EncodedData:
        if not self.fitted:
            raise RuntimeError("TabularEncoder.transform called before fit")
        self._check_columns(df if with_labels else df.assign(**{c: 0 for c in self.label_columns}), source)
        n = len(df)
        cats = []
        for f in self.schema.categorical:
            if f.bins:
                x = self._numeric(df[f.source], f, source, transform_only=True)
                cats.append(np.searchsorted(np.asarray(self.edges[f.name]), x, side="right").astype(np.int64) + 1)
            else:
                cats.append(df[f.source].astype(str).map(self.vocab[f.name]).fillna(0).to_numpy(dtype=np.int64))
        cat = torch.from_numpy(np.stack(cats, 1)) if cats else torch.zeros(n, 0, dtype=torch.long)
        nums = [self._numeric(df[f.source], f, source) for f in self.schema.numeric]
        num = torch.from_numpy(np.stack(nums, 1).astype(np.float32)) if nums else torch.zeros(n, 0)
        multi = [self._encode_multi(df[f.source], f) for f in self.schema.multi]
        if with_labels:
            labels = torch.from_numpy(np.stack([self._label(df[c], c, source) for c in self.label_columns], 1))
        else:
            labels = torch.zeros(n, len(self.label_columns))
        return EncodedData(cat, num, multi, labels)

    def _encode_multi(self, col: pd.Series, f) -> JaggedField:
        vocab = self.vocab[f.name]
        lists = [[vocab.get(t, 0) for t in _split(cell, f.delimiter)] for cell in col.fillna("").astype(str)]
        lens = torch.tensor([len(x) for x in lists], dtype=torch.long)
        offsets = torch.zeros(len(lists) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        values = torch.tensor([v for x in lists for v in x], dtype=torch.long)
        return JaggedField(values, offsets)

    @staticmethod
    def _label(col: pd.Series, name: str, source) -> np.ndarray:
        y = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad))
            value = col.iloc[row]
            value = value.item() if hasattr(value, "item") else value
            raise DataError(f"{_where(source, name, row)}: label value {value!r} is not 0 or 1")
        return y.astype(np.float32)

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"schema": self.schema.to_dict(), "vocab": self.vocab, "stats": self.stats, "edges": self.edges}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TabularEncoder":
        enc = cls(Schema.from_dict(state["schema"]), dict(state["vocab"]), {k: tuple(v) for k, v in state["stats"].items()},
                  dict(state.get("edges", {})))
        enc.fitted = True
        return enc


def _split(cell: str, delim: str) -> list[str]:
    cell = cell.strip()
    return [t.strip() for t in cell.split(delim) if t.strip()] if cell else []
