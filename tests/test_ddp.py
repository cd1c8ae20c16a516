"""Multi-process training: `dtn train` under torchrun, 2 processes, gloo on CPU."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from dtn.cli import main
from dtn.data import load_table_schema
from dtn.data.stream import load_table_streaming
from owndata import REPO, SMALL_CLI, write_example

pytest.importorskip("pyarrow")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROWS = 3000


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_example(tmp_path_factory.mktemp("ddp"), "aliexpress", ROWS, "csv", seed=5)


def _torchrun(args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dtn", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _losses(folder):
    with open(os.path.join(folder, "history.csv")) as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


def test_two_process_gloo_matches_single_process(data_file, tmp_path):
    args = ["train", "--data-schema", "aliexpress", "--data", data_file, "--model", "dtn", "--epochs", "2", *SMALL_CLI]
    out = _torchrun([*args, "--out", str(tmp_path / "ddp")])
    assert "distributed: 2 processes, backend gloo" in out
    assert out.count("epoch 1:") == 1  # only rank 0 logs
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    ddp = json.load(open(tmp_path / "ddp" / "metrics.json"))
    one = json.load(open(tmp_path / "one" / "metrics.json"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    # Each DDP step is the single-process step on the same global batch (every rank takes its piece,
    # gradients are averaged with per-rank weights n_rank * world / n_global): the two runs differ
    # only by float rounding in the reductions (~1e-7 per step), which after a few dozen Adam steps
    # moves a validation AUC by ~1e-4, not by the 1e-2 that a different data order or a wrong
    # gradient scale gives (one rank's data alone, or a sum instead of a mean, fails this).
    for split in ("valid", "test"):
        for task in ("click", "conversion"):
            assert abs(ddp[split][task]["auc"] - one[split][task]["auc"]) < 2e-3, (split, task, ddp, one)
            assert abs(ddp[split][task]["logloss"] - one[split][task]["logloss"]) < 2e-3
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    # metrics cover all of the split (predictions gathered from both ranks), and rank 0's checkpoint loads
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ddp" / "best.pt"), "--split", "valid",
                 "--out", str(tmp_path / "e.json")]) == 0
    again = json.load(open(tmp_path / "e.json"))["metrics"]
    assert again["click"]["auc"] == pytest.approx(ddp["valid"]["click"]["auc"], abs=1e-6)


def test_two_process_streaming_shards_and_fits_like_one(data_file, tmp_path):
    chunk = 250
    _torchrun(["train", "--data-schema", "aliexpress", "--data", data_file, "--model", "shared_bottom", "--epochs", "3",
               "--stream", "--chunk-rows", str(chunk), "--out", str(tmp_path / "s"), *SMALL_CLI])
    m = json.load(open(tmp_path / "s" / "metrics.json"))
    assert m["world_size"] == 2
    # a different (chunk-sharded) order than one process, so no equality; but it learns on both tasks
    assert m["valid"]["click"]["auc"] > 0.65 and m["valid"]["conversion"]["auc"] > 0.58, m["valid"]
    # each rank scanned half of the chunks; the merged fit equals a single process's fit
    ck = torch.load(tmp_path / "s" / "best.pt", weights_only=False)
    single = load_table_streaming(load_table_schema("aliexpress", train=data_file, chunk_rows=chunk), progress=False)
    assert ck["encoder"]["vocab"] == single.encoder.vocab and ck["encoder"]["stats"] == single.encoder.stats
    assert sorted(os.listdir(tmp_path / "s")) == ["best.pt", "history.csv", "last.pt", "metrics.json"]


def test_two_process_learned_task_weights_match_one(data_file, tmp_path):
    """train.task_weighting=uncertainty under DDP: the log-variances live outside the DDP module, so
    their gradients are averaged over the ranks by hand; the learned weights equal one process's."""
    args = ["train", "--data-schema", "aliexpress", "--data", data_file, "--model", "shared_bottom", "--epochs", "2",
            "--set", "train.task_weighting=uncertainty", *SMALL_CLI]
    _torchrun([*args, "--out", str(tmp_path / "ddp")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    ddp = json.load(open(tmp_path / "ddp" / "metrics.json"))["task_weights"]
    one = json.load(open(tmp_path / "one" / "metrics.json"))["task_weights"]
    assert all(abs(w - 1.0) > 1e-3 for w in one.values())  # they moved from their start
    assert ddp == pytest.approx(one, rel=1e-5)
