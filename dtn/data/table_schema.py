"""The data schema of a table: the YAML that names a table's files, label columns, features and
split (the format is described in :mod:`dtn.data.tabular`), parsed and checked into a
:class:`TableSchema`; every error names the file and the key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml

from ..features import FeatureSpec, Schema
from ..features.schema import kind_mismatch

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "schemas")
SPLITS = ("train", "valid", "test")
FORMATS = ("csv", "parquet")
_SPEC_KEYS = {f.name for f in fields(FeatureSpec)} - {"name", "cardinality"}


class SchemaError(ValueError):
    """A bad data schema file; the message names the file and the YAML key."""


def expand_columns(pattern) -> list[str]:
    """``"num_{1..3}"`` -> num_1, num_2, num_3; ``"{a,b}_x"`` -> a_x, b_x; lists expand item by item.
    A zero-padded start pads the range (``{01..12}``)."""
    if isinstance(pattern, (list, tuple)):
        return [c for p in pattern for c in expand_columns(p)]
    pattern = str(pattern)
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1).strip()) if rng.group(1).strip().startswith("0") else 0
        step = 1 if b >= a else -1
        items = [str(i).zfill(width) for i in range(a, b + step, step)]
    elif "," in body:
        items = [s.strip() for s in body.split(",")]
    else:
        raise ValueError(f"column pattern {pattern!r}: braces hold a range {{a..b}} or alternatives {{x,y}}")
    return [c for item in items for c in expand_columns(head + item + tail)]


@dataclass
class TableSchema:
    """A parsed data schema (see the module docstring)."""

    labels: list[str]  # task names, Task-Sensitive order (predecessor first)
    label_columns: list[str]
    features: list[FeatureSpec]
    name: str = "table"
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    format: Optional[str] = None  # "csv" / "parquet"; None: from each file's extension
    delimiter: str = ","  # CSV field separator
    header: bool = True  # CSV: the first line names the columns
    columns: Optional[list[str]] = None  # CSV without a header: the column names
    valid_fraction: float = 0.1  # of the train file(s), when there is no valid file
    test_fraction: float = 0.1
    split_seed: int = 2024
    split_key: Optional[str] = None  # column hashed to assign splits (None: the row position)
    chunk_rows: int = 100_000
    path: Optional[str] = None  # the YAML file

    def feature_schema(self) -> Schema:
        """A fresh :class:`dtn.features.Schema` (cardinalities unset) for the encoder and the models."""
        feats = [FeatureSpec(**{k: getattr(f, k) for k in ("name", *_SPEC_KEYS)}) for f in self.features]
        return Schema(feats, labels=list(self.labels), label_columns=list(self.label_columns))

    def fractions(self) -> dict[str, float]:
        """The share of the train files' rows that goes to each split without a file of its own."""
        v = 0.0 if self.valid else self.valid_fraction
        t = 0.0 if self.test else self.test_fraction
        return {"valid": v, "test": t, "train": 1.0 - v - t}

    def needed_columns(self) -> list[str]:
        cols = [f.source for f in self.features] + [f.weight_column for f in self.features if f.weight_column]
        return list(dict.fromkeys(cols + self.label_columns))

    def to_dict(self) -> dict:
        from dataclasses import asdict

        from ..features.schema import spec_dict

        return {**asdict(self), "features": [spec_dict(f) for f in self.features]}


_TOP_KEYS = {"name", "train", "valid", "test", "format", "csv", "labels", "features", "split", "chunk_rows"}


def _files(value, where: str, base: str | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise SchemaError(f"{where}: expected a file path or a list of paths, got {value!r}")
    return [p if os.path.isabs(p) or base is None else os.path.join(base, p) for p in (os.path.expanduser(v) for v in items)]


def table_schema_from_dict(raw: dict, path: str | None = None) -> TableSchema:
    """Validate a data schema mapping; errors name ``path`` and the key."""
    at = path or "data schema"
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else "a list" if isinstance(raw, list) else "a single value"
        raise SchemaError(f"{at}: the schema must be a mapping of keys (labels, features, ...), got {got}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SchemaError(f"{at}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    base = os.path.dirname(os.path.abspath(path)) if path else None
    # labels
    labels_raw = raw.get("labels")
    if not isinstance(labels_raw, list) or not labels_raw:
        raise SchemaError(f"{at}: labels: a list of label columns (tasks, predecessor first) is required")
    labels, label_cols = [], []
    for i, item in enumerate(labels_raw):
        if isinstance(item, str):
            labels.append(item)
            label_cols.append(item)
        elif isinstance(item, dict) and set(item) <= {"name", "column"} and "name" in item:
            labels.append(str(item["name"]))
            label_cols.append(str(item.get("column", item["name"])))
        else:
            raise SchemaError(f"{at}: labels[{i}]: expected a column name or {{name: task, column: col}}, got {item!r}")
    if len(set(labels)) != len(labels):
        raise SchemaError(f"{at}: labels: duplicate task names {labels}")
    same = sorted({c for c in label_cols if label_cols.count(c) > 1})
    if same:
        tasks = [t for t, c in zip(labels, label_cols) if c in same]
        raise SchemaError(f"{at}: labels: tasks {tasks} read the same label column {same[0]!r}; each task needs a "
                          "label column of its own")
    if len(labels) < 2:
        raise SchemaError(f"{at}: labels: {labels} names one task; the multi-task models need two or more label columns")
    # features
    feats_raw = raw.get("features")
    if not isinstance(feats_raw, list) or not feats_raw:
        raise SchemaError(f"{at}: features: a list of feature entries is required")
    feats: list[FeatureSpec] = []
    for i, item in enumerate(feats_raw):
        key = f"{at}: features[{i}]"
        if not isinstance(item, dict):
            raise SchemaError(f"{key}: expected a mapping, got {item!r}")
        bad = sorted(set(item) - _SPEC_KEYS - {"name", "columns"})
        if bad:
            raise SchemaError(f"{key}: unknown key(s) {bad}; known: {sorted(_SPEC_KEYS | {'name', 'columns'})}")
        opts = {k: v for k, v in item.items() if k not in ("name", "columns")}
        if ("name" in item) == ("columns" in item):
            raise SchemaError(f"{key}: give either name (one feature) or columns (one feature per column)")
        if "columns" in item:
            if "column" in item:
                raise SchemaError(f"{key}: column renames one feature; it cannot go with columns")
            try:
                names = expand_columns(item["columns"])
            except ValueError as exc:
                raise SchemaError(f"{key}.columns: {exc}") from None
        else:
            names = [str(item["name"])]
        _check_spec_types(opts, key)
        for n in names:
            try:
                spec = FeatureSpec(name=n, **opts)
            except (TypeError, ValueError) as exc:
                raise SchemaError(f"{key} ({n}): {exc}") from None
            off = kind_mismatch(spec, opts)  # a kind-specific key given, even at its default value
            if off:
                raise SchemaError(f"{key} ({n}): {off}")
            feats.append(spec)
    names = [f.name for f in feats]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SchemaError(f"{at}: features: {dup} listed more than once")
    clash = sorted(set(f.source for f in feats) & set(label_cols))
    if clash:
        raise SchemaError(f"{at}: features: {clash} are label columns; a label cannot also be an input")
    ts = TableSchema(labels=labels, label_columns=label_cols, features=feats, path=path)
    ts.name = str(raw.get("name", os.path.splitext(os.path.basename(path))[0] if path else "table"))
    for k in ("train", "valid", "test"):
        setattr(ts, k, _files(raw.get(k), f"{at}: {k}", base))
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise SchemaError(f"{at}: format: {fmt!r} is not one of {FORMATS}")
    ts.format = fmt
    csv_opts = raw.get("csv") or {}
    if not isinstance(csv_opts, dict) or set(csv_opts) - {"delimiter", "header", "columns"}:
        raise SchemaError(f"{at}: csv: a mapping with keys delimiter, header, columns; got {csv_opts!r}")
    ts.delimiter = str(csv_opts.get("delimiter", ","))
    if len(ts.delimiter) != 1:
        raise SchemaError(f"{at}: csv.delimiter: one character, got {ts.delimiter!r}")
    ts.header = csv_opts.get("header", True)
    if not isinstance(ts.header, bool):
        raise SchemaError(f"{at}: csv.header: true or false, got {ts.header!r}")
    if "columns" in csv_opts:
        try:
            ts.columns = expand_columns(csv_opts["columns"])
        except ValueError as exc:
            raise SchemaError(f"{at}: csv.columns: {exc}") from None
    if not ts.header and not ts.columns:
        raise SchemaError(f"{at}: csv.header is false, so csv.columns must list the column names")
    split = raw.get("split") or {}
    if not isinstance(split, dict) or set(split) - {"valid", "test", "seed", "key"}:
        raise SchemaError(f"{at}: split: a mapping with keys valid, test, seed, key; got {split!r}")
    for k in ("valid", "test"):
        if k in split:
            v = split[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise SchemaError(f"{at}: split.{k}: a fraction in [0, 1), got {v!r}")
            if getattr(ts, k):
                raise SchemaError(f"{at}: split.{k}: the schema also names a {k} file; use one or the other")
            setattr(ts, f"{k}_fraction", float(v))
    if ts.fractions()["train"] <= 0:
        raise SchemaError(f"{at}: split: valid + test fractions leave no training rows")
    seed = split.get("seed", ts.split_seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SchemaError(f"{at}: split.seed: an integer >= 0, got {seed!r}")
    ts.split_seed = seed
    ts.split_key = split.get("key")
    if ts.split_key is not None:
        ts.split_key = str(ts.split_key)
    chunk_rows = raw.get("chunk_rows", ts.chunk_rows)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise SchemaError(f"{at}: chunk_rows: a positive integer, got {chunk_rows!r}")
    ts.chunk_rows = chunk_rows
    return ts


def _check_spec_types(opts: dict, key: str) -> None:
    """Each feature key's value has its FeatureSpec field's type (``min_count: "5"`` is refused, not compared)."""
    import typing

    hints = typing.get_type_hints(FeatureSpec)
    for k, v in opts.items():
        tp = hints.get(k)
        if tp is None:
            continue
        optional = typing.get_origin(tp) is typing.Union
        base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
        if v is None and optional:
            continue
        ok = (isinstance(v, int) and not isinstance(v, bool)) if base is int else isinstance(v, base)
        if not ok:
            what = {int: "an integer", str: "a string"}.get(base, base.__name__)
            raise SchemaError(f"{key}: {k} = {v!r}: allowed: {what}" + (" or null" if optional else ""))


def find_table_schema(name_or_path: str) -> str:
    """A data schema file: a path, or the name of a packaged one (aliexpress, ali_ccp)."""
    from ..fileio import find_named_file

    return find_named_file(name_or_path, SCHEMA_DIR, "data schema", "schema")


def load_table_schema(name_or_path: str, train=None, valid=None, test=None, chunk_rows: int | None = None) -> TableSchema:
    """Read a data schema YAML; ``train`` / ``valid`` / ``test`` (path or list) and ``chunk_rows`` override it."""
    path = find_table_schema(name_or_path)
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SchemaError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    ts = table_schema_from_dict(raw, path)
    for k, v in (("train", train), ("valid", valid), ("test", test)):
        if v:
            setattr(ts, k, _files(v, f"--{k}", None))
            if k != "train":
                setattr(ts, f"{k}_fraction", 0.0)
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise SchemaError(f"chunk_rows must be >= 1, got {chunk_rows}")
        ts.chunk_rows = int(chunk_rows)
    if not ts.train:
        raise SchemaError(f"{path}: no train file: name one under train: in the schema or pass --data FILE")
    seen: dict[str, str] = {}
    for role in SPLITS:
        for f in getattr(ts, role):
            real = os.path.realpath(f)
            if real in seen and seen[real] != role:
                raise SchemaError(f"{f}: named as both the {seen[real]} and the {role} file (in {path} or by --data / "
                                  f"--valid / --test); the {role} rows must be rows the model is not trained or selected "
                                  "on: give another file, or leave it out to hold out rows of the train file")
            seen.setdefault(real, role)
    return ts
