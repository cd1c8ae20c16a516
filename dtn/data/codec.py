"""Encoding primitives shared by the training encoders and the exported predictor.

:class:`dtn.data.encoders.TabularEncoder` (pandas, training) and the ``predict.py`` of a
``dtn export`` artifact (no ``dtn``, no pandas needed) both turn raw cells into model inputs
with these functions, so a served row is encoded exactly as it was in training. The module
imports numpy only; ``dtn export`` copies this file verbatim into the artifact as
``dtn_codec.py``.

* :func:`canonical_strings` — the string a categorical / multi-valued cell is looked up by;
* :func:`split_multi`       — "a|b|c" or "a:0.5|b:2" cells into ids (and weights);
* :func:`split_weight_column` — a parallel weight column ("0.5|2") checked against its ids;
* :func:`parse_floats`      — numbers from raw cells, with the position of the first bad one;
* :func:`pre_transform`, :func:`scale` — the numeric transform, then standardisation;
* :func:`bucketize`         — a numeric value into its train-quantile bucket id;
* :func:`lookup`            — strings to vocabulary ids (0 = out of vocabulary);
* :func:`hash_buckets`      — strings to hashed ids in [0, N) (a ``hash_buckets: N`` feature): the
  32-bit MurmurHash3 (x86_32) of the string's UTF-8 bytes, seeded, modulo N. Its finaliser
  :func:`fmix32` is the one of :mod:`dtn_kernels.hashing` (bit-identical; tested), written again
  here in numpy because the exported predictor must not import ``dtn_kernels``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["canonical_cell", "canonical_strings", "split_multi", "parse_weights", "split_weight_column", "parse_floats", "pre_transform",
           "scale", "bucketize", "lookup", "FLOAT32_MAX", "first_outside_float32", "fmix32", "murmur3_32",
           "murmur3_32_strings", "hash_buckets"]

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model computes in float32: larger values would become inf


def first_outside_float32(x: np.ndarray) -> int:
    """Position of the first finite value whose magnitude exceeds the float32 range, or -1."""
    with np.errstate(invalid="ignore"):
        big = np.abs(np.asarray(x, dtype=np.float64)) > FLOAT32_MAX
    return int(np.argmax(big)) if big.any() else -1


def canonical_cell(v) -> str:
    """One raw cell as its vocabulary key: a string as is; None / NaN -> ""; True / False ->
    "True" / "False"; an integer or an integral float -> its decimal integer ("3", never "3.0");
    any other float -> its shortest round-trip repr ("0.25")."""
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if math.isnan(x):
            return ""
        if math.isfinite(x) and x == math.floor(x) and abs(x) < 2.0**63:
            return str(int(x))
        return repr(x)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return str(v)


def canonical_strings(values) -> np.ndarray:
    """:func:`canonical_cell` of every cell, as an object array (vectorised for numeric arrays)."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    arr = arr.ravel()
    kind = arr.dtype.kind
    if kind in "iu":
        return arr.astype(str).astype(object)
    if kind == "b":
        return np.where(arr, "True", "False").astype(object)
    if kind == "U":
        return arr.astype(object)
    if kind == "f":
        x = arr.astype(np.float64)
        out = np.empty(x.shape, dtype=object)
        nan = np.isnan(x)
        with np.errstate(invalid="ignore"):
            integral = ~nan & np.isfinite(x) & (x == np.floor(x)) & (np.abs(x) < 2.0**63)
        out[integral] = x[integral].astype(np.int64).astype(str).astype(object)
        other = ~nan & ~integral
        out[other] = [repr(float(v)) for v in x[other]]
        out[nan] = ""
        return out
    out = np.empty(arr.shape, dtype=object)
    out[:] = [canonical_cell(v) for v in arr]
    return out


def parse_weights(tokens: list[str]) -> tuple[np.ndarray, int]:
    """Floats from weight strings; (weights, index of the first unparsable, non-finite or beyond-float32 one, or -1)."""
    out = np.empty(len(tokens), dtype=np.float64)
    for i, t in enumerate(tokens):
        try:
            out[i] = float(t)
        except ValueError:
            return out, i
        if not math.isfinite(out[i]) or abs(out[i]) > FLOAT32_MAX:
            return out, i
    return out, -1


def split_multi(cells, delimiter: str, weight_separator: Optional[str] = None):
    """Multi-valued cells (canonical strings) -> (ids, lengths, weights, bad).

    ``ids``: every id as a string, cell after cell; ``lengths``: int64 [rows], ids per cell;
    ``weights``: float64 [len(ids)] when ``weight_separator`` is set (a token without the
    separator weighs 1.0), else None. Tokens are stripped and empty ones dropped, so "" is an
    empty bag. ``bad`` is None, or (row, token) for the first token whose weight is not a
    finite number.
    """
    ids: list[str] = []
    lengths = np.zeros(len(cells), dtype=np.int64)
    wtok: list[str] = []
    for r, cell in enumerate(cells):
        cell = cell.strip()
        if not cell:
            continue
        toks = [t.strip() for t in cell.split(delimiter)]
        toks = [t for t in toks if t]
        if weight_separator is not None:
            for t in toks:
                key, sep, w = t.rpartition(weight_separator)
                if sep:
                    ids.append(key.strip())
                    wtok.append(w.strip())
                else:
                    ids.append(t)
                    wtok.append("1")
        else:
            ids.extend(toks)
        lengths[r] = len(toks)
    if weight_separator is None:
        return ids, lengths, None, None
    weights, bad = parse_weights(wtok)
    if bad >= 0:
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        return ids, lengths, weights, (row, ids[bad] + weight_separator + wtok[bad])
    return ids, lengths, weights, None


def split_weight_column(cells, delimiter: str, lengths: np.ndarray):
    """The weights of a parallel weight column (canonical strings, one cell per row, tokens split like
    :func:`split_multi`) for bags of ``lengths`` ids -> (weights, problem).

    ``weights``: float64 [sum(lengths)]; ``problem`` is None, ``("count", row, n)`` for the first row
    whose cell holds ``n`` weights for another number of ids, or ``("value", row, token)`` for the
    first weight that is not a finite number within the float32 range.
    """
    wtoks, wlens, _, _ = split_multi(cells, delimiter)
    diff = np.flatnonzero(wlens != lengths)
    if diff.size:
        row = int(diff[0])
        return None, ("count", row, int(wlens[row]))
    weights, k = parse_weights(wtoks)
    if k >= 0:
        return weights, ("value", int(np.searchsorted(np.cumsum(wlens), k, side="right")), wtoks[k])
    return weights, None


def parse_floats(values) -> tuple[np.ndarray, int]:
    """float64 values of raw cells (numbers or numeric strings; None and "" are not numbers) and
    the position of the first cell that is not a finite number within the float32 range, or -1."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    arr = arr.ravel()
    if arr.dtype.kind in "iufb":
        x = arr.astype(np.float64)
    else:
        x = np.empty(arr.shape, dtype=np.float64)
        for i, v in enumerate(arr):
            try:
                x[i] = float(v.strip() if isinstance(v, str) else v)
            except (TypeError, ValueError):
                return x, i
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(x) | (np.abs(x) > FLOAT32_MAX)
    return x, (int(np.argmax(bad)) if bad.any() else -1)


def pre_transform(x: np.ndarray, transform: str) -> np.ndarray:
    """The transform applied before statistics: "log1p" is a sign-preserving log1p, others none."""
    if transform == "log1p":
        return np.sign(x) * np.log1p(np.abs(x))
    return x


def scale(x: np.ndarray, shift: float, div: float) -> np.ndarray:
    """(x - shift) / div, the fitted standardisation (z-score, min-max or identity)."""
    return (x - shift) / div


def bucketize(x: np.ndarray, edges) -> np.ndarray:
    """Bucket ids 1..len(edges)+1 of ``x`` between the train-quantile ``edges`` (0 stays OOV)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right").astype(np.int64) + 1


def lookup(strings, vocab: dict) -> np.ndarray:
    """Vocabulary ids of strings; a string not in ``vocab`` gets the out-of-vocabulary id 0."""
    get = vocab.get
    return np.fromiter((get(s, 0) for s in strings), dtype=np.int64, count=len(strings))


# ---- hashed ids ------------------------------------------------------------------------------
# MurmurHash3_x86_32 (Austin Appleby's public-domain algorithm). numpy uint32 arithmetic wraps mod
# 2**32, which is the arithmetic the algorithm is defined in.
_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser on uint32 values (the twin of ``dtn_kernels.hashing.fmix32``)."""
    h = np.asarray(h, dtype=np.uint32)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _mix_block(k: np.ndarray) -> np.ndarray:
    return _rotl(k * _C1, 15) * _C2


def murmur3_32_strings(strings, seed: int = 0) -> np.ndarray:
    """MurmurHash3_x86_32 of every string's UTF-8 bytes (or of bytes values) with ``seed`` (uint32 [n]),
    vectorised over the strings: one numpy pass per 4-byte block position, over the strings that long."""
    encoded = [s if isinstance(s, bytes) else s.encode("utf-8") for s in strings]
    n = len(encoded)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    buf = np.frombuffer(b"".join(encoded) + b"\0\0\0\0", dtype=np.uint8).astype(np.uint32)
    starts = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    blocks = lengths // 4
    order = np.argsort(-blocks, kind="stable")  # the longest first: the rows still hashing are a prefix
    sb, ss = blocks[order], starts[order]
    h = np.full(n, seed & 0xFFFFFFFF, dtype=np.uint32)
    for k in range(int(sb[0]) if n else 0):
        m = int(np.searchsorted(-sb, -k, side="left"))  # rows with more than k blocks
        p = ss[:m] + 4 * k
        word = buf[p] | (buf[p + 1] << np.uint32(8)) | (buf[p + 2] << np.uint32(16)) | (buf[p + 3] << np.uint32(24))
        x = h[:m] ^ _mix_block(word)
        h[:m] = _rotl(x, 13) * np.uint32(5) + np.uint32(0xE6546B64)
    out = np.empty(n, dtype=np.uint32)
    out[order] = h
    tail_at = starts + 4 * blocks
    rem = lengths & 3
    zero = np.uint32(0)
    k1 = (np.where(rem >= 3, buf[tail_at + 2] << np.uint32(16), zero)
          ^ np.where(rem >= 2, buf[tail_at + 1] << np.uint32(8), zero) ^ np.where(rem >= 1, buf[tail_at], zero))
    out ^= _mix_block(k1.astype(np.uint32))  # 0 when there is no tail
    out ^= lengths.astype(np.uint32)
    return fmix32(out)


def murmur3_32(data, seed: int = 0) -> int:
    """MurmurHash3_x86_32 of one string (its UTF-8 bytes) or bytes value."""
    return int(murmur3_32_strings([data], seed)[0])


def hash_buckets(strings, num_buckets: int, seed: int = 0) -> np.ndarray:
    """Hashed ids in [0, ``num_buckets``) of canonical strings: ``murmur3_32(utf-8, seed) % num_buckets``.
    There is no out-of-vocabulary id: every value, seen in training or not, lands in one of the rows."""
    if not len(strings):
        return np.zeros(0, dtype=np.int64)
    return (murmur3_32_strings(strings, seed) % np.uint32(num_buckets)).astype(np.int64)
