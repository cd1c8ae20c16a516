"""Your own data: a CSV or Parquet table described by a YAML data schema.

A data schema names the label columns (the tasks, in Task-Sensitive order), the feature
columns and their kinds, the files, and how to hold out validation and test rows::

    name: aliexpress
    train: train.csv                # file(s); relative paths are relative to this YAML file
    labels: [click, conversion]     # or [{name: ctr, column: click}, ...]
    features:
      - {columns: "categorical_{1..16}", kind: categorical}
      - {columns: "numerical_{1..63}", kind: numeric, transform: standard}
      - {name: tags, kind: multi, delimiter: "|", weight_separator: ":"}
    split: {valid: 0.1, test: 0.1, seed: 2024, key: search_id}
    chunk_rows: 100000

``columns`` takes a list or a pattern with ``{a..b}`` ranges and ``{x,y}`` alternatives and
makes one feature per column; every other feature key is a :class:`dtn.features.FeatureSpec`
field (``transform``, ``min_count``, ``bins``, ``pooling``, ``delimiter``,
``weight_separator``, ``weight_column``, ``column``). Validation and test rows come from
separate ``valid:`` / ``test:`` files or, for a split without a file, from the train file(s)
by a seeded hash of the ``split.key`` column (whole groups, e.g. one search session, stay
together) or of the row position.

Files are read in chunks (:class:`TableSource`): CSV in blocks of ``chunk_rows`` lines (one
record per line), Parquet by row group (in slices of ``chunk_rows``). The in-memory loader
(:func:`load_table`) and the streaming one (:mod:`dtn.data.stream`) read the same chunks
with the same code, so they see the same rows, splits and encoders.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import torch
import yaml

from ..features import FeatureSpec, JaggedField, Schema
from ..features.schema import kind_mismatch
from .encoders import DataError, EncodedData, SplitData, TabularEncoder

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "schemas")
SPLITS = ("train", "valid", "test")
FORMATS = ("csv", "parquet")
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zip": "zip"}
_SPEC_KEYS = {f.name for f in fields(FeatureSpec)} - {"name", "cardinality"}


class SchemaError(ValueError):
    """A bad data schema file; the message names the file and the YAML key."""


# ---- the data schema -------------------------------------------------------------------------
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


def _head(text: str, delimiter: str, limit: int = 200) -> str:
    """A raw line for a message: whole up to ``limit`` characters, else its fields up to there and ``...``."""
    if len(text) <= limit:
        return repr(text)
    cut = text.rfind(delimiter, 0, limit)
    return f"{text[:cut if cut > 0 else limit]!r} ... ({len(text):,} characters)"


def first_sentence(exc: BaseException) -> str:
    """An exception's own words on one line, up to its first sentence end (never cut mid-word), without
    the class name a library may prefix."""
    text = " ".join(str(exc).split()) or "no reason given"
    text = re.sub(r"^(\[Errno \d+\]\s*)", "", text)
    cut = re.search(r"(?<=[a-z0-9)'\"])\.\s", text)
    return text[:cut.start()] if cut else text.rstrip(".")


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


# ---- reading files in chunks -----------------------------------------------------------------
@dataclass
class Chunk:
    """One unit of reading (and of sharding across workers and ranks)."""

    id: int  # position in the source's chunk list
    file: str
    role: str  # "train": rows are split by hash; "valid" / "test": the whole file is that split
    file_index: int  # position of the file among those of its role
    format: str
    first: int  # CSV: file line (1-based) of the first line; Parquet: first row (0-based)
    start: int = 0  # CSV byte range
    end: int = 0
    row_group: int = -1  # Parquet
    row0: int = 0  # the index of the file's first data row (CSV: its line), so that index - row0 is the data row
    rows: dict[str, int] = field(default_factory=dict)  # rows per split, filled by a scan


def _format_of(path: str, fmt: str | None) -> str:
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, not a data file (name a CSV or Parquet file)")
    low = path.lower()
    packed = next((ext for ext in COMPRESSED if low.endswith(ext)), None)
    if packed:  # whatever format: says, the chunked reader cannot seek in a compressed stream
        raise DataError(f"{path}: a {COMPRESSED[packed]}-compressed file; the chunked reader needs it uncompressed "
                        "(decompress it, or convert it to Parquet)")
    if fmt:
        return fmt
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise SchemaError(f"{path}: cannot tell the format from the extension; set format: csv or parquet in the schema")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install 'dtn-kernels[parquet]' (or pip install pyarrow)") from exc
    return pq


def _unit_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per value, fixed by (value, seed): splitmix64 over pandas' stable hash."""
    h = pd.util.hash_array(values, categorize=False).astype(np.uint64)
    h ^= np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


class TableSource:
    """The files of a :class:`TableSchema`, indexed into :class:`Chunk` s and read chunk by chunk.

    Picklable (paths and options only), so DataLoader workers can read with it."""

    def __init__(self, ts: TableSchema):
        self.ts = ts
        self.encoder_schema = ts.feature_schema()

    # ---- columns -------------------------------------------------------------------------
    def _csv_header(self, path: str) -> tuple[list[str], int, int]:
        """(column names, byte offset of the first data line, its line number)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        with open(path, "rb") as fh:
            line = fh.readline()
        if line[:2] == b"\x1f\x8b":
            raise DataError(f"{path}: a gzip-compressed file; the chunked CSV reader needs it uncompressed "
                            "(or convert it to Parquet)")
        if not self.ts.header:
            return list(self.ts.columns), 0, 1
        if not line.strip():
            raise DataError(f"{path}: the file is empty (expected a header line naming the columns)")
        try:
            text = line.decode("utf-8-sig").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: line 1: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                            "save the file as UTF-8") from None
        names = [c.strip() for c in next(csv.reader([text], delimiter=self.ts.delimiter))]
        if self.ts.columns and names != self.ts.columns:
            raise DataError(f"{path}: header {names[:10]}... differs from csv.columns in the schema")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"{path}: line 1: the header names column(s) {dup} more than once")
        return names, len(line), 2

    def columns_of(self, path: str) -> list[str]:
        if _format_of(path, self.ts.format) == "csv":
            return self._csv_header(path)[0]
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        return list(self._parquet_schema(path).names)

    @staticmethod
    def _parquet_schema(path: str):
        try:
            return _pyarrow_parquet().ParquetFile(path).schema_arrow
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises its own error types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({first_sentence(exc)})") from None

    def needed(self, role: str) -> list[str]:
        cols = self.ts.needed_columns()
        if role == "train" and self.ts.split_key and self.ts.split_key not in cols:
            cols.append(self.ts.split_key)
        return cols

    def check_columns(self, path: str, role: str) -> list[str]:
        present = self.columns_of(path)
        missing = [c for c in self.needed(role) if c not in present]
        if missing:
            what = f" (split.key is {self.ts.split_key!r})" if self.ts.split_key in missing else ""
            raise DataError(f"{path}: missing column(s) {missing} named in the data schema {self.ts.path or ''}{what}; "
                            f"the file has {len(present)} columns: {present[:30]}{' ...' if len(present) > 30 else ''}")
        if _format_of(path, self.ts.format) == "parquet":
            import pyarrow as pa

            schema = self._parquet_schema(path)
            for c in self.needed(role):
                t = schema.field(c).type
                if pa.types.is_nested(t):
                    raise DataError(f"{path}: column {c!r} is a Parquet {t} column; cells must be scalars (a multi-valued "
                                    "feature is read from delimited strings such as 'a|b|c')")
        return present

    # ---- indexing ------------------------------------------------------------------------
    def chunks(self) -> list[Chunk]:
        """Every chunk of every file: train files first, then valid, then test."""
        out: list[Chunk] = []
        for role in SPLITS:
            for i, path in enumerate(getattr(self.ts, role)):
                self.check_columns(path, role)
                fmt = _format_of(path, self.ts.format)
                found = self._csv_chunks(path, role, i) if fmt == "csv" else self._parquet_chunks(path, role, i)
                for c in found:
                    c.id = len(out)
                    out.append(c)
        return out

    def _csv_chunks(self, path: str, role: str, file_index: int) -> list[Chunk]:
        _, start, first_line = self._csv_header(path)
        size = os.path.getsize(path)
        every = self.ts.chunk_rows
        bounds, count, pos = [start], 0, start
        with open(path, "rb") as fh:
            fh.seek(start)
            while True:
                block = fh.read(1 << 24)
                if not block:
                    break
                nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
                # the chunk ends after newline number (every - count) of this block, then every `every`
                bounds += (pos + nl[every - count - 1::every] + 1).tolist()
                count = (count + len(nl)) % every
                pos += len(block)
        if bounds[-1] < size:
            bounds.append(size)
        return [Chunk(-1, path, role, file_index, "csv", first_line + k * every, bounds[k], bounds[k + 1],
                      row0=first_line) for k in range(len(bounds) - 1)]

    def _parquet_chunks(self, path: str, role: str, file_index: int) -> list[Chunk]:
        meta = _pyarrow_parquet().ParquetFile(path).metadata
        out, first = [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                out.append(Chunk(-1, path, role, file_index, "parquet", first, row_group=g))
            first += n
        return out

    # ---- reading -------------------------------------------------------------------------
    def read(self, chunk: Chunk) -> Iterator[pd.DataFrame]:
        """The chunk's rows as DataFrames (CSV: one, indexed by file line; Parquet: slices of
        ``chunk_rows`` rows, indexed by row), holding the needed columns."""
        if chunk.format == "csv":
            yield self._read_csv(chunk)
        else:
            yield from self._read_parquet(chunk)

    def _read_csv(self, chunk: Chunk) -> pd.DataFrame:
        names = self._csv_header(chunk.file)[0]
        d = self.ts.delimiter
        with open(chunk.file, "rb") as fh:
            fh.seek(chunk.start)
            raw = fh.read(chunk.end - chunk.start)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_no = chunk.first + raw.count(b"\n", 0, exc.start)
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise DataError(f"{chunk.file}: line {line_no}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {col}); "
                            "save the file as UTF-8") from None
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        bd, quote = d.encode(), b'"'
        counts = [0 if line in (b"", b"\r") else
                  (line.count(bd) + 1 if quote not in line else
                   len(next(csv.reader([line.decode("utf-8", "replace").rstrip("\r")], delimiter=d))))
                  for line in lines]
        width = len(names)
        bad = [i for i, c in enumerate(counts) if c and c != width]
        if bad:
            i = bad[0]
            text = lines[i].decode("utf-8", "replace").rstrip("\r")
            cells = next(csv.reader([text], delimiter=d))
            if counts[i] > width:
                detail = f"field {width + 1} {cells[width]!r} has no column (the header has {width})"
            else:
                detail = f"column {names[counts[i]]!r} (field {counts[i] + 1}) and after are missing"
            raise DataError(f"{chunk.file}: line {chunk.first + i}: {counts[i]} fields, expected {width}: {detail}; "
                            f"line: {_head(text, d)} ({len(bad)} malformed line(s) in this chunk)")
        keep = [chunk.first + i for i, c in enumerate(counts) if c]
        needed = self.needed(chunk.role)
        numeric = {f.source for f in self.encoder_schema.features if f.kind == "numeric" or f.bins}
        strings = {c: str for c in needed if c not in numeric}
        args = dict(sep=d, header=None, names=names, usecols=needed, keep_default_na=False, skip_blank_lines=True,
                    encoding="utf-8")
        try:
            df = pd.read_csv(io.BytesIO(raw), dtype={**strings, **{c: np.float64 for c in numeric}}, **args)
        except (ValueError, TypeError):  # a numeric cell that is not a number: read as text, the encoder names it
            df = pd.read_csv(io.BytesIO(raw), dtype={c: str for c in needed}, **args)
        if len(df) != len(keep):
            raise DataError(f"{chunk.file}: lines {chunk.first}-{chunk.first + len(lines) - 1}: parsed {len(df)} "
                            f"records from {len(keep)} lines; a quoted field spans lines (one record per line is required)")
        df.index = pd.Index(keep, name="line")
        return df[needed]

    def _read_parquet(self, chunk: Chunk) -> Iterator[pd.DataFrame]:
        pf = _pyarrow_parquet().ParquetFile(chunk.file)
        first = chunk.first
        for batch in pf.iter_batches(batch_size=self.ts.chunk_rows, row_groups=[chunk.row_group],
                                     columns=self.needed(chunk.role)):
            df = batch.to_pandas()
            df.index = pd.RangeIndex(first, first + len(df), name="row")
            first += len(df)
            yield df

    # ---- splits --------------------------------------------------------------------------
    def split_codes(self, df: pd.DataFrame, chunk: Chunk) -> np.ndarray:
        """0 / 1 / 2 (train / valid / test) for each row of a chunk's frame."""
        if chunk.role != "train":
            return np.full(len(df), SPLITS.index(chunk.role), dtype=np.int8)
        fr = self.ts.fractions()
        if fr["valid"] == 0 and fr["test"] == 0:
            return np.zeros(len(df), dtype=np.int8)
        if self.ts.split_key:
            keys = TabularEncoder._strings(df[self.ts.split_key])
        else:
            # the 0-based data row of the file (CSV and Parquet copies of a table split alike), per file
            keys = np.asarray(df.index, dtype=np.int64) - chunk.row0 + (np.int64(chunk.file_index) << np.int64(40))
        u = _unit_hash(keys, self.ts.split_seed)
        codes = np.zeros(len(df), dtype=np.int8)
        codes[u < fr["valid"] + fr["test"]] = 1
        codes[u < fr["test"]] = 2
        return codes


# ---- one pass over the chunks ---------------------------------------------------------------
def scan_chunks(source: TableSource, encoder: TabularEncoder, chunks: list[Chunk], fit: bool,
                keep_frames: bool = False, progress: bool = True) -> dict[str, list[pd.DataFrame]] | None:
    """Read ``chunks`` once: count each chunk's rows per split (into ``chunk.rows``), check every
    cell, and, if ``fit``, accumulate the train rows into ``encoder`` (``partial_fit``; the caller
    finishes). With ``keep_frames`` the split frames are returned too (the in-memory path)."""
    frames: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    bar = _bar(len(chunks), "reading" if keep_frames else "scanning", progress)
    for chunk in chunks:
        chunk.rows = {s: 0 for s in SPLITS}
        for df in source.read(chunk):
            codes = source.split_codes(df, chunk)
            for k, split in enumerate(SPLITS):
                part = df[codes == k]
                if not len(part):
                    continue
                if fit and split == "train":
                    encoder.partial_fit(part, source=chunk.file)
                else:
                    encoder.validate(part, source=chunk.file)
                chunk.rows[split] += len(part)
                if keep_frames:
                    frames[split].append(part)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return frames if keep_frames else None


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="chunk", leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not sys.stderr.isatty() and not os.environ.get("DTN_FORCE_PROGRESS"))


def load_table(ts: TableSchema, encoder: TabularEncoder | None = None, progress: bool = True) -> SplitData:
    """Read the whole table into memory: split, fit the encoders on the train rows (or reuse
    ``encoder``), encode every split. Same chunks, splits and encoders as the streaming path."""
    source = TableSource(ts)
    chunks = source.chunks()
    enc = encoder if encoder is not None else TabularEncoder(ts.feature_schema())
    parts = scan_chunks(source, enc, chunks, fit=encoder is None, keep_frames=True, progress=progress)
    needed = source.needed("train")
    frames = {s: pd.concat(parts[s]) if parts[s] else pd.DataFrame({c: [] for c in needed}) for s in SPLITS}
    where = {s: ", ".join(getattr(ts, s)) or ", ".join(ts.train) for s in SPLITS}
    if encoder is None:
        if not len(frames["train"]):
            raise DataError(f"{where['train']}: no training rows")
        enc.finish_fit()
    encoded = {s: enc.transform(frames[s], where[s]) if len(frames[s]) else _empty(enc) for s in SPLITS}
    return SplitData(enc.schema, enc, encoded["train"], encoded["valid"], encoded["test"], frames, source_fingerprint(ts))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(ts: TableSchema) -> dict:
    """Where a table's rows come from: every file's SHA-256 and size (by role and position, so a moved
    copy matches) and the digest of the schema's settings (labels, features, split, CSV options)."""
    from ..train.checkpoint import digest

    files = [{"role": role, "index": i, "path": p, "sha256": file_sha256(p), "bytes": os.path.getsize(p)}
             for role in SPLITS for i, p in enumerate(getattr(ts, role))]
    settings = {k: v for k, v in ts.to_dict().items() if k not in ("train", "valid", "test", "path", "chunk_rows")}
    return {"dataset": "table", "files": files, "params": {"data schema": digest(settings)}}


def _empty(enc: TabularEncoder) -> EncodedData:
    s = enc.schema
    multi = [JaggedField(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                         torch.zeros(0) if f.weighted else None) for f in s.multi]
    return EncodedData(torch.zeros(0, len(s.categorical), dtype=torch.long), torch.zeros(0, len(s.numeric)), multi,
                       torch.zeros(0, len(s.labels)))


__all__ = ["SchemaError", "TableSchema", "TableSource", "Chunk", "expand_columns", "table_schema_from_dict",
           "find_table_schema", "load_table_schema", "load_table", "scan_chunks", "SPLITS", "source_fingerprint"]
