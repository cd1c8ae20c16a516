"""The analyses (dtn importance / gates / trim / tsne / table3) on the synthetic data with planted features."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from dtn.cli import main
from conftest import small_model_config
from dtn.config import Config, DataConfig, TrainConfig
from dtn.data import PLANTED, load_dataset
from dtn.train import model_from_checkpoint, train_model

ROWS, SPLIT_SEED = 6000, 3


def _config(**train):
    model = small_model_config()
    t = TrainConfig(lr=5e-3, batch_size=256, eval_batch_size=4096, epochs=4, patience=5, progress=False, seed=5)
    return Config(model=model, train=dataclasses.replace(t, **train),
                  data=DataConfig(dataset="synthetic", synthetic_rows=ROWS, split_seed=SPLIT_SEED))


@pytest.fixture(scope="module")
def synth():
    return load_dataset(_config().data)


@pytest.fixture(scope="module")
def dtn_ckpt(synth, tmp_path_factory):
    """A small DTN trained on 6000 synthetic rows, checkpoint at <dir>/best.pt."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("dtn")
    torch.manual_seed(0)
    _, result = train_model("dtn", synth, _config(num_threads=1), out_dir=str(out), log=lambda *_: None)
    torch.set_num_threads(threads)
    assert min(m["auc"] for m in result["test"].values()) > 0.8, result["test"]
    return str(out / "best.pt")


@pytest.fixture(scope="module")
def sb_ckpt(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("sb")
    train_model("shared_bottom", synth, _config(epochs=1), out_dir=str(out), log=lambda *_: None)
    return str(out / "best.pt")


# ---- importance --------------------------------------------------------------------------------
def test_permute_field_moves_only_that_field(synth):
    from dtn.analysis.importance import permute_field

    data, schema = synth.test, synth.schema
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    cat_names = [f.name for f in schema.categorical]
    num_names = [f.name for f in schema.numeric]
    p = permute_field(data, schema, "t1_cat", perm)
    j = cat_names.index("t1_cat")
    assert torch.equal(p.categorical[:, j], data.categorical[perm, j])
    others = [i for i in range(len(cat_names)) if i != j]
    assert torch.equal(p.categorical[:, others], data.categorical[:, others])
    assert torch.equal(p.numeric, data.numeric) and torch.equal(p.labels, data.labels)
    p = permute_field(data, schema, "t2_num", perm)
    k = num_names.index("t2_num")
    assert torch.equal(p.numeric[:, k], data.numeric[perm, k]) and torch.equal(p.categorical, data.categorical)
    # a multi-valued field: whole bags move with their row
    p = permute_field(data, schema, "tags", perm)
    src, dst = data.multi[0], p.multi[0]
    for i in (0, 1, 7, len(data) - 1):
        a, b = dst.offsets[i], dst.offsets[i + 1]
        s, e = src.offsets[perm[i]], src.offsets[perm[i] + 1]
        assert torch.equal(dst.values[a:b], src.values[s:e])
    assert int(dst.offsets[-1]) == int(src.offsets[-1])
    with pytest.raises(KeyError, match="unknown field"):
        permute_field(data, schema, "nope", perm)


def test_importance_finds_the_planted_task_specific_features(dtn_ckpt, tmp_path, capsys):
    out = tmp_path / "imp"
    assert main(["importance", "--checkpoint", dtn_ckpt, "--out", str(out), "--repeats", "3", "--split", "test",
                 "--threads", "1"]) == 0
    for name in ("importance.md", "importance.csv", "importance.json", "importance_task1_vs_task2.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "importance.json").read_text())
    n = len(res["fields"])
    assert n == 13 and res["repeats"] == 3 and all(len(f["fi"]["task1"]) == 3 for f in res["fields"])
    rank = {t: {f["feature"]: f["rank"][t] for f in res["fields"]} for t in ("task1", "task2")}
    fi = {t: {f["feature"]: f["mean"][t] for f in res["fields"]} for t in ("task1", "task2")}
    drivers = len(PLANTED["task1"]) + len(PLANTED["both"])  # 6 fields drive each task, 7 do not
    for own, other in (("task1", "task2"), ("task2", "task1")):
        # every planted field of a task (t?_cat, t?_num and the interaction pair) ranks above every field that
        # does not drive it, with a clear AUC drop; on the other task it is in the bottom half, with ~no drop
        for f in PLANTED[own]:
            assert rank[own][f] <= drivers and fi[own][f] > 0.02, (f, own, rank[own], fi[own][f])
            assert rank[other][f] > n / 2 and fi[other][f] < 0.01, (f, other, rank[other], fi[other][f])
    # pure-noise fields matter to neither task
    for f in PLANTED["noise"]:
        assert rank["task1"][f] > 4 and rank["task2"][f] > 4
    md = (out / "importance.md").read_text()
    assert "| t1_cat |" in md and "rank task2" in md
    csv_lines = (out / "importance.csv").read_text().splitlines()
    assert csv_lines[0].startswith("feature,kind,fi_task1,fi_task2") and len(csv_lines) == n + 1


def test_importance_subsample_and_bad_tasks(dtn_ckpt, tmp_path, capsys):
    out = tmp_path / "imp"
    assert main(["importance", "--checkpoint", dtn_ckpt, "--out", str(out), "--repeats", "1", "--max-rows", "200",
                 "--split", "valid", "--threads", "1"]) == 0
    res = json.loads((out / "importance.json").read_text())
    assert res["rows"] == 200 and res["split"] == "valid"
    assert main(["importance", "--checkpoint", dtn_ckpt, "--out", str(out), "--tasks", "task1,ctr"]) == 2
    assert "task1" in capsys.readouterr().err


# ---- gates and trim ----------------------------------------------------------------------------
def test_gates_writes_table_and_heatmap(dtn_ckpt, synth, tmp_path):
    out = tmp_path / "gates"
    assert main(["gates", "--checkpoint", dtn_ckpt, "--out", str(out), "--threads", "1"]) == 0
    for name in ("gates.md", "gates.csv", "gates.json", "gates.png"):
        assert (out / name).stat().st_size > 0, name
    g = json.loads((out / "gates.json").read_text())
    model, _, _ = model_from_checkpoint(dtn_ckpt)
    assert g["tasks"] == ["task1", "task2"] and g["rows"] == len(synth.valid)
    for t, task in enumerate(g["tasks"]):
        w = g["weights"][task]
        assert w["candidates"] == model.candidate_names(t)
        assert sum(w["mean"]) == pytest.approx(1.0, abs=1e-6)  # softmax weights, averaged
    # task2 follows task1 (TSN): it also weighs task1's FIMs * p(task1)
    assert len(g["weights"]["task1"]["mean"]) == 6 and len(g["weights"]["task2"]["mean"]) == 9
    assert "task2/masknet" in (out / "gates.md").read_text()


@pytest.mark.parametrize("name, levels", [("mmoe", 1), ("cgc", 1), ("ple", 2), ("tfi", 1)])
def test_gates_of_expert_models(synth, tmp_path, name, levels):
    """MMoE, PLE / CGC (and TFI): each gate's mean weight over the experts it can choose, summing to 1;
    the same means as averaging forward_details' gate weights by hand."""
    cfg = _config(epochs=1, num_threads=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_levels=levels))
    train_model(name, synth, cfg, out_dir=str(tmp_path / "run"), log=lambda *_: None)
    out = tmp_path / "gates"
    assert main(["gates", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(out), "--threads", "1"]) == 0
    for f in ("gates.md", "gates.csv", "gates.json", "gates.png"):
        assert (out / f).stat().st_size > 0, f
    g = json.loads((out / "gates.json").read_text())
    model, _, _ = model_from_checkpoint(str(tmp_path / "run" / "best.pt"))
    m = model.cfg
    specific = 0 if name == "mmoe" else m.num_specific_experts
    shared = m.num_experts if name == "mmoe" else m.num_shared_experts
    task_gates = [f"L{i}/{t}" if levels > 1 else t for i in range(1, levels + 1) for t in ("task1", "task2")]
    assert set(task_gates) <= set(g["gates"]) and g["rows"] == len(synth.valid) and g["model"] == name
    assert ("L1/shared" in g["gates"]) == (levels > 1)  # a shared gate on every level but the last
    assert len(g["slots"]) == levels * (2 * specific + shared)
    for gate in task_gates:
        w = g["weights"][gate]
        assert len(w["mean"]) == specific + shared and sum(w["mean"]) == pytest.approx(1.0, abs=1e-6)
        task = gate.split("/")[-1]
        assert all(c.split("/")[-2] in (task, "shared") for c in w["candidates"])  # its own and the shared experts
    # the means by hand: forward_details' weights of the first gate over the validation rows
    with torch.no_grad():
        first = [model.forward_details(b)["gate_weights"][0][0] for b, _ in synth.valid.batches(4096)]
    by_hand = torch.cat(first).double().mean(0).tolist()
    assert g["weights"][g["gates"][0]]["mean"] == pytest.approx(by_hand, abs=1e-9)
    text = (out / "gates.md").read_text()
    assert text.startswith("| gate |") and all(s in text for s in g["slots"])


def test_gates_needs_a_gated_model(sb_ckpt, tmp_path, capsys):
    assert main(["gates", "--checkpoint", sb_ckpt, "--out", str(tmp_path / "g")]) == 2
    assert "needs a gated model" in capsys.readouterr().err
    assert main(["trim", "--checkpoint", sb_ckpt, "--threshold", "0.1", "--out", str(tmp_path / "t")]) == 2
    assert "needs a DTN model" in capsys.readouterr().err


def test_trim_removes_fims_and_reloads(dtn_ckpt, synth, tmp_path):
    g_dir = tmp_path / "gates"
    main(["gates", "--checkpoint", dtn_ckpt, "--out", str(g_dir), "--threads", "1"])
    g = json.loads((g_dir / "gates.json").read_text())
    # a threshold just above task2's weakest own FIM switches it off; no other task uses task2's FIMs
    t2 = g["weights"]["task2"]["mean"][:3]
    threshold = float(min(t2)) + 1e-6
    assert threshold < max(g["weights"]["task2"]["mean"])
    out = tmp_path / "trim"
    assert main(["trim", "--checkpoint", dtn_ckpt, "--threshold", str(threshold), "--out", str(out),
                 "--repeats", "3", "--latency-batch", "256", "--threads", "1"]) == 0
    r = json.loads((out / "trim.json").read_text())
    weakest = g["weights"]["task2"]["candidates"][int(np.argmin(t2))]
    assert weakest in r["removed"]
    assert r["after"]["params"] < r["before"]["params"]
    assert r["before"]["latency"]["median_ms"] > 0 and r["before"]["latency"]["batch_size"] == 256
    assert set(r["after"]["test"]) == {"task1", "task2"}
    assert "DTN-trim" in (out / "trim.md").read_text()
    # the saved checkpoint reloads with the trim, and predicts what trim.json reports
    model, encoder, cfg = model_from_checkpoint(str(out / "trimmed.pt"))
    assert model.num_parameters() == r["after"]["params"]
    from dtn.analysis import predict_probs
    from dtn.train.metrics import auc

    p = predict_probs(model, synth.test)
    assert auc(synth.test.labels[:, 0].numpy(), p[:, 0]) == pytest.approx(r["after"]["test"]["task1"]["auc"], abs=1e-9)
    # the gates of the trimmed checkpoint give the switched-off candidate weight 0
    main(["gates", "--checkpoint", str(out / "trimmed.pt"), "--out", str(tmp_path / "g2"), "--threads", "1"])
    g2 = json.loads((tmp_path / "g2" / "gates.json").read_text())["weights"]["task2"]
    i = g2["candidates"].index(weakest)
    assert g2["mean"][i] == 0.0 and g2["active"][i] is False


def test_trim_bad_threshold(dtn_ckpt, tmp_path, capsys):
    assert main(["trim", "--checkpoint", dtn_ckpt, "--threshold", "1.5", "--out", str(tmp_path)]) == 2
    assert "threshold" in capsys.readouterr().err


# ---- t-SNE -------------------------------------------------------------------------------------
def test_tsne_writes_both_plots(dtn_ckpt, tmp_path):
    out = tmp_path / "tsne"
    assert main(["tsne", "--checkpoint", dtn_ckpt, "--out", str(out), "--fim", "gdcn", "--task", "task2",
                 "--samples", "40", "--threads", "1"]) == 0  # 80 and 120 points: t-SNE's cost grows with them
    for name in ("tsne_fim-gdcn.png", "tsne_task-task2.png", "tsne_fim-gdcn.csv", "tsne_task-task2.csv"):
        assert (out / name).stat().st_size > 0, name
    a = (out / "tsne_fim-gdcn.csv").read_text().splitlines()
    assert len(a) == 1 + 2 * 40 and {l.rsplit(",", 1)[1] for l in a[1:]} == {"task1", "task2"}
    b = (out / "tsne_task-task2.csv").read_text().splitlines()
    assert len(b) == 1 + 3 * 40 and {l.rsplit(",", 1)[1] for l in b[1:]} == {"gdcn", "masknet", "memonet"}


def test_tsne_bad_names(dtn_ckpt, sb_ckpt, tmp_path, capsys):
    assert main(["tsne", "--checkpoint", dtn_ckpt, "--out", str(tmp_path), "--fim", "dcn"]) == 2
    err = capsys.readouterr().err
    assert "unknown --fim 'dcn'" in err and "masknet" in err
    assert main(["tsne", "--checkpoint", dtn_ckpt, "--out", str(tmp_path), "--task", "ctr"]) == 2
    err = capsys.readouterr().err
    assert "unknown --task 'ctr'" in err and "task1" in err
    assert main(["tsne", "--checkpoint", sb_ckpt, "--out", str(tmp_path)]) == 2
    assert "needs a DTN model" in capsys.readouterr().err


# ---- Table 3 -----------------------------------------------------------------------------------
def test_table3_adds_a_dtn_trim_row(tmp_path, capsys):
    out = tmp_path / "t3"
    args = ["table3", "--dataset", "synthetic", "--set", "data.synthetic_rows=1500", "--set", "model.embed_dim=4",
            "--set", "model.fim_dim=8", "--set", "model.memonet.num_buckets=97", "--set", "model.masknet.mask_hidden=8",
            "--set", "model.masknet.block_dim=8", "--set", "model.expert_hidden=[16]", "--set", "model.bottom_hidden=[16]",
            "--set", "model.tower_hidden=[8]", "--set", "train.batch_size=256", "--set", "train.progress=false",
            "--epochs", "1", "--threads", "1", "--seeds", "1,2", "--trim-threshold", "0.2", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "compare.json").read_text())
    rows = summary["rows"]
    assert list(rows) == ["shared_bottom", "mmoe", "ple", "sfm", "tfi", "dtn", "dtn_trim"]
    assert all(r["n_runs"] == 2 for r in rows.values())
    # each seed's trimmed DTN: metrics from its own re-evaluation, parameters after trimming
    per_seed = summary["trim"]["per_seed"]
    for s, rec in zip((1, 2), per_seed):
        m = json.loads((out / "dtn_trim" / f"seed{s}" / "metrics.json").read_text())
        assert m["params"] == rec["params_after"] <= rec["params_before"]
        assert rec["params_before"] == json.loads((out / "dtn" / f"seed{s}" / "metrics.json").read_text())["params"]
        assert (out / "dtn_trim" / f"seed{s}" / "trimmed.pt").exists()
    # with a threshold of 0.2 (over 6 or 9 candidates) some FIM is removed
    assert any(rec["removed"] for rec in per_seed)
    aucs = [json.loads((out / "dtn_trim" / f"seed{s}" / "metrics.json").read_text())["test"]["task1"]["auc"]
            for s in (1, 2)]
    assert rows["dtn_trim"]["auc/task1"] == pytest.approx(float(np.mean(aucs)))
    assert rows["shared_bottom"]["relaimp/task1"] == 0.0
    md = (out / "compare.md").read_text()
    assert "| DTN-trim |" in md and "| SFM |" in md and " ± " in md and "seed 2: removed" in md
    # a rerun reuses every finished run (no training)
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "] training" not in log and log.count("reusing") == 7 * 2
