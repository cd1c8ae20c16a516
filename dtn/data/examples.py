"""Generated tables in the layouts of two public multi-task data sets, for tests, docs and demos.

* AliExpress (AITM / MTReclib release): ``search_id, categorical_1..16, numerical_1..63,
  click, conversion``; rows of one search share ``search_id`` and ``categorical_1`` (the query).
* Ali-CCP (ESMM release, as flattened by common preprocessing): the labels ``click, purchase``
  first, then sparse id columns (``101``, ``121``, ... ``301``), multi-valued ``id:weight``
  columns (``109_14``, ``110_14``, ``127_14``, ``150_14``) and dense columns (``D109_14`` ...).

Both have planted signal: clicks depend on some features, conversions (only ever on clicked
rows, as in the real data) on others, so a trained model beats AUC 0.5 on both tasks. The
matching data schemas are ``dtn/configs/schemas/aliexpress.yaml`` and ``ali_ccp.yaml``.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

LAYOUTS = ("aliexpress", "ali_ccp")
ALI_CCP_SPARSE = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216",
                  "508", "509", "702", "853", "301"]
ALI_CCP_MULTI = ["109_14", "110_14", "127_14", "150_14"]
ALI_CCP_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_ids(rng, n: int, card: int) -> np.ndarray:
    p = 1.0 / np.arange(1, card + 1) ** 1.1
    return rng.choice(card, size=n, p=p / p.sum())


def make_aliexpress_frame(n: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=n)  # rows per search
    search = np.repeat(np.arange(len(sizes)), sizes)[:n]
    cards = [40, 5, 8, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 60, 7, 4, 2]
    cols: dict[str, np.ndarray] = {"search_id": 100_000 + search}
    query = _zipf_ids(rng, int(search[-1]) + 1, cards[0])
    cols["categorical_1"] = query[search]
    for k, card in enumerate(cards[1:], start=2):
        cols[f"categorical_{k}"] = _zipf_ids(rng, n, card)
    for k in range(1, 64):
        x = rng.normal(size=n) if k % 3 else rng.lognormal(0.0, 1.0, size=n)
        cols[f"numerical_{k}"] = np.round(x, 6)
    df = pd.DataFrame(cols)
    eff = {c: rng.normal(0, 1.0, cards[i]) for i, c in enumerate(["categorical_1", "categorical_2", "categorical_3"])}
    inter = np.where(df.categorical_14.to_numpy() % 2 == 0, 1.0, -1.0) * np.sign(df.numerical_4.to_numpy())
    click_logit = (-1.0 + eff["categorical_1"][df.categorical_1] + eff["categorical_2"][df.categorical_2]
                   + 0.9 * df.numerical_1 - 0.7 * df.numerical_2 + 0.8 * inter)
    conv_logit = (-0.8 + 1.2 * eff["categorical_3"][df.categorical_3] + 1.0 * df.numerical_5
                  + 0.6 * (df.categorical_15.to_numpy() == 0))
    click = rng.random(n) < _sigmoid(click_logit)
    conversion = click & (rng.random(n) < _sigmoid(conv_logit))
    df["click"] = click.astype(np.int64)
    df["conversion"] = conversion.astype(np.int64)
    return df


def _weighted_bags(rng, n: int, card: int, max_len: int) -> tuple[list[str], np.ndarray]:
    """'id:weight|id:weight' cells and, per row, the weighted count of ids below card // 10."""
    lens = rng.integers(0, max_len + 1, size=n)
    cells, score = [], np.zeros(n)
    for r, k in enumerate(lens):
        ids = _zipf_ids(rng, int(k), card)
        w = np.round(rng.uniform(0.1, 3.0, size=int(k)), 3)
        cells.append("|".join(f"{i}:{x:g}" for i, x in zip(ids, w)))
        score[r] = float(w[ids < card // 10].sum())
    return cells, score


def make_ali_ccp_frame(n: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    base = rng.integers(10_000, 900_000, size=len(ALI_CCP_SPARSE))  # ids look like the hashed ids of the real data
    cards = [200, 50, 10, 30, 5, 8, 6, 4, 3, 2000, 800, 1500, 300, 100, 400, 60, 1000, 30, 3]
    sparse = {}
    for c, b, card in zip(ALI_CCP_SPARSE, base, cards):
        sparse[c] = _zipf_ids(rng, n, card)
        cols[c] = b + sparse[c]
    scores = {}
    for j, c in enumerate(ALI_CCP_MULTI):
        cols[c], scores[c] = _weighted_bags(rng, n, 200 + 100 * j, 4)
    for c in ALI_CCP_DENSE:
        cols[c] = np.round(rng.lognormal(0.0, 1.0, size=n), 5)
    eff101 = rng.normal(0, 1.0, cards[0])
    eff205 = rng.normal(0, 1.0, cards[9])
    eff206 = rng.normal(0, 1.2, cards[10])
    click_logit = (-0.9 + eff101[sparse["101"]] + eff205[sparse["205"]] + 0.5 * scores["109_14"]
                   + 0.6 * np.log1p(cols["D109_14"]))
    buy_logit = -0.6 + eff206[sparse["206"]] + 0.7 * scores["110_14"] - 0.8 * np.log1p(cols["D508"])
    click = rng.random(n) < _sigmoid(click_logit)
    purchase = click & (rng.random(n) < _sigmoid(buy_logit))
    out = pd.DataFrame({"click": click.astype(np.int64), "purchase": purchase.astype(np.int64)})
    return pd.concat([out, pd.DataFrame(cols)], axis=1)


def make_example_frame(layout: str, n: int = 20_000, seed: int = 0) -> pd.DataFrame:
    if layout == "aliexpress":
        return make_aliexpress_frame(n, seed)
    if layout == "ali_ccp":
        return make_ali_ccp_frame(n, seed)
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def write_table(df: pd.DataFrame, path: str, row_group_rows: int | None = None) -> str:
    """Write ``df`` as CSV or Parquet (by the extension); Parquet in row groups of ``row_group_rows``. The file
    is written atomically: a failed write leaves a file already there as it was."""
    from ..train.checkpoint import atomic_write

    if path.lower().endswith((".parquet", ".pq")):
        from .table_reader import _pyarrow_parquet

        pq = _pyarrow_parquet()
        import pyarrow as pa

        buf = io.BytesIO()  # pyarrow writes to a real file object; the bytes then go in one atomic write
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, row_group_size=row_group_rows or 64 * 1024)
        atomic_write(path, lambda fh: fh.write(buf.getvalue()))
    else:
        atomic_write(path, lambda fh: fh.write(df.to_csv(index=False).encode("utf-8")))
    return path


__all__ = ["LAYOUTS", "make_aliexpress_frame", "make_ali_ccp_frame", "make_example_frame", "write_table"]
