"""Predict with a ``dtn export`` artifact: raw rows in, per-task probabilities out.

This file is copied into every artifact next to ``model.pt2`` (the torch.export program),
``encoders.json`` (the fitted feature encoders), ``meta.json`` and ``dtn_codec.py`` (the
encoding primitives training used). It needs torch and numpy only (pandas is optional, for
DataFrame input) and never imports the ``dtn`` training code.

Command line (from the artifact folder, or with ``--artifact DIR``)::

    python predict.py rows.csv --out predictions.csv

Python::

    import sys; sys.path.insert(0, "model_dir")
    from predict import Predictor
    p = Predictor("model_dir")
    probs = p.predict([{"categorical_1": "3", "numerical_1": 0.25, ...}])  # ndarray [rows, tasks]
    p.tasks                                                                # column order of probs

Rows may be a list of dicts, a dict of columns, a pandas DataFrame or a CSV path; extra
columns are ignored, a missing one is an error naming it. A CSV file is checked as training
checks it: UTF-8 text, and every line with as many fields as the header. Cells are encoded
exactly as in training: categorical values by their string (an integer 3 and the text "3"
are the same value; unseen values get the out-of-vocabulary id, or, for a feature with
``hash_buckets``, their hashed id as in training), numbers parsed and scaled
with the training statistics (a value that is not a finite number within the float32 range
of the model is an error naming the row, column and value), multi-valued cells split on the
training delimiter.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

import numpy as np
import torch


def _load_codec():
    """The encoding primitives: dtn.data.codec inside the package, else the dtn_codec.py next to this
    file (an artifact), loaded by path so that neither sys.path nor the working directory matter."""
    if __package__:
        from ..data import codec

        return codec
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dtn_codec.py")
    spec = importlib.util.spec_from_file_location("dtn_codec", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dtn_codec", module)
    spec.loader.exec_module(module)
    return module


codec = _load_codec()

FORMAT = "dtn-export/1"


class InputError(ValueError):
    """A raw row that cannot be encoded; the message names the row, the column and the value."""


def _column_arrays(rows, needed: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Object arrays of the ``needed`` columns of ``rows`` (list of dicts, dict of columns, DataFrame, CSV path)."""
    if isinstance(rows, (str, os.PathLike)):
        rows = _read_csv(os.fspath(rows))
    if hasattr(rows, "columns") and hasattr(rows, "to_numpy"):  # a pandas DataFrame
        missing = [c for c in needed if c not in rows.columns]
        if missing:
            raise InputError(f"missing column(s) {missing}")
        cols = {}
        for c in needed:
            col = rows[c]
            native = isinstance(col.dtype, np.dtype) and col.dtype.kind in "iufb"
            cols[c] = col.to_numpy() if native else col.to_numpy(dtype=object, na_value=None)
        return cols, len(rows)
    if isinstance(rows, dict):
        missing = [c for c in needed if c not in rows]
        if missing:
            raise InputError(f"missing column(s) {missing}")
        cols = {c: np.asarray(list(rows[c]), dtype=object) for c in needed}
        sizes = {len(v) for v in cols.values()}
        if len(sizes) > 1:
            raise InputError(f"columns have different lengths {sorted(sizes)}")
        return cols, sizes.pop() if sizes else 0
    rows = list(rows)
    for i, r in enumerate(rows):
        missing = [c for c in needed if c not in r]
        if missing:
            raise InputError(f"row {i}: missing column(s) {missing}")
    cols = {}
    for c in needed:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[c] for r in rows]
        cols[c] = arr
    return cols, len(rows)


def _read_csv(path: str) -> list[dict]:
    """The rows of a CSV file with a header; a line whose field count differs from the header's, or
    text that is not UTF-8, is an InputError naming the file and line (as in training)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") \
            from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise InputError(f"{path}: the file is empty (expected a header line naming the columns)")
    header = [c.strip() for c in header]
    rows = []
    for i, cells in enumerate(reader, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            extra = f"field {len(header) + 1} {cells[len(header)]!r} has no column" if len(cells) > len(header) else \
                f"column {header[len(cells)]!r} and after are missing"
            raise InputError(f"{path}: line {i}: {len(cells)} fields, expected {len(header)}: {extra}")
        rows.append(dict(zip(header, cells)))
    return rows


class Predictor:
    """An exported model with its encoders. ``predict(rows)`` -> probabilities [rows, tasks]."""

    def __init__(self, artifact_dir: str | None = None):
        self.dir = artifact_dir or os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(self.dir, "meta.json")) as fh:
            self.meta = json.load(fh)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.dir}: not a {FORMAT} artifact (meta.json format {self.meta.get('format')!r})")
        with open(os.path.join(self.dir, "encoders.json")) as fh:
            self.encoders = json.load(fh)
        self.program = torch.export.load(os.path.join(self.dir, "model.pt2")).module()
        self.tasks: list[str] = list(self.meta["tasks"])
        feats = self.encoders["schema"]["features"]
        self.categorical = [f for f in feats if f["kind"] == "categorical"]
        self.numeric = [f for f in feats if f["kind"] == "numeric"]
        self.multi = [f for f in feats if f["kind"] == "multi"]
        self.min_batch = int(self.meta.get("min_batch", 1))

    @staticmethod
    def _source(f: dict) -> str:
        return f.get("column") or f["name"]

    @property
    def columns(self) -> list[str]:
        """The raw columns a row needs."""
        cols = [self._source(f) for f in self.categorical + self.multi + self.numeric]
        cols += [f["weight_column"] for f in self.multi if f.get("weight_column")]
        return list(dict.fromkeys(cols))

    def _floats(self, values: np.ndarray, f: dict, start: int) -> np.ndarray:
        x, bad = codec.parse_floats(values)
        if bad >= 0:
            raise InputError(f"row {start + bad}, column {self._source(f)!r}: value {values[bad]!r} is not a finite "
                             f"number within the float32 range of the model (feature {f['name']!r} is {f['kind']})")
        return x

    def _ids(self, f: dict, strings) -> np.ndarray:
        """Ids of canonical strings: hashed (a feature with hash_buckets) or looked up in the vocabulary."""
        if f.get("hash_buckets"):
            return codec.hash_buckets(strings, f["hash_buckets"], f.get("hash_seed", 0))
        return codec.lookup(strings, self.encoders["vocab"][f["name"]])

    def encode(self, rows, start: int = 0) -> list[torch.Tensor]:
        """The model's input tensors for raw ``rows`` (``start`` numbers the rows in error messages)."""
        cols, n = _column_arrays(rows, self.columns)
        enc = self.encoders
        cat = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, f in enumerate(self.categorical):
            v = cols[self._source(f)]
            if f.get("bins"):
                cat[:, j] = codec.bucketize(self._floats(v, f, start), enc["edges"][f["name"]])
            else:
                cat[:, j] = self._ids(f, codec.canonical_strings(v))
        num = np.zeros((n, len(self.numeric)), dtype=np.float64)
        for j, f in enumerate(self.numeric):
            x = codec.pre_transform(self._floats(cols[self._source(f)], f, start), f["transform"])
            num[:, j] = codec.scale(x, *enc["stats"][f["name"]])
            bad = codec.first_outside_float32(num[:, j])
            if bad >= 0:
                raise InputError(f"row {start + bad}, column {self._source(f)!r}: value {cols[self._source(f)][bad]!r} "
                                 f"scales to {num[bad, j]:.6g} with the training statistics, outside the float32 range")
        inputs = [torch.from_numpy(cat), torch.from_numpy(num.astype(np.float32))]
        for f in self.multi:
            cells = codec.canonical_strings(cols[self._source(f)])
            ids, lengths, weights, bad = codec.split_multi(cells, f["delimiter"], f.get("weight_separator"))
            if bad is not None:
                raise InputError(f"row {start + bad[0]}, column {self._source(f)!r}: token {bad[1]!r} has a weight "
                                 "that is not a finite number")
            if f.get("weight_column"):
                wcells = codec.canonical_strings(cols[f["weight_column"]])
                weights, problem = codec.split_weight_column(wcells, f["delimiter"], lengths)
                if problem is not None:
                    kind, r, what = problem
                    where = f"row {start + r}, column {f['weight_column']!r}"
                    if kind == "count":
                        raise InputError(f"{where}: {what} weights for {int(lengths[r])} ids of feature {f['name']!r}")
                    raise InputError(f"{where}: weight {what!r} is not a finite number")
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            inputs += [torch.from_numpy(self._ids(f, ids)), torch.from_numpy(offsets)]
            if f.get("weight_separator") or f.get("weight_column"):
                inputs.append(torch.from_numpy(weights.astype(np.float32)))
        return inputs

    @torch.no_grad()
    def _run(self, inputs: list[torch.Tensor], n: int) -> np.ndarray:
        if n < self.min_batch:  # the program was exported for batches of at least min_batch rows: pad, then drop
            reps = self.min_batch - n + 1
            inputs = self._repeat_first(inputs, reps)
            return self.program(*inputs)[:n].numpy()
        return self.program(*inputs).numpy()

    def _repeat_first(self, inputs, reps: int):
        """The inputs with row 0 added ``reps - 1`` more times at the end."""
        cat, num = inputs[0], inputs[1]
        out = [torch.cat([cat] + [cat[:1]] * (reps - 1)), torch.cat([num] + [num[:1]] * (reps - 1))]
        i = 2
        for f in self.multi:
            values, offsets = inputs[i], inputs[i + 1]
            k = int(offsets[1])
            first = values[:k]
            ends = offsets[-1] + k * torch.arange(1, reps, dtype=offsets.dtype)
            out += [torch.cat([values] + [first] * (reps - 1)), torch.cat([offsets, ends])]
            i += 2
            if f.get("weight_separator") or f.get("weight_column"):
                out.append(torch.cat([inputs[i]] + [inputs[i][:k]] * (reps - 1)))
                i += 1
        return out

    def predict(self, rows, batch_size: int = 8192) -> np.ndarray:
        """Probabilities [rows, tasks] (columns in the order of ``self.tasks``)."""
        cols, n = _column_arrays(rows, self.columns)
        if n == 0:
            return np.zeros((0, len(self.tasks)), dtype=np.float32)
        out = []
        for s in range(0, n, batch_size):
            part = {c: v[s:s + batch_size] for c, v in cols.items()}
            m = min(batch_size, n - s)
            out.append(self._run(self.encode(part, start=s), m))
        return np.concatenate(out)

    def predict_dict(self, rows, batch_size: int = 8192) -> dict[str, np.ndarray]:
        p = self.predict(rows, batch_size)
        return {t: p[:, i] for i, t in enumerate(self.tasks)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Per-task probabilities for the rows of a CSV file.")
    ap.add_argument("rows", help="CSV file with a header naming the columns")
    ap.add_argument("--artifact", help="the exported model folder [this file's folder]")
    ap.add_argument("--out", help="write predictions here as CSV [stdout]")
    ap.add_argument("--batch-size", type=int, default=8192)
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        print(f"predict: --batch-size {args.batch_size}: allowed: an integer >= 1", file=sys.stderr)
        return 2
    try:
        p = Predictor(args.artifact)
        probs = p.predict(args.rows, args.batch_size)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(p.tasks)
        w.writerows([[f"{v:.8g}" for v in row] for row in probs])
        text = buf.getvalue()
        if args.out:
            _write_atomic(args.out, text)
        else:
            sys.stdout.write(text)
    except (InputError, OSError, ValueError, KeyError, RuntimeError) as exc:
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"predict: {where}{' '.join(msg.split())}", file=sys.stderr)
        return 2
    return 0


def _write_atomic(path: str, text: str) -> None:
    """Write via a temp file and a rename: a failed write leaves no partial file and an older one intact."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":
    sys.exit(main())
