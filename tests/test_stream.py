"""Streaming: chunked reading gives the in-memory encoders, batches and metrics; sharding over
workers and ranks covers every row."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from dtn.cli import main
from dtn.data import TabularEncoder, load_table, load_table_schema
from dtn.data.encoders import EncodedData, Moments
from dtn.data.stream import load_table_streaming
from dtn.train import train_model
from owndata import SMALL_CLI, small_config, write_example

pytest.importorskip("pyarrow")

ROWS, CHUNK = 2500, 300  # the file is eight-plus chunks: the streaming path never holds all of it


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("stream")


@pytest.fixture(scope="module", params=[("aliexpress", "csv"), ("ali_ccp", "parquet")], ids=["aliexpress-csv",
                                                                                            "ali_ccp-parquet"])
def table(request, folder):
    layout, ext = request.param
    path = write_example(folder, layout, ROWS, ext, seed=1, row_group_rows=CHUNK)
    ts = load_table_schema(layout, train=path, chunk_rows=CHUNK)
    return ts, load_table(ts, progress=False), load_table_streaming(ts, progress=False)


def test_streaming_fit_equals_in_memory_fit(table):
    ts, mem, stream = table
    assert len(stream.chunks) >= ROWS // CHUNK  # really chunked
    assert max(sum(c.rows.values()) for c in stream.chunks) <= CHUNK
    # the encoder fitted in one pass over the chunks is exactly the one fitted on the whole train frame
    whole = TabularEncoder(ts.feature_schema()).fit(mem.frames["train"])
    assert stream.encoder == whole == mem.encoder
    assert stream.encoder.stats == whole.stats  # exact float equality, not approx
    assert [f.cardinality for f in stream.schema.features] == [f.cardinality for f in whole.schema.features]
    assert (len(stream.train), len(stream.valid), len(stream.test)) == (len(mem.train), len(mem.valid), len(mem.test))


def _cat(batches):
    parts = [EncodedData(b.categorical, b.numeric, list(b.multi), y) for b, y in batches]
    return EncodedData.concat(parts)


def test_streaming_batches_equal_in_memory_batches(table):
    _, mem, stream = table
    a = list(mem.train.batches(128))
    b = list(stream.train.batches(128))
    assert len(a) == len(b) == stream.train.num_batches(128)
    for (ba, ya), (bb, yb) in zip(a, b):
        assert torch.equal(ba.categorical, bb.categorical) and torch.equal(ba.numeric, bb.numeric)
        assert torch.equal(ya, yb)
        for ja, jb in zip(ba.multi, bb.multi):
            assert torch.equal(ja.values, jb.values) and torch.equal(ja.offsets, jb.offsets)
            assert (ja.weights is None) == (jb.weights is None)
            assert ja.weights is None or torch.equal(ja.weights, jb.weights)


def test_streaming_training_gives_in_memory_metrics(table):
    _, mem, stream = table
    cfg = small_config(epochs=2, shuffle=False)  # same row order in both: the runs must be identical
    t1, r1 = train_model("dtn", mem, cfg, log=lambda *_: None)
    t2, r2 = train_model("dtn", stream, cfg, log=lambda *_: None)
    assert [h["train_loss"] for h in t1.history] == [h["train_loss"] for h in t2.history]
    assert r1["valid"] == r2["valid"] and r1["test"] == r2["test"]
    first_task = next(iter(r1["valid"].values()))
    assert first_task["auc"] > 0.6, r1["valid"]  # and it learned something (two unshuffled epochs)


def test_shuffled_stream_is_a_permutation_fixed_by_the_generator(table):
    _, _, stream = table

    def epoch(seed):
        return _cat(stream.train.batches(100, shuffle=True, generator=torch.Generator().manual_seed(seed)))

    plain, s1, s1b, s2 = _cat(stream.train.batches(100)), epoch(1), epoch(1), epoch(2)
    assert torch.equal(s1.categorical, s1b.categorical)
    assert not torch.equal(s1.categorical, plain.categorical) and not torch.equal(s1.categorical, s2.categorical)
    key = lambda d: sorted(map(tuple, torch.cat([d.categorical.float(), d.numeric, d.labels], 1).tolist()))  # noqa: E731
    assert key(s1) == key(plain)  # every row exactly once


def test_worker_processes_read_every_row_once(table):
    _, _, stream = table
    one = _cat(stream.valid.batches(64))
    stream.valid.num_workers = 2
    try:
        two = _cat(stream.valid.batches(64))
    finally:
        stream.valid.num_workers = 0
    key = lambda d: sorted(map(tuple, torch.cat([d.categorical.float(), d.numeric, d.labels], 1).tolist()))  # noqa: E731
    assert len(two) == len(one) and key(two) == key(one)


def test_rank_shards_cover_the_split(table):
    _, _, stream = table
    world, bs = 2, 128
    per_rank = [list(stream.train.batches(bs, rank=r, world_size=world)) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1])  # every rank takes the same number of DDP steps
    assert all(len(y) <= bs // world for r in per_rank for _, y in r)
    rows = [_cat(r) for r in per_rank]
    key = lambda d: set(map(tuple, torch.cat([d.categorical.float(), d.numeric, d.labels], 1).tolist()))  # noqa: E731
    everything = key(_cat(stream.train.batches(bs)))
    assert key(rows[0]) | key(rows[1]) == everything and not key(rows[0]) & key(rows[1])
    shards = [stream.valid.shard(r, world) for r in range(world)]
    assert sum(len(s) for s in shards) == len(stream.valid)


def test_in_memory_rank_pieces_make_the_global_batch():
    data = load_table_from_memory()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    glob = list(data.batches(50, shuffle=True, generator=g()))
    pieces = [list(data.batches(50, shuffle=True, generator=g(), rank=r, world_size=3)) for r in range(3)]
    assert len(pieces[0]) == data.num_batches(50, 3) == len(glob)  # 1003 rows: the last batch (3 rows) >= 3 ranks
    for k, (b, y) in enumerate(glob):
        assert torch.equal(torch.cat([pieces[r][k][1] for r in range(3)]), y)
        assert torch.equal(torch.cat([pieces[r][k][0].categorical for r in range(3)]), b.categorical)
    assert data.num_batches(50, 4) == len(glob) - 1  # 3 rows cannot feed 4 ranks: dropped


def load_table_from_memory():
    from dtn.data import make_synthetic

    return make_synthetic(1254, seed=2).train  # 1003 rows


def test_exact_moments_do_not_depend_on_chunking():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(1e6, 1e-2, 5000), rng.lognormal(0, 4, 5000), [0.0, -0.0, 5e-324]])
    whole = Moments()
    whole.update(x)
    parts = Moments()
    for c in np.array_split(rng.permutation(x), 13):
        m = Moments()
        m.update(c)
        parts.merge(m)
    assert parts.mean_std() == whole.mean_std()
    mean, sd = whole.mean_std()
    assert mean == pytest.approx(float(np.mean(x)), rel=1e-14) and sd == pytest.approx(float(np.std(x)), rel=1e-12)


def test_cli_stream_run(folder, tmp_path):
    path = write_example(folder, "aliexpress", ROWS, "csv", seed=1)
    args = ["train", "--data-schema", "aliexpress", "--data", path, "--model", "shared_bottom", "--epochs", "1",
            "--set", "train.shuffle=false", *SMALL_CLI]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--out", str(tmp_path / "str"), "--stream", "--chunk-rows", str(CHUNK)]) == 0
    a, b = (json.load(open(tmp_path / d / "metrics.json")) for d in ("mem", "str"))
    assert a["valid"] == b["valid"]
    cfg = json.load(open(tmp_path / "str" / "metrics.json"))
    assert cfg["world_size"] == 1
    ck = torch.load(tmp_path / "str" / "best.pt", weights_only=False)
    assert ck["config"]["data"]["stream"] is True and ck["encoder"]["vocab"]  # encoders saved with the model
    assert dataclasses.asdict(load_table_schema("aliexpress", train=path))["chunk_rows"] == 100_000
