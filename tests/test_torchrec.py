"""The TorchRec backend (model.embeddings: torchrec) and sharded training (DistributedModelParallel, gloo,
2 processes via torchrun): the plan, table-wise and column-wise sharding under a memory budget, the loss
curve against one process, exact resume at 2 processes, resume from 2 onto 1, and one-process loading
(evaluate, export, an analysis) of a sharded checkpoint. Skipped where TorchRec is not usable."""
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dtn.cli import main
from dtn.config import load_config
from dtn.features import FeatureBatch, FeatureSpec, JaggedField, Schema
from dtn.features import torchrec_input as TI
from dtn.models import build_model
from owndata import REPO, write_example

OK, WHY = TI.torchrec_status()
needs_torchrec = pytest.mark.skipif(not OK, reason=f"TorchRec is not usable here: {WHY} (bash scripts/install_torchrec.sh)")


def test_without_torchrec_the_cli_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(TI, "torchrec_status", lambda: (False, "torchrec is not installed"))
    assert main(["train", "--dataset", "synthetic", "--set", "model.embeddings=torchrec", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs TorchRec" in err[0] and "install_torchrec.sh" in err[0] and "--no-deps" in err[0], err


@needs_torchrec
@pytest.mark.parametrize("extra, needles", [
    (["--set", "model.torchrec.shard=always", "--set", "train.embedding_optimizer=adam"],
     ["train.embedding_optimizer = 'adam'", "'sgd', 'rowwise_adagrad'"]),
    (["--set", "train.embedding_optimizer=sgd"], ["train.embedding_optimizer = 'sgd':", "shard=always",
                                                  "--set train.embedding_optimizer=adam"]),
    ([], ["train.embedding_optimizer = 'rowwise_adagrad' (the default)", "shard=always",
          "unsharded TorchRec tables train with the dense Adam: add --set train.embedding_optimizer=adam"]),
    (["--set", "model.torchrec.shard=always", "--set", "train.embedding_optimizer=lazy_adam"], ["CPU kernels fuse"]),
])
def test_the_tables_optimizer_is_checked(capsys, tmp_path, extra, needles):
    """Sharded: before any data is read; unsharded (a resumed sharded run would stay sharded): by train_model."""
    assert main(["train", "--dataset", "synthetic", "--set", "model.embeddings=torchrec", *extra,
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtn train: config error:") and all(n in err[0] for n in needles), err


@needs_torchrec
def test_unsharded_tables_train_with_the_dense_adam_when_asked(tmp_path):
    """train.embedding_optimizer=adam (what the default's error says to set): one process trains the
    unsharded TorchRec tables (a plain last.pt, not a sharded one, holding the collection's tables)."""
    args = ["train", "--dataset", "synthetic", "--set", "data.synthetic_rows=400", "--model", "mmoe",
            "--set", "model.embed_dim=4", "--set", "model.tower_hidden=[8]", "--set", "model.expert_hidden=[8]",
            "--set", "train.progress=false", "--epochs", "1", "--threads", "1",
            "--set", "model.embeddings=torchrec", "--set", "train.embedding_optimizer=adam", "--out", str(tmp_path)]
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert "sharded" not in ckpt or not ckpt["sharded"]
    assert any(".ebc." in k for k in ckpt["model_state"])


@needs_torchrec
@pytest.mark.parametrize("name", ["mmoe", "dtn"])
def test_torchrec_layer_equals_the_own_input_layer(name):
    """Same initial weights for one seed, same E and model outputs, same table gradients; own_state_dict
    maps the weights onto the own layer's (what dtn export uses)."""
    s = Schema([FeatureSpec("a", cardinality=5), FeatureSpec("b.x", cardinality=7),
                FeatureSpec("m", kind="multi", cardinality=9, pooling="mean"),
                FeatureSpec("w", kind="multi", cardinality=4, weight_separator=":"),
                FeatureSpec("x", kind="numeric")], labels=["t1", "t2"])
    cfg = load_config("cpu").model
    g = torch.Generator().manual_seed(1)
    B = 6
    batch = FeatureBatch(torch.stack([torch.randint(0, 5, (B,), generator=g), torch.randint(0, 7, (B,), generator=g)], 1),
                         torch.randn(B, 1, generator=g),
                         [JaggedField(torch.randint(0, 9, (10,), generator=g), torch.tensor([0, 2, 2, 5, 6, 8, 10])),
                          JaggedField(torch.randint(0, 4, (7,), generator=g), torch.tensor([0, 1, 2, 3, 4, 6, 7]),
                                      torch.rand(7, generator=g))])
    torch.manual_seed(3)
    own = build_model(name, s, cfg)
    torch.manual_seed(3)
    tr = build_model(name, s, dataclasses.replace(cfg, embeddings="torchrec"))
    assert isinstance(tr.input_layer, TI.TorchRecInputLayer) and tr.input_layer.field_names == own.input_layer.field_names
    own_sd = own.state_dict()
    assert all(torch.equal(v, own_sd[k]) for k, v in TI.own_state_dict(tr.state_dict(), s).items())
    torch.testing.assert_close(tr.input_layer(batch), own.input_layer(batch), rtol=0, atol=1e-7)
    out_own, out_tr = own(batch), tr(batch)
    torch.testing.assert_close(out_tr, out_own, rtol=0, atol=1e-6)
    out_own.sum().backward()
    out_tr.sum().backward()
    grads = torch.cat([p.grad for n, p in tr.named_parameters() if ".ebc." in n])
    torch.testing.assert_close(grads, own.input_layer.weight.grad, rtol=0, atol=1e-6)
    with pytest.raises(IndexError, match="feature 'a': id 5 at row 0"):
        bad = FeatureBatch(batch.categorical.clone(), batch.numeric, batch.multi)
        bad.categorical[0, 0] = 5
        tr(bad)
    torch.testing.assert_close(TI.own_twin(tr)(batch), out_tr.detach(), rtol=0, atol=1e-6)


@needs_torchrec
def test_deferred_tables_are_never_whole_and_draw_the_same_per_shard():
    """Built for sharded training, the tables stay on the meta device (no process allocates a whole
    table); each shard draws its own rows, the same values whatever the cut (rows, columns, blocks)."""
    s = Schema([FeatureSpec("a", cardinality=150_000), FeatureSpec("x", kind="numeric")], labels=["t1", "t2"])
    cfg = dataclasses.replace(load_config("cpu").model, embeddings="torchrec")
    with TI.deferred_tables():
        model = build_model("mmoe", s, cfg)
    assert model.input_layer.ebc.embedding_bags["a"].weight.is_meta and model.input_layer.deferred
    assert not build_model("mmoe", s, cfg).input_layer.ebc.embedding_bags["a"].weight.is_meta
    full = TI.table_init(5, 0, 150_000, slice(0, 150_000), slice(0, 8), 8, 0.05)
    assert abs(float(full.std()) - 0.05) < 1e-3
    for r, h, c, w in [(0, 70_000, 0, 4), (70_000, 80_000, 4, 4), (65_535, 2, 0, 8), (149_999, 1, 0, 8)]:
        assert torch.equal(TI.table_init(5, 0, 150_000, slice(r, r + h), slice(c, c + w), 8, 0.05), full[r:r + h, c:c + w])
    assert not torch.equal(TI.table_init(5, 1, 150_000, slice(0, 10), slice(0, 8), 8, 0.05), full[:10])  # per table


# ---- 2 processes ---------------------------------------------------------------------------------------
SMALL = ["--model", "mmoe", "--set", "model.embed_dim=8", "--set", "model.tower_hidden=[8]",
         "--set", "model.expert_hidden=[16]", "--set", "model.num_experts=2", "--set", "train.batch_size=200",
         "--set", "train.progress=false", "--set", "train.lr=0.005", "--threads", "1",
         "--set", "model.embeddings=torchrec", "--set", "train.embedding_optimizer=rowwise_adagrad",
         "--set", "train.embedding_lr=0.05"]
SCHEMA = """name: hashed
labels: [click, conversion]
features:
  - {tables}
  - {{columns: "numerical_{{1..4}}", kind: numeric}}
split: {{valid: 0.15, test: 0.15, seed: 2024, key: search_id}}
"""
MANY = dict(tables='{columns: "categorical_{1..16}", kind: categorical, hash_buckets: 5000}')  # 16 tables of 5000 x 8
ONE = dict(tables="{name: categorical_1, kind: categorical, hash_buckets: 20000}")  # one table of 20000 x 8


def _torchrun(args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dtn", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _history(folder):
    with open(os.path.join(folder, "history.csv")) as fh:
        return list(csv.DictReader(fh))


def _losses(folder):
    return [float(r["train_loss"]) for r in _history(folder)]


def _dcp_tensors(folder):
    """Every tensor of a DCP folder, whole, in one process."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
    dcp.load(out, checkpoint_id=folder, no_dist=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not OK:
        pytest.skip(f"TorchRec is not usable here: {WHY}")
    root = tmp_path_factory.mktemp("torchrec")
    data = write_example(root, "aliexpress", 1200, "csv", seed=3)
    schemas = {}
    for key, fmt in (("many", MANY), ("one", ONE)):
        schemas[key] = str(root / f"{key}.yaml")
        with open(schemas[key], "w") as fh:
            fh.write(SCHEMA.format(**fmt))
    base = ["train", "--data-schema", schemas["many"], "--data", data, *SMALL]
    out = {"root": root, "data": data, "schemas": schemas, "base": base}
    out["full_stdout"] = _torchrun([*base, "--epochs", "2", "--out", str(root / "full")])
    _torchrun([*base, "--epochs", "1", "--out", str(root / "part")])
    shutil.copytree(root / "part", root / "part1")
    _torchrun([*base, "--epochs", "2", "--resume", "--out", str(root / "part")])
    return out


@needs_torchrec
def test_the_plan_is_printed_and_saved(runs):
    root = runs["root"]
    plan = json.load(open(root / "full" / "plan.json"))
    assert plan["world_size"] == 2 and len(plan["tables"]) == 16
    assert {t["sharding_type"] for t in plan["tables"]} <= {"table_wise", "column_wise", "table_column_wise"}
    assert {s["rank"] for t in plan["tables"] for s in t["shards"]} == {0, 1}  # both ranks hold tables
    for t in plan["tables"]:
        assert sum(s["sizes"][0] * s["sizes"][1] for s in t["shards"]) == 5000 * 8, t  # shards tile each table
        assert f"  {t['feature']:<20} [5000 x 8] {t['sharding_type']}" in runs["full_stdout"]
    assert "sharding plan (2 process(es), cpu, tables' optimizer rowwise_adagrad fused)" in runs["full_stdout"]
    m = json.load(open(root / "full" / "metrics.json"))
    assert m["world_size"] == 2 and m["sharding_plan"]["tables"] == plan["tables"]
    assert sorted(p for p in os.listdir(root / "full") if not p.startswith(".")) == [
        "best.e2.dcp", "best.pt", "history.csv", "last.e2.dcp", "last.pt", "metrics.json", "plan.json"]


@needs_torchrec
def test_table_wise_under_a_memory_budget_halves_each_rank(runs, tmp_path):
    """16 tables of 5000 x 8 (2.56 MB) with 4 MiB per process, forced table-wise: each rank holds half of them."""
    _torchrun([*runs["base"], "--epochs", "1", "--set", "model.torchrec.memory_budget_mb=4",
               "--set", "model.torchrec.sharding=table_wise", "--out", str(tmp_path)])
    plan = json.load(open(tmp_path / "plan.json"))
    assert {t["sharding_type"] for t in plan["tables"]} == {"table_wise"}
    per_rank = [b["tables"] for b in plan["bytes_per_rank"]]  # measured on each rank: its local shards
    assert sum(per_rank) == 16 * 5000 * 8 * 4
    assert all(0.4 <= b / sum(per_rank) <= 0.6 for b in per_rank), per_rank
    state = [b["optimizer_state"] for b in plan["bytes_per_rank"]]  # rowwise Adagrad: one float per row
    assert sum(state) == 16 * 5000 * 4 and all(0.4 <= s / sum(state) <= 0.6 for s in state), state


@needs_torchrec
def test_column_wise_for_a_table_too_large_for_the_budget(runs, tmp_path):
    """One table of 20000 x 8 (640 kB) with 0.7 MiB per process and 4-column shards: no rank can hold it
    whole (with its optimizer state and the planner's reserve), so it is cut into two 4-column shards, one per rank."""
    _torchrun(["train", "--data-schema", runs["schemas"]["one"], "--data", runs["data"], *SMALL, "--epochs", "1",
               "--set", "model.torchrec.memory_budget_mb=0.7", "--set", "model.torchrec.column_shard_dim=4",
               "--out", str(tmp_path)])
    plan = json.load(open(tmp_path / "plan.json"))
    for t in plan["tables"]:
        assert t["sharding_type"] in ("column_wise", "table_column_wise"), t
        assert sorted((s["rank"], s["offsets"][1], s["sizes"][1]) for s in t["shards"]) in (
            [(0, 0, 4), (1, 4, 4)], [(0, 4, 4), (1, 0, 4)]), t["shards"]
    per_rank = [b["tables"] for b in plan["bytes_per_rank"]]
    assert per_rank[0] == per_rank[1] == len(plan["tables"]) * 20000 * 4 * 4


@needs_torchrec
def test_two_process_loss_curve_matches_one_process(runs, tmp_path):
    """The same sharded model in one process (model.torchrec.shard=always): the same loss curve (the
    2-process run differs by the order of float sums only) and the same validation AUCs."""
    assert main([*runs["base"], "--epochs", "2", "--set", "model.torchrec.shard=always", "--out", str(tmp_path)]) == 0
    assert json.load(open(tmp_path / "plan.json"))["world_size"] == 1
    assert _losses(runs["root"] / "full") == pytest.approx(_losses(tmp_path), rel=1e-4)
    two, one = _history(runs["root"] / "full"), _history(tmp_path)
    for a, b in zip(two, one):
        for k in ("val_auc/click", "val_auc/conversion"):
            assert abs(float(a[k]) - float(b[k])) < 2e-3, (k, a[k], b[k])


@needs_torchrec
def test_exact_resume_at_two_processes(runs):
    """2 epochs straight equal 1 epoch, then --resume for the second: table shards, the fused optimizer's
    state, the dense weights and their Adam state, bit for bit; the same loss curve."""
    root = runs["root"]
    a, b = (torch.load(root / d / "last.pt", weights_only=False) for d in ("full", "part"))
    assert a["epoch"] == b["epoch"] == 2 and a["sharded"]["tables"] == b["sharded"]["tables"]
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    for sa, sb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = _dcp_tensors(str(root / "full" / "last.e2.dcp")), _dcp_tensors(str(root / "part" / "last.e2.dcp"))
    assert sorted(ta) == sorted(tb) and any(k.startswith("optim.") for k in ta)  # rowwise Adagrad's state is in it
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert _losses(root / "full") == _losses(root / "part")


@needs_torchrec
def test_resume_from_two_processes_onto_one(runs, capsys):
    """A 2-process sharded last.pt resumed by one process: DCP reshards the tables and their optimizer
    state onto the one-process plan; the second epoch equals the 2-process run's up to float sums."""
    root = runs["root"]
    assert main([*runs["base"], "--epochs", "2", "--resume", "--out", str(root / "part1")]) == 0
    out = capsys.readouterr().out
    assert "sharding plan (1 process(es)" in out and "resumed from" in out
    assert json.load(open(root / "part1" / "metrics.json"))["world_size"] == 1
    assert _losses(root / "part1") == pytest.approx(_losses(root / "full"), rel=1e-4)


@needs_torchrec
def test_a_sharded_checkpoint_loads_in_one_process(runs, tmp_path):
    """dtn evaluate, dtn export and an analysis read the 2-process best.pt in one process; the exported
    program (own input layer, aten ops only) predicts what the sharded run evaluated."""
    root = runs["root"]
    best = str(root / "full" / "best.pt")
    m = json.load(open(root / "full" / "metrics.json"))
    assert main(["evaluate", "--checkpoint", best, "--split", "test", "--out", str(tmp_path / "e.json")]) == 0
    again = json.load(open(tmp_path / "e.json"))["metrics"]
    for t in ("click", "conversion"):
        assert again[t]["auc"] == pytest.approx(m["test"][t]["auc"], abs=1e-6)
    assert main(["export", "--checkpoint", best, "--out", str(tmp_path / "x")]) == 0
    meta = json.load(open(tmp_path / "x" / "meta.json"))
    assert os.path.exists(tmp_path / "x" / "model.pt2") and meta.get("model") == "mmoe"
    assert main(["gates", "--checkpoint", best, "--out", str(tmp_path / "g")]) == 0
    # the .pt names its .dcp folder: without it, one line naming what is missing
    shutil.copy(best, tmp_path / "alone.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "alone.pt")]) == 2


@pytest.mark.requires_cuda
@needs_torchrec
def test_row_wise_sharding_on_cuda(tmp_path):
    """Row-wise sharding (TorchRec has no CPU kernel for it): one process on the GPU, every table row-wise."""
    if not torch.cuda.is_available():
        pytest.skip("row-wise sharding needs CUDA (TorchRec has no CPU kernel for it)")
    data = write_example(tmp_path, "aliexpress", 1200, "csv", seed=3)
    schema = tmp_path / "s.yaml"
    schema.write_text(SCHEMA.format(**MANY))
    args = ["train", "--data-schema", str(schema), "--data", data, *SMALL, "--epochs", "1",
            "--set", "train.device=cuda", "--set", "model.torchrec.shard=always",
            "--set", "model.torchrec.sharding=row_wise", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    plan = json.load(open(tmp_path / "r" / "plan.json"))
    assert {t["sharding_type"] for t in plan["tables"]} == {"row_wise"} and plan["device"] == "cuda"
    m = json.load(open(tmp_path / "r" / "metrics.json"))
    assert m["valid"]["click"]["auc"] > 0.5
