"""Feature schema: what each input column is, and the batch format models consume.

A :class:`Schema` lists labels (tasks, in their Task-Sensitive order) and features of
three kinds (torchrec-style names):

* ``categorical`` — one id per row, its own embedding table;
* ``numeric``     — one float per row, turned into a d-vector as ``value * v + b``;
* ``multi``       — a list of ids per row (jagged), pooled by an embedding bag; optionally
  weighted, as ``id:weight`` tokens (``weight_separator=":"``) or a parallel column of
  weights (``weight_column``).

After encoding, categorical ids are in ``[0, cardinality)`` with row 0 reserved for
out-of-vocabulary / missing values. A categorical or multi-valued feature with
``hash_buckets: N`` has no vocabulary: every value is hashed into one of N rows
(:func:`dtn.data.codec.hash_buckets`), so values never seen in training need no refit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import torch

KINDS = ("categorical", "numeric", "multi")


def _only(*kinds, default=None):
    """A FeatureSpec field that applies to features of ``kinds`` only (``metadata["kinds"]``): a value other
    than its default on a feature of another kind is refused (:func:`kind_mismatch`)."""
    return field(default=default, metadata={"kinds": kinds})


@dataclass
class FeatureSpec:
    name: str
    kind: str = "categorical"
    cardinality: int = 0  # filled by the encoder for categorical / multi features
    # numeric preprocessing: "standard", "log1p" (log1p then standardise) or "minmax"
    transform: str = _only("numeric", default="standard")
    pooling: str = _only("multi", default="sum")  # multi-valued: "sum" or "mean"
    delimiter: str = _only("multi", default="|")  # multi-valued: separator of ids in a raw cell
    column: Optional[str] = None  # raw column name if it differs from `name`
    # categorical only: > 0 = a numeric column cut into this many train quantile buckets
    bins: int = _only("categorical", default=0)
    # categorical / multi: values seen fewer times in train map to the OOV id 0
    min_count: int = _only("categorical", "multi", default=1)
    weight_separator: Optional[str] = _only("multi")  # multi: tokens are "id<sep>weight", e.g. "12:0.5|7:2"
    weight_column: Optional[str] = _only("multi")  # multi: a column of weights, same delimiter, one per id
    # categorical / multi: > 0 = no vocabulary; ids are murmur3(value, hash_seed) % hash_buckets (docs/own-data.md)
    hash_buckets: int = _only("categorical", "multi", default=0)
    hash_seed: int = _only("categorical", "multi", default=0)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.transform not in ("standard", "log1p", "minmax", "none"):
            raise ValueError(f"feature {self.name!r}: unknown numeric transform {self.transform!r}")
        off = kind_mismatch(self, [f.name for f in fields(self) if getattr(self, f.name) != f.default])
        if off:
            raise ValueError(off)
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"feature {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.weight_separator and self.weight_column:
            raise ValueError(f"feature {self.name!r}: give weights either as id{self.weight_separator}weight tokens "
                             "or in a weight_column, not both")
        if self.weight_separator is not None and (not self.weight_separator or self.weight_separator == self.delimiter):
            raise ValueError(f"feature {self.name!r}: weight_separator must be a non-empty string other than the "
                             f"delimiter {self.delimiter!r}")
        if not self.delimiter:
            raise ValueError(f"feature {self.name!r}: delimiter must be a non-empty string")
        if self.min_count < 1:
            raise ValueError(f"feature {self.name!r}: min_count must be >= 1, got {self.min_count}")
        for key, high in (("hash_buckets", 2**31 - 1), ("hash_seed", 2**32 - 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= high:
                raise ValueError(f"feature {self.name!r}: {key} = {v!r}: allowed: an integer from 0 to {high}")
        if self.hash_buckets:
            if self.kind not in ("categorical", "multi"):
                raise ValueError(f"feature {self.name!r}: hash_buckets applies to categorical and multi features only")
            if self.bins:
                raise ValueError(f"feature {self.name!r}: hash_buckets and bins exclude each other (bins buckets a "
                                 "numeric column by its train quantiles)")
            if self.min_count > 1:
                raise ValueError(f"feature {self.name!r}: min_count = {self.min_count} needs a vocabulary; a feature with "
                                 "hash_buckets has none (rare values share rows with others instead)")
        elif self.hash_seed:
            raise ValueError(f"feature {self.name!r}: hash_seed applies with hash_buckets only")

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def weighted(self) -> bool:
        return bool(self.weight_separator or self.weight_column)

    @property
    def hashed(self) -> bool:
        return self.hash_buckets > 0


def kind_keys() -> dict[str, tuple[str, ...]]:
    """Each kind-specific FeatureSpec key and the feature kinds it applies to (from the fields' metadata)."""
    return {f.name: f.metadata["kinds"] for f in fields(FeatureSpec) if "kinds" in f.metadata}


def kind_mismatch(spec, keys) -> str | None:
    """The message for the first of ``keys`` (given for feature ``spec``) that does not apply to its kind."""
    for key, kinds in kind_keys().items():
        if key in keys and spec.kind not in kinds:
            which = " and ".join(kinds)
            return (f"feature {spec.name!r}: {key} applies to {which} features only; this feature is {spec.kind} "
                    f"(remove {key}, or change kind)")
    return None


# keys added after checkpoint format 2, written only when set: the digests (fingerprints) of the
# schemas and encoders of earlier runs stay what they were
_UNSET_OMITTED = {"hash_buckets": 0, "hash_seed": 0}


def spec_dict(f: FeatureSpec) -> dict:
    """A FeatureSpec as a dict, without the newer keys that keep their defaults."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(f).items() if not (k in _UNSET_OMITTED and v == _UNSET_OMITTED[k])}


@dataclass
class Schema:
    features: list[FeatureSpec]
    labels: list[str]  # task names, in Task-Sensitive order (predecessor first)
    label_columns: Optional[list[str]] = None

    def __post_init__(self):
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"schema: duplicate feature names {sorted(dup)}")
        if len(self.labels) < 1:
            raise ValueError("schema: at least one label (task) is required")

    def of_kind(self, kind: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == kind]

    @property
    def categorical(self) -> list[FeatureSpec]:
        return self.of_kind("categorical")

    @property
    def numeric(self) -> list[FeatureSpec]:
        return self.of_kind("numeric")

    @property
    def multi(self) -> list[FeatureSpec]:
        return self.of_kind("multi")

    @property
    def num_fields(self) -> int:
        return len(self.features)

    @property
    def num_tasks(self) -> int:
        return len(self.labels)

    def field_order(self) -> list[str]:
        """Field order of the embedding matrix E: categorical, then multi, then numeric."""
        return [f.name for f in self.categorical + self.multi + self.numeric]

    def to_dict(self) -> dict:
        return {"features": [spec_dict(f) for f in self.features], "labels": list(self.labels),
                "label_columns": None if self.label_columns is None else list(self.label_columns)}

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        feats = [f if isinstance(f, FeatureSpec) else FeatureSpec(**f) for f in d["features"]]
        return cls(features=feats, labels=list(d["labels"]), label_columns=d.get("label_columns"))


@dataclass
class JaggedField:
    """One multi-valued feature for a batch: ids ``values`` split by ``offsets`` (len B+1)."""

    values: torch.Tensor
    offsets: torch.Tensor
    weights: Optional[torch.Tensor] = None

    def to(self, device) -> "JaggedField":
        w = None if self.weights is None else self.weights.to(device)
        return JaggedField(self.values.to(device), self.offsets.to(device), w)


@dataclass
class FeatureBatch:
    """What every model's ``forward`` takes.

    categorical: LongTensor [B, C] of encoded ids (0 = out of vocabulary).
    numeric:     FloatTensor [B, N] of scaled values.
    multi:       one :class:`JaggedField` per multi-valued feature.
    """

    categorical: torch.Tensor
    numeric: torch.Tensor
    multi: Sequence[JaggedField] = field(default_factory=tuple)

    @property
    def batch_size(self) -> int:
        return int(self.categorical.shape[0])

    def to(self, device) -> "FeatureBatch":
        return FeatureBatch(self.categorical.to(device), self.numeric.to(device), tuple(m.to(device) for m in self.multi))
