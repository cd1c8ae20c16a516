"""Reading a table's files in chunks: :class:`TableSource` indexes the CSV and Parquet files of a
:class:`dtn.data.table_schema.TableSchema` into :class:`Chunk` s (CSV: blocks of ``chunk_rows``
lines, one record per line; Parquet: row groups) and reads them as DataFrames of the needed
columns, and assigns each row its split (a seeded hash of ``split.key`` or of the row position).
Errors name the file, the line and the column.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd

from .encoders import DataError, TabularEncoder
from .table_schema import SPLITS, SchemaError, TableSchema

COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zip": "zip"}


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
