"""A synthetic two-task data set with planted structure, for tests and demos.

Features (all known to drive exactly what their name says):
* ``t1_cat``, ``t1_num``   drive only task 1;
* ``t2_cat``, ``t2_num``   drive only task 2;
* ``both_cat``, ``both_num`` drive both tasks;
* ``x1_a`` x ``x1_b``      a pairwise interaction (XOR of two categoricals) that drives only task 1;
* ``x2_a`` x ``x2_b``      an interaction (categorical x numeric sign) that drives only task 2;
* ``noise_cat``, ``noise_num``, ``tags`` (multi-valued) drive nothing.
"""
from __future__ import annotations


import numpy as np
import pandas as pd

from ..features import FeatureSpec, Schema
from .encoders import SplitData, TabularEncoder

PLANTED = {
    "task1": ["t1_cat", "t1_num", "x1_a", "x1_b"],
    "task2": ["t2_cat", "t2_num", "x2_a", "x2_b"],
    "both": ["both_cat", "both_num"],
    "noise": ["noise_cat", "noise_num", "tags"],
}


def synthetic_schema() -> Schema:
    cats = ["t1_cat", "t2_cat", "both_cat", "x1_a", "x1_b", "x2_a", "noise_cat"]
    nums = ["t1_num", "t2_num", "both_num", "x2_b", "noise_num"]
    feats = [FeatureSpec(c) for c in cats] + [FeatureSpec("tags", kind="multi")] + \
            [FeatureSpec(c, kind="numeric") for c in nums]
    return Schema(feats, labels=["task1", "task2"])


def make_synthetic_frame(n: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    card = 20
    df = pd.DataFrame({
        "t1_cat": rng.integers(0, card, n), "t2_cat": rng.integers(0, card, n), "both_cat": rng.integers(0, card, n),
        "x1_a": rng.integers(0, 2, n), "x1_b": rng.integers(0, 2, n), "x2_a": rng.integers(0, 4, n),
        "noise_cat": rng.integers(0, card, n),
        "t1_num": rng.normal(size=n), "t2_num": rng.normal(size=n), "both_num": rng.normal(size=n),
        "x2_b": rng.normal(size=n), "noise_num": rng.normal(size=n),
    })
    eff = {c: rng.normal(0, 1.5, card) for c in ("t1_cat", "t2_cat", "both_cat")}
    xor = np.where(df.x1_a.to_numpy() ^ df.x1_b.to_numpy(), 1.5, -1.5)
    inter2 = np.where(df.x2_a.to_numpy() % 2 == 0, 1.0, -1.0) * np.sign(df.x2_b.to_numpy()) * 1.5
    both = eff["both_cat"][df.both_cat] + 1.0 * df.both_num
    logit1 = eff["t1_cat"][df.t1_cat] + 1.5 * df.t1_num + xor + both
    logit2 = eff["t2_cat"][df.t2_cat] - 1.5 * df.t2_num + inter2 + both
    df["task1"] = (rng.random(n) < 1 / (1 + np.exp(-logit1))).astype(np.float32)
    df["task2"] = (rng.random(n) < 1 / (1 + np.exp(-logit2))).astype(np.float32)
    lens = rng.integers(0, 4, n)
    df["tags"] = ["|".join(str(t) for t in rng.integers(0, 30, k)) for k in lens]
    return df


SyntheticData = SplitData  # train / valid / test of the protocol


def make_synthetic(n: int = 20_000, seed: int = 0, encoder: TabularEncoder | None = None) -> SyntheticData:
    """Frames split 80/10/10, encoders fitted on the train part (or ``encoder`` reused)."""
    df = make_synthetic_frame(n, seed)
    a, b = int(0.8 * n), int(0.9 * n)
    frames = {"train": df.iloc[:a].reset_index(drop=True), "valid": df.iloc[a:b].reset_index(drop=True),
              "test": df.iloc[b:].reset_index(drop=True)}
    enc = encoder or TabularEncoder(synthetic_schema()).fit(frames["train"], "synthetic train")
    schema = enc.schema
    return SyntheticData(schema, enc, *(enc.transform(frames[k], f"synthetic {k}") for k in ("train", "valid", "test")),
                         frames=frames, fingerprint={"dataset": "synthetic", "files": [], "params": {"rows": n, "seed": seed}})
