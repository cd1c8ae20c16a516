"""Fit-on-train encoders: raw DataFrame columns -> model-ready tensors.

* categorical: vocabulary of the train values (as canonical strings, see
  :func:`dtn.data.codec.canonical_cell`); id 0 is reserved for out-of-vocabulary / unseen
  values, so inference never crashes on a new id.
* numeric: "standard" (z-score), "log1p" (sign-preserving log1p, then z-score),
  "minmax" or "none". NaN or a non-number is an error naming the column, row and value.
* multi: delimiter-separated ids ("a|b|c"), vocabulary as for categorical; an empty
  cell is an empty bag. Optional weights: "a:0.5|b:2" tokens or a parallel weight column.
* hashed (categorical or multi with ``hash_buckets: N``): no vocabulary is fitted; a value's id
  is its canonical string hashed into [0, N) (:func:`dtn.data.codec.hash_buckets`), the same in
  training, evaluation, streaming and the exported predictor.

Fitting is incremental: :meth:`TabularEncoder.partial_fit` over any number of chunks, then
:meth:`TabularEncoder.finish_fit`; :meth:`TabularEncoder.fit` is the one-chunk case. The
accumulated state is exact (value counts; sums of x and x**2 as integers), so a streaming fit
over chunks, or a distributed one over shards merged with :meth:`FitState.merge`, gives
exactly the encoder an in-memory fit gives.

Error messages name rows by the DataFrame's index: a default index gives "row N" (0-based
data row); frames read by :mod:`dtn.data.table_reader` are indexed by file line ("line N") or
Parquet row.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ..features import FeatureBatch, JaggedField, Schema
from . import codec


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

    def take(self, idx: torch.Tensor | slice) -> "EncodedData":
        """The rows ``idx`` as a new EncodedData."""
        batch, labels = self.batch(idx)
        return EncodedData(batch.categorical, batch.numeric, list(batch.multi), labels)

    @staticmethod
    def concat(parts: list["EncodedData"]) -> "EncodedData":
        """Rows of ``parts`` one after another (the same tensors as encoding the concatenated rows)."""
        if len(parts) == 1:
            return parts[0]
        multi = []
        for j in range(len(parts[0].multi)):
            fields = [p.multi[j] for p in parts]
            shifts = np.cumsum([0] + [int(f.offsets[-1]) for f in fields[:-1]])
            offsets = torch.cat([fields[0].offsets[:1]] + [f.offsets[1:] + int(s) for f, s in zip(fields, shifts)])
            weights = None if fields[0].weights is None else torch.cat([f.weights for f in fields])
            multi.append(JaggedField(torch.cat([f.values for f in fields]), offsets, weights))
        return EncodedData(torch.cat([p.categorical for p in parts]), torch.cat([p.numeric for p in parts]), multi,
                           torch.cat([p.labels for p in parts]))

    def shard(self, rank: int, world_size: int) -> "EncodedData":
        """Rank ``rank``'s contiguous share of the rows (shares differ in size by at most one row);
        concatenating every rank's share in rank order gives back all rows in order."""
        if world_size <= 1:
            return self
        return self.take(torch.tensor_split(torch.arange(len(self)), world_size)[rank])

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """How many batches :meth:`batches` yields with these arguments."""
        n = len(self)
        full, rest = divmod(n, batch_size)
        return full + (1 if rest and (world_size <= 1 or rest >= world_size) else 0)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world_size: int = 1):
        """Batches of ``batch_size`` rows (in order, or shuffled by ``generator``).

        With ``world_size`` > 1 every global batch is cut into ``world_size`` contiguous pieces and
        this yields piece ``rank``, so the ranks of a data-parallel run together see exactly the
        batches of a single-process run (a last batch smaller than ``world_size`` is dropped, so
        that no rank gets an empty piece).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if world_size > 1:
                if len(idx) < world_size:
                    return
                idx = torch.tensor_split(idx, world_size)[rank]
            yield self.batch(idx)


@dataclass
class SplitData:
    """A data set ready for training: schema, fitted encoder, encoded splits and the raw frames."""

    schema: Schema
    encoder: "TabularEncoder"
    train: EncodedData
    valid: EncodedData
    test: EncodedData
    frames: dict[str, pd.DataFrame]
    fingerprint: Optional[dict] = None  # where the rows came from (dtn.data.tabular.source_fingerprint)


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


def _where(source: str | None, column: str, index: pd.Index, pos: int) -> str:
    """Where cell ``pos`` of a column is: "source: column 'c', row 5". The row is the frame's index
    label (its name, e.g. "line", replaces "row" when set), so frames read from files name lines."""
    at = f"{source}: " if source else ""
    return f"{at}column {column!r}, {index.name or 'row'} {index[pos]}"


# ---- exact accumulation ------------------------------------------------------------------------
_SHIFT = 1126  # every finite float64 is an integer multiple of 2**-1074; mantissas * 2**53 need 2**-1126


def _exact_sum(x: np.ndarray) -> int:
    """The exact sum of float64 values, as an integer count of 2**-1126 (no rounding at all, so the
    total of chunk sums equals the sum over all values whatever the chunking)."""
    x = x[x != 0]
    if not x.size:
        return 0
    m, e = np.frexp(x)
    mant = np.ldexp(m, 53).astype(np.int64)  # x = mant * 2**(e - 53), |mant| < 2**53
    shift = e.astype(np.int64) + (_SHIFT - 53)  # >= 0 for every finite float64
    hi, lo = mant >> 26, mant & ((1 << 26) - 1)  # mant = hi * 2**26 + lo, |hi| <= 2**27, 0 <= lo < 2**26
    total = 0
    step = 1 << 25  # 2**25 terms of at most 2**27: float64 sums of integers stay exact (< 2**53)
    for s in range(0, x.size, step):
        sh = shift[s:s + step]
        H = np.bincount(sh, weights=hi[s:s + step].astype(np.float64))
        L = np.bincount(sh, weights=lo[s:s + step].astype(np.float64))
        for k in np.flatnonzero((H != 0) | (L != 0)).tolist():
            total += ((int(H[k]) << 26) + int(L[k])) << k
    return total


def _square_error(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """x*x - fl(x*x) (Dekker's product with Veltkamp's split): fl(x*x) plus it is x**2 exactly."""
    c = 134217729.0 * x  # 2**27 + 1
    xh = c - (c - x)
    xl = x - xh
    return ((xh * xh - p) + 2.0 * xh * xl) + xl * xl


@dataclass
class Moments:
    """Count, exact sum and exact sum of squares (integers in units of 2**-1126), min and max of
    a numeric column's train values. Mergeable and order-independent."""

    n: int = 0
    s1: int = 0
    s2: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        p = x * x
        if not np.isfinite(p).all():
            raise OverflowError(f"a value of magnitude {float(np.max(np.abs(x))):.3g} is too large to standardise")
        self.n += int(x.size)
        self.s1 += _exact_sum(x)
        self.s2 += _exact_sum(p) + _exact_sum(_square_error(x, p))
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def merge(self, other: "Moments") -> None:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)

    def mean_std(self) -> tuple[float, float]:
        """The correctly rounded mean and (population) standard deviation."""
        n = self.n
        mean = Fraction(self.s1, n << _SHIFT)
        var = Fraction(self.s2, n << _SHIFT) - mean * mean
        return float(mean), math.sqrt(max(float(var), 0.0))


@dataclass
class FitState:
    """What :meth:`TabularEncoder.partial_fit` accumulates: exact, mergeable across chunks and ranks."""

    rows: int = 0
    counts: dict[str, Counter] = field(default_factory=dict)  # categorical / multi: value -> count
    moments: dict[str, Moments] = field(default_factory=dict)  # numeric
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)  # bucketised categorical: all values

    def merge(self, other: "FitState") -> "FitState":
        self.rows += other.rows
        for k, c in other.counts.items():
            self.counts.setdefault(k, Counter()).update(c)
        for k, m in other.moments.items():
            self.moments.setdefault(k, Moments()).merge(m)
        for k, v in other.values.items():
            self.values.setdefault(k, []).extend(v)
        return self


@dataclass
class TabularEncoder:
    schema: Schema
    vocab: dict[str, dict[str, int]] = field(default_factory=dict)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    edges: dict[str, list[float]] = field(default_factory=dict)  # bucketised categorical features
    fitted: bool = False

    # ---- fitting -----------------------------------------------------------------------
    def fit(self, df: pd.DataFrame, source: str | None = None, min_count: int = 1) -> "TabularEncoder":
        """Fit on one frame: :meth:`partial_fit` then :meth:`finish_fit`."""
        self.fit_state = FitState()
        return self.partial_fit(df, source).finish_fit(min_count)

    def partial_fit(self, df: pd.DataFrame, source: str | None = None) -> "TabularEncoder":
        """Accumulate the train rows of ``df`` (one chunk) into ``self.fit_state``; values are checked
        as :meth:`transform` checks them."""
        self._check_columns(df, source)
        st = getattr(self, "fit_state", None)
        if st is None:
            st = self.fit_state = FitState()
        st.rows += len(df)
        for f in self.schema.features:
            col = df[f.source]
            if f.kind == "categorical" and f.bins:
                st.values.setdefault(f.name, []).append(self._numeric(col, f, source, transform_only=True))
            elif f.kind == "categorical" and f.hashed:
                continue  # nothing to fit
            elif f.kind == "categorical":
                vc = pd.Series(self._strings(col), copy=False).value_counts(sort=False)
                st.counts.setdefault(f.name, Counter()).update(dict(zip(vc.index.tolist(), vc.to_numpy().tolist())))
            elif f.kind == "multi":
                ids, _, _ = self._multi_tokens(df, f, source)  # checks the weights of a hashed feature too
                if not f.hashed:
                    st.counts.setdefault(f.name, Counter()).update(ids)
            else:
                x = self._numeric(col, f, source, transform_only=True)
                try:
                    st.moments.setdefault(f.name, Moments()).update(x)
                except OverflowError as exc:
                    raise DataError(f"{source or 'data'}: column {f.source!r}: {exc} (feature {f.name!r}); "
                                    "use transform: log1p or rescale the column") from None
        return self

    def finish_fit(self, min_count: int = 1, state: FitState | None = None) -> "TabularEncoder":
        """Vocabularies, statistics and bucket edges from the accumulated (or given, e.g. merged) state."""
        st = state if state is not None else getattr(self, "fit_state", None)
        if st is None or st.rows == 0:
            raise DataError("no rows to fit the encoders on")
        for f in self.schema.features:
            if f.kind == "categorical" and f.bins:
                x = np.concatenate(st.values[f.name])
                qs = np.quantile(x, np.linspace(0, 1, f.bins + 1)[1:-1])
                self.edges[f.name] = sorted(set(float(q) for q in qs))
                f.cardinality = len(self.edges[f.name]) + 2  # buckets 1..len+1, 0 stays OOV
            elif f.hashed:
                f.cardinality = f.hash_buckets
            elif f.kind in ("categorical", "multi"):
                self._set_vocab(f, st.counts.get(f.name, Counter()), max(min_count, f.min_count))
            else:
                m = st.moments[f.name]
                if f.transform == "minmax":
                    self.stats[f.name] = (m.lo, (m.hi - m.lo) or 1.0)
                elif f.transform == "none":
                    self.stats[f.name] = (0.0, 1.0)
                else:
                    mean, sd = m.mean_std()
                    self.stats[f.name] = (mean, sd if sd > 0 else 1.0)
        self._index = {}
        self.fit_state = None
        self.fitted = True
        return self

    def _set_vocab(self, f, counts: Counter, min_count: int) -> None:
        keep = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
        self.vocab[f.name] = {v: i + 1 for i, v in enumerate(keep)}  # 0 = OOV
        f.cardinality = len(keep) + 1

    # ---- reading cells -----------------------------------------------------------------
    def _check_columns(self, df: pd.DataFrame, source: str | None, with_labels: bool = True) -> None:
        needed = [f.source for f in self.schema.features] + [f.weight_column for f in self.schema.multi
                                                             if f.weight_column]
        if with_labels:
            needed += self.label_columns
        missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
        if missing:
            raise DataError(f"{source or 'data'}: missing column(s) {missing}; the schema needs them "
                            f"(columns present: {list(df.columns)[:50]})")

    @property
    def label_columns(self) -> list[str]:
        return list(self.schema.label_columns or self.schema.labels)

    @staticmethod
    def _strings(col: pd.Series) -> np.ndarray:
        """Canonical strings of a column (:func:`dtn.data.codec.canonical_strings`); a column of
        strings without missing values is taken as it is."""
        if isinstance(col.dtype, np.dtype) and col.dtype.kind in "iufb":
            return codec.canonical_strings(col.to_numpy())
        if pd.api.types.is_string_dtype(col.dtype) and not col.hasnans:
            return col.to_numpy(dtype=object)
        return codec.canonical_strings(col.to_numpy(dtype=object, na_value=None))

    def _numeric(self, col: pd.Series, f, source, transform_only=False) -> np.ndarray:
        if col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
            conv = pd.to_numeric(col.astype(str).str.strip(), errors="coerce")
            bad = conv.isna() & col.notna()
            if bad.any():
                row = int(np.argmax(bad.to_numpy()))
                raise DataError(f"{_where(source, f.source, col.index, row)}: value {col.iloc[row]!r} "
                                f"is not a number (feature {f.name!r} is numeric)")
            col = conv
        elif not pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            raise DataError(f"{source or 'data'}: column {f.source!r} has dtype {col.dtype}, but feature {f.name!r} is numeric")
        x = col.to_numpy(dtype=np.float64)
        nan = ~np.isfinite(x)
        if nan.any():
            row = int(np.argmax(nan))
            raise DataError(f"{_where(source, f.source, col.index, row)}: value {x[row]} (NaN/inf) in numeric feature "
                            f"{f.name!r}; fill or drop missing values first")
        row = codec.first_outside_float32(x)
        if row >= 0:
            raise DataError(f"{_where(source, f.source, col.index, row)}: value {x[row]:.6g} is outside the float32 "
                            f"range of the model (|x| <= {codec.FLOAT32_MAX:.4g}) (feature {f.name!r})")
        if f.kind == "numeric":
            x = codec.pre_transform(x, f.transform)
        if transform_only:
            return x
        scaled = codec.scale(x, *self.stats[f.name])
        row = codec.first_outside_float32(scaled)
        if row >= 0:
            raise DataError(f"{_where(source, f.source, col.index, row)}: value {col.iloc[row]!r} scales to "
                            f"{scaled[row]:.6g} with the training statistics of feature {f.name!r}, outside the float32 "
                            "range of the model")
        return scaled

    def _multi_tokens(self, df: pd.DataFrame, f, source):
        """(ids, lengths, weights or None) of a multi-valued feature's cells."""
        col = df[f.source]
        ids, lengths, weights, bad = codec.split_multi(self._strings(col), f.delimiter, f.weight_separator)
        if bad is not None:
            row, token = bad
            raise DataError(f"{_where(source, f.source, col.index, row)}: token {token!r} of feature {f.name!r} has "
                            f"a weight that is not a finite number within the float32 range (tokens are id{f.weight_separator}weight)")
        if f.weight_column:
            wcol = df[f.weight_column]
            weights, problem = codec.split_weight_column(self._strings(wcol), f.delimiter, lengths)
            if problem is not None:
                kind, row, what = problem
                where = _where(source, f.weight_column, wcol.index, row)
                if kind == "count":
                    raise DataError(f"{where}: {what} weights {wcol.iloc[row]!r} for {int(lengths[row])} ids "
                                    f"{col.iloc[row]!r} of feature {f.name!r}")
                raise DataError(f"{where}: weight {what!r} of feature {f.name!r} is not a finite number within the "
                                "float32 range")
        return ids, lengths, weights

    def validate(self, df: pd.DataFrame, source: str | None = None, with_labels: bool = True) -> None:
        """Check every cell :meth:`transform` would check (columns, numbers, weights, labels) without
        encoding; works before fitting."""
        self._check_columns(df, source, with_labels)
        for f in self.schema.features:
            if f.kind == "numeric" or f.bins:
                self._numeric(df[f.source], f, source, transform_only=True)
            elif f.kind == "multi" and f.weighted:
                self._multi_tokens(df, f, source)
        if with_labels:
            for c in self.label_columns:
                self._label(df[c], c, source)

    # ---- transforming ------------------------------------------------------------------
    def _ids(self, f, strings: np.ndarray) -> np.ndarray:
        """Vocabulary ids (0 = OOV), as :func:`dtn.data.codec.lookup` gives them, through a cached pandas index;
        a hashed feature's ids from :func:`dtn.data.codec.hash_buckets`."""
        if f.hashed:
            return codec.hash_buckets(strings, f.hash_buckets, f.hash_seed)
        cache = self.__dict__.setdefault("_index", {})
        if f.name not in cache:
            vocab = self.vocab[f.name]
            cache[f.name] = (pd.Index(list(vocab), dtype=object), np.asarray(list(vocab.values()) + [0], dtype=np.int64))
        index, ids = cache[f.name]
        return ids[index.get_indexer(strings)]  # -1 (missing) picks the trailing 0

    def transform(self, df: pd.DataFrame, source: str | None = None, with_labels: bool = True) -> EncodedData:
        if not self.fitted:
            raise RuntimeError("TabularEncoder.transform called before fit")
        self._check_columns(df, source, with_labels)
        n = len(df)
        cats = []
        for f in self.schema.categorical:
            if f.bins:
                x = self._numeric(df[f.source], f, source, transform_only=True)
                cats.append(codec.bucketize(x, self.edges[f.name]))
            else:
                cats.append(self._ids(f, self._strings(df[f.source])))
        cat = torch.from_numpy(np.stack(cats, 1)) if cats else torch.zeros(n, 0, dtype=torch.long)
        nums = [self._numeric(df[f.source], f, source) for f in self.schema.numeric]
        num = torch.from_numpy(np.stack(nums, 1).astype(np.float32)) if nums else torch.zeros(n, 0)
        multi = [self._encode_multi(df, f, source) for f in self.schema.multi]
        if with_labels:
            labels = torch.from_numpy(np.stack([self._label(df[c], c, source) for c in self.label_columns], 1))
        else:
            labels = torch.zeros(n, len(self.label_columns))
        return EncodedData(cat, num, multi, labels)

    def _encode_multi(self, df: pd.DataFrame, f, source=None) -> JaggedField:
        ids, lengths, weights = self._multi_tokens(df, f, source)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.from_numpy(lengths), 0)
        values = torch.from_numpy(self._ids(f, np.asarray(ids, dtype=object))) if ids else torch.zeros(0, dtype=torch.long)
        w = None if weights is None else torch.from_numpy(weights.astype(np.float32))
        return JaggedField(values, offsets, w)

    @staticmethod
    def _label(col: pd.Series, name: str, source) -> np.ndarray:
        y = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad))
            value = col.iloc[row]
            value = value.item() if hasattr(value, "item") else value
            raise DataError(f"{_where(source, name, col.index, row)}: label value {value!r} is not 0 or 1")
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
