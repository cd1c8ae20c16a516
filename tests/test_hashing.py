"""Hashed features (``hash_buckets: N``): murmur3 against published values and an independent scalar
version, the codec's finaliser bit-identical to dtn_kernels', the schema's checks, and a vocabulary
larger than its table through training, streaming, evaluation and the exported predictor."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dtn.cli import main
from dtn.data import codec
from dtn.data.encoders import TabularEncoder
from dtn.data.tabular import SchemaError, load_table, load_table_schema, table_schema_from_dict
from dtn.features import FeatureSpec, Schema
from dtn.train import model_from_checkpoint
from owndata import SMALL_CLI

# MurmurHash3_x86_32 values published with the reference implementation's users (string, seed, hash)
VECTORS = [("", 0, 0), ("", 1, 0x514E28B7), ("", 0xFFFFFFFF, 0x81F16F39), ("a", 0x9747B28C, 0x7FA09EA6),
           ("ab", 0x9747B28C, 0x74875592), ("abc", 0x9747B28C, 0xC84A62DD), ("abcd", 0x9747B28C, 0xF0478627),
           ("aaaa", 0x9747B28C, 0x5A97808A), ("Hello, world!", 0x9747B28C, 0x24884CBA),
           ("The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD)]


def scalar_murmur3(data: bytes, seed: int) -> int:
    """MurmurHash3_x86_32, one byte string at a time in Python ints: the oracle of the vectorised codec."""
    m = 0xFFFFFFFF

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & m

    def mix(k):
        return (rotl((k * 0xCC9E2D51) & m, 15) * 0x1B873593) & m

    h = seed & m
    n = len(data) // 4
    for i in range(n):
        h = rotl(h ^ mix(int.from_bytes(data[4 * i:4 * i + 4], "little")), 13)
        h = (h * 5 + 0xE6546B64) & m
    tail = data[4 * n:]
    if tail:
        h ^= mix(int.from_bytes(tail, "little"))
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


@pytest.mark.parametrize("text, seed, want", VECTORS)
def test_murmur3_published_values(text, seed, want):
    assert codec.murmur3_32(text, seed) == want
    assert scalar_murmur3(text.encode(), seed) == want


def test_vectorised_murmur3_equals_the_scalar_one():
    rng = random.Random(0)
    alphabet = "abcxyz0123456789-_ äéπ≈漢字\U0001F600"
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(2000)]
    strings += ["", "a" * 1000]  # empty, and one much longer than the rest
    for seed in (0, 1, 0xDEADBEEF):
        got = codec.murmur3_32_strings(strings, seed)
        assert got.dtype == np.uint32
        assert got.tolist() == [scalar_murmur3(s.encode(), seed) for s in strings]


def test_codec_fmix32_is_bit_identical_to_dtn_kernels():
    from dtn_kernels.hashing import fmix32

    x = np.random.default_rng(0).integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    x[:4] = [0, 1, 2**31, 2**32 - 1]
    want = fmix32(torch.from_numpy(x.astype(np.int64))).numpy()
    assert np.array_equal(codec.fmix32(x).astype(np.int64), want)


def test_hash_buckets_range_and_determinism():
    values = codec.canonical_strings(np.arange(10_000))
    ids = codec.hash_buckets(values, 97, seed=5)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 97
    assert len(np.unique(ids)) == 97  # 10,000 values fill every row of 97
    assert np.array_equal(ids, codec.hash_buckets(list(values), 97, seed=5))
    assert not np.array_equal(ids, codec.hash_buckets(values, 97, seed=6))  # the seed changes which values collide
    assert codec.hash_buckets([], 97).shape == (0,)


def test_collisions_follow_the_balls_in_bins_expectation():
    # V distinct values in N rows: E[rows used] = N (1 - (1 - 1/N)^V); a uniform hash stays close to it
    for V, N in ((1000, 4096), (5000, 1024), (50_000, 100_000)):
        used = len(np.unique(codec.hash_buckets(codec.canonical_strings(np.arange(V)), N)))
        expected = N * (1 - (1 - 1 / N) ** V)
        assert abs(used - expected) < 4 * np.sqrt(expected), (V, N, used, expected)


# ---- the schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, needle", [
    (dict(kind="numeric", hash_buckets=10), "categorical and multi features only"),
    (dict(bins=4, hash_buckets=10), "exclude each other"),
    (dict(min_count=3, hash_buckets=10), "needs a vocabulary"),
    (dict(hash_buckets=-1), "hash_buckets = -1"),
    (dict(hash_buckets="many"), "hash_buckets = 'many'"),
    (dict(hash_buckets=True), "hash_buckets = True"),
    (dict(hash_seed=3), "hash_seed applies with hash_buckets only"),
    (dict(hash_buckets=8, hash_seed=2**32), "hash_seed = 4294967296"),
])
def test_feature_spec_checks(spec, needle):
    with pytest.raises(ValueError, match=needle):
        FeatureSpec("f", **spec)


def test_data_schema_yaml_names_the_feature():
    raw = {"labels": ["a", "b"], "features": [{"name": "u", "kind": "categorical", "hash_buckets": 1000},
                                              {"name": "x", "kind": "numeric", "hash_buckets": 10}]}
    with pytest.raises(SchemaError, match=r"features\[1\] \(x\).*categorical and multi"):
        table_schema_from_dict(raw, "s.yaml")
    raw["features"].pop()
    ts = table_schema_from_dict(raw, "s.yaml")
    assert ts.features[0].hash_buckets == 1000 and ts.feature_schema().features[0].hashed


def test_unset_hash_keys_keep_old_digests():
    """A schema without hashed features serialises as before (its fingerprints do not change)."""
    s = Schema([FeatureSpec("a", cardinality=3), FeatureSpec("m", kind="multi")], labels=["t"])
    d = s.to_dict()
    assert all("hash_buckets" not in f and "hash_seed" not in f for f in d["features"])
    h = Schema([FeatureSpec("a", hash_buckets=16, hash_seed=9)], labels=["t"]).to_dict()["features"][0]
    assert h["hash_buckets"] == 16 and h["hash_seed"] == 9
    assert Schema.from_dict(d) == s


# ---- encoders: a vocabulary larger than the table -------------------------------------------------
def _frame(rows: int, users: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, rows)
    g = rng.integers(0, 5, rows)
    x = rng.normal(size=rows).round(4)
    tags = ["|".join(f"t{t}:{w:.2f}" for t, w in zip(rng.integers(0, users, k), rng.random(k) + 0.5))
            for k in rng.integers(0, 4, rows)]
    # the label depends on the user id's parity and on the group, so a model can learn from the hashed rows
    p = 1 / (1 + np.exp(-(2.0 * (u % 2) - 1.0 + 0.5 * (g - 2) + x)))
    click = (rng.random(rows) < p).astype(int)
    buy = (click & (rng.random(rows) < 0.5 + 0.3 * (u % 2))).astype(int)
    return pd.DataFrame({"user": [f"u{v}" for v in u], "group": g, "x": x, "tags": tags, "click": click, "buy": buy})


SCHEMA = """labels: [click, buy]
features:
  - {name: user, kind: categorical, hash_buckets: 97, hash_seed: 3}
  - {name: group, kind: categorical}
  - {name: x, kind: numeric}
  - {name: tags, kind: multi, weight_separator: ":", hash_buckets: 61}
split: {valid: 0.2, test: 0.2, seed: 1}
chunk_rows: 500
"""


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("hashed")
    _frame(3000, users=2500).to_csv(d / "train.csv", index=False)
    (d / "s.yaml").write_text(SCHEMA)
    return d


def test_encoder_hashes_without_a_vocabulary(table):
    ts = load_table_schema(str(table / "s.yaml"), train=str(table / "train.csv"))
    data = load_table(ts, progress=False)
    enc = data.encoder
    distinct = data.frames["train"]["user"].nunique()
    assert distinct > 10 * 97  # the vocabulary is far larger than the table
    card = {f.name: f.cardinality for f in enc.schema.features}
    assert card["user"] == 97 and card["tags"] == 61 and card["group"] == 6  # group: a vocabulary, 0 = OOV
    assert "user" not in enc.vocab and "tags" not in enc.vocab
    ids = data.train.categorical[:, 0]
    assert int(ids.min()) >= 0 and int(ids.max()) < 97
    want = codec.hash_buckets(codec.canonical_strings(data.frames["train"]["user"].to_numpy()), 97, 3)
    assert np.array_equal(ids.numpy(), want)
    # a value never seen in training gets its hashed row, not the out-of-vocabulary 0
    new = pd.DataFrame({"user": ["never-seen", "u1"], "group": [99, 1], "x": [0.0, 0.0], "tags": ["zz:1|t1", ""],
                        "click": [0, 1], "buy": [0, 0]})
    e = enc.transform(new)
    assert e.categorical[0, 0].item() == codec.hash_buckets(["never-seen"], 97, 3)[0]
    assert e.categorical[0, 1].item() == 0  # the vocabulary feature: OOV
    assert e.multi[0].values.tolist() == codec.hash_buckets(["zz", "t1"], 61).tolist()
    assert e.multi[0].weights.tolist() == [1.0, 1.0] and e.multi[0].offsets.tolist() == [0, 2, 2]
    # the state round-trips and re-encodes identically
    again = TabularEncoder.from_state_dict(json.loads(json.dumps(enc.state_dict())))
    assert torch.equal(again.transform(new).categorical, e.categorical)


def test_streaming_gives_the_in_memory_encoding(table):
    from dtn.data.stream import load_table_streaming

    ts = load_table_schema(str(table / "s.yaml"), train=str(table / "train.csv"))
    mem, stream = load_table(ts, progress=False), load_table_streaming(ts, progress=False)
    assert len(stream.chunks) >= 5 and stream.encoder == mem.encoder
    for (a, ya), (b, yb) in zip(mem.train.batches(256), stream.train.batches(256)):
        assert torch.equal(a.categorical, b.categorical) and torch.equal(ya, yb)
        assert torch.equal(a.multi[0].values, b.multi[0].values) and torch.equal(a.multi[0].weights, b.multi[0].weights)


def test_train_evaluate_export_predict_with_unseen_ids(table, tmp_path):
    """Train on 3000 rows, then evaluate and serve rows whose user ids were never seen: no refit, and
    the exported predictor (run without dtn) hashes exactly as training did."""
    base = ["--data-schema", str(table / "s.yaml"), "--data", str(table / "train.csv"), *SMALL_CLI]
    run, art = tmp_path / "run", tmp_path / "art"
    assert main(["train", "--out", str(run), "--epochs", "2", *base]) == 0
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["test"]["click"]["auc"] > 0.6  # it learned from the hashed ids
    unseen = _frame(400, users=100_000, seed=9)
    unseen["user"] = [f"new{v}" for v in range(len(unseen))]  # none of these was in the train file
    unseen.to_csv(tmp_path / "unseen.csv", index=False)
    model, enc, _ = model_from_checkpoint(str(run / "best.pt"))
    raw = pd.read_csv(tmp_path / "unseen.csv", dtype=str, keep_default_na=False)
    enc_rows = enc.transform(raw)
    assert int(enc_rows.categorical[:, 0].max()) < 97 and len(np.unique(enc_rows.categorical[:, 0])) > 50
    model.eval()
    with torch.no_grad():
        want = torch.sigmoid(model(enc_rows.batch(slice(None))[0])).numpy()
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(art)]) == 0
    site = sorted({os.path.dirname(os.path.dirname(torch.__file__)), os.path.dirname(os.path.dirname(np.__file__))})
    code = (f"import sys; sys.path[:0] = {site!r}\n"
            "import importlib.util, runpy\n"
            "assert importlib.util.find_spec('dtn') is None and importlib.util.find_spec('dtn_kernels') is None\n"
            f"sys.argv = ['predict.py', {str(tmp_path / 'unseen.csv')!r}, '--out', 'pred.csv']\n"
            "try:\n    runpy.run_path('predict.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=art, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_csv(art / "pred.csv").to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert want.std(0).min() > 1e-4  # row-dependent predictions
