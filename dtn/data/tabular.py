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

The jobs, one module each: the schema is parsed and checked in :mod:`dtn.data.table_schema`,
the files are read in :mod:`dtn.data.table_reader`, and this module loads the table (one pass
over the chunks, the in-memory split data, the source fingerprint); the names of all three
can be imported from here.
"""
from __future__ import annotations

import hashlib
import os
import sys

import pandas as pd
import torch

from ..features import JaggedField
from .encoders import DataError, EncodedData, SplitData, TabularEncoder
from .table_reader import COMPRESSED, Chunk, TableSource, first_sentence  # noqa: F401  (also imported from here)
from .table_schema import (FORMATS, SCHEMA_DIR, SPLITS, SchemaError, TableSchema, expand_columns,  # noqa: F401
                           find_table_schema, load_table_schema, table_schema_from_dict)


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
