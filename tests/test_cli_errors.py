"""The CLI against bad inputs and faults, as a hostile but fair user would try them.

Every case must end with exit status 2, one line on stderr naming the file, key or value, no
traceback, and every file that existed before untouched (and no temp file left). Classes:
config values, data and schema, checkpoints, resume, compare's reuse, output folders and the
disk, the exported predictor. Then the successes the issue asked for: model selection without a
defined AUC, `--set train.lr=1e-3`, resume applying a new lr, stale temp files, file modes, and a
real `kill -9` during training followed by `--resume`, bit-exact with an uninterrupted run.
"""
import errno
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from dtn.cli import main

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCHEMA = """labels: [click, buy]
features:
  - {columns: [c1, c2], kind: categorical}
  - {columns: [x1, x2], kind: numeric}
  - {name: tags, kind: multi}
split: {valid: 0.2, test: 0.2, seed: 1}
"""
# a model small enough to train an epoch of a few hundred rows in well under a second
SMALL = ["--set", "model.embed_dim=4", "--set", "model.fim_dim=8", "--set", "model.tower_hidden=[8]",
         "--set", "model.bottom_hidden=[8]", "--set", "model.expert_hidden=[8]",
         "--set", "model.masknet={mask_hidden: 8, block_dim: 8}",
         "--set", "model.memonet={fields: 2, num_buckets: 97, codebook_dim: 4}",
         "--set", "train.batch_size=64", "--set", "train.progress=false", "--threads", "1"]


def make_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    c1, c2 = rng.integers(0, 6, rows), rng.integers(0, 4, rows)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    click = (rng.random(rows) < 1 / (1 + np.exp(-(c1 - 2.5 + x1)))).astype(int)
    buy = (click & (rng.random(rows) < 1 / (1 + np.exp(-(x2 + c2 - 1.5))))).astype(int)
    tags = ["|".join(f"t{t}" for t in rng.integers(0, 9, k)) for k in rng.integers(0, 3, rows)]
    return pd.DataFrame({"c1": [f"a{v}" for v in c1], "c2": c2, "x1": x1.round(4), "x2": x2.round(4), "tags": tags,
                         "click": click, "buy": buy})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny table, its schema, a trained DTN run (best.pt, last.pt) and an exported artifact."""
    d = tmp_path_factory.mktemp("errors")
    make_frame(400).to_csv(d / "t.csv", index=False)
    (d / "s.yaml").write_text(SCHEMA)
    base = ["--data-schema", str(d / "s.yaml"), "--data", str(d / "t.csv"), *SMALL]
    assert main(["train", "--out", str(d / "run"), "--epochs", "2", *base]) == 0
    assert main(["export", "--checkpoint", str(d / "run" / "best.pt"), "--out", str(d / "art")]) == 0
    return {"dir": d, "base": base, "run": d / "run", "art": d / "art"}


def snapshot(*folders) -> dict:
    """Every file under ``folders``: its digest and modification time."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[p] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def run_cli(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def expect_error(capsys, argv, *needles, protect=()):
    """argv fails with exit 2 and one stderr line holding every needle; files under ``protect`` unchanged."""
    before = snapshot(*protect)
    rc, out, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert snapshot(*protect) == before, "existing outputs changed"
    for folder in protect:
        for root, _, files in os.walk(folder):
            assert not [f for f in files if f.endswith(".tmp")], (root, files)
    return lines[0]


# ---- configuration: every value checked before any data is read --------------------------------------
# --data names a file that does not exist: a config error must come first
CONFIG_CASES = [
    (["--set", "train.lr=abc"], ["train.lr = abc", "not a number", "> 0.0"]),
    (["--set", "train.lr=-1e-3"], ["train.lr = -1e-3", "allowed"]),
    (["--set", "train.grad_clip=-1"], ["train.grad_clip = -1", "> 0.0"]),
    (["--set", "train.batch_size=-5"], ["train.batch_size = -5", ">= 1"]),
    (["--set", "train.batch_size=0"], ["train.batch_size = 0"]),
    (["--set", "train.batch_size=2.5"], ["train.batch_size = 2.5", "not an integer"]),
    (["--set", "train.epochs=-1"], ["train.epochs = -1"]),
    (["--set", "train.patience=0"], ["train.patience = 0", ">= 1"]),
    (["--epochs", "0"], ["train.epochs = 0"]),
    (["--stream", "--chunk-rows", "0"], ["data.chunk_rows = 0"]),
    (["--set", "model.embed_dim=0"], ["model.embed_dim = 0"]),
    (["--set", "train.eval_batch_size=0"], ["train.eval_batch_size = 0"]),
    (["--set", "train.lrate=0.1"], ["unknown config key train.lrate", "lr"]),
    (["--set", "train"], ["--set 'train'", "section.key=value"]),
    (["--set", "model.fims=[gdcn, cin]"], ["model.fims[1] = 'cin'", "masknet"]),
    (["--set", "model.masknet={mode: diagonal}"], ["model.masknet.mode = 'diagonal'", "'serial'"]),
    (["--set", "model.gdcn={layers: 2}"], ["model.gdcn: unknown option(s) ['layers']"]),
    (["--set", "model.dropout=1.5"], ["model.dropout = 1.5", "< 1.0"]),
    (["--set", "train.progress=maybe"], ["train.progress = maybe", "true or false"]),
    (["--set", "train.early_stop_metric=auc"], ["train.early_stop_metric = 'auc'"]),
    (["--set", "train.device=tpu"], ["train.device = 'tpu'"]),
    (["--threads", "0"], ["train.num_threads = 0"]),
    (["--set", "train.amp=fp8"], ["train.amp = 'fp8'", "'off', 'bf16', 'fp16'"]),
    (["--set", "train.lr_schedule=linear"], ["train.lr_schedule = 'linear'", "'cosine'"]),
    (["--set", "train.min_lr=1"], ["train.min_lr = 1.0", "<= train.lr"]),
    (["--workers", "-1"], ["data.num_workers = -1"]),
    (["--model", "nope"], ["unknown model 'nope'"]),
    (["--config", "/nonexistent/c.yaml"], ["no config file", "c.yaml"]),
]


@pytest.mark.parametrize("extra, needles", CONFIG_CASES, ids=[" ".join(c[0])[:40] for c in CONFIG_CASES])
def test_config_errors_before_data(env, capsys, tmp_path, extra, needles):
    argv = ["train", "--data-schema", env["dir"] / "s.yaml", "--data", tmp_path / "missing.csv", *SMALL,
            "--out", tmp_path / "r", *extra]
    expect_error(capsys, argv, *needles, protect=[env["dir"]])
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")


def test_cuda_device_without_cuda(env, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expect_error(capsys, ["train", *env["base"], "--out", tmp_path / "r", "--set", "train.device=cuda"],
                 "train.device = 'cuda'", "no CUDA device")


def test_bad_config_file(env, capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("train: {lr: [0.1\n")
    expect_error(capsys, ["train", *env["base"], "--config", tmp_path / "c.yaml", "--out", tmp_path / "r"],
                 "c.yaml", "not a valid YAML file")
    (tmp_path / "d.yaml").write_text("base: cpu\ntrain: {batch_size: many}\n")
    expect_error(capsys, ["train", *env["base"], "--config", tmp_path / "d.yaml", "--out", tmp_path / "r"],
                 "d.yaml", "train.batch_size = 'many'")


def test_set_values_take_the_field_type(env):
    from dtn.cli import _config, build_parser

    args = build_parser().parse_args(["train", "--set", "train.lr=1e-3", "--set", "data.path=2024", "--set",
                                      "train.grad_clip=null", "--set", "model.tower_hidden=[4, 2]", "--epochs", "3"])
    cfg = _config(args)
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.data.path == "2024" and cfg.train.grad_clip is None and cfg.model.tower_hidden == [4, 2]
    assert cfg.train.epochs == 3


# ---- data and schema ----------------------------------------------------------------------------------
def _table_case(env, tmp_path, frame_edit=None, text_edit=None, schema=SCHEMA, ext="csv"):
    df = make_frame(200, seed=5)
    if frame_edit:
        df = frame_edit(df)
    path = tmp_path / f"d.{ext}"
    if ext == "parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
        if text_edit:
            path.write_bytes(text_edit(path.read_bytes()))
    (tmp_path / "s.yaml").write_text(schema)
    return ["train", "--data-schema", tmp_path / "s.yaml", "--data", path, *SMALL, "--out", tmp_path / "r"]


def _set(df, col, row, value):
    df[col] = df[col].astype(object)
    df.loc[row, col] = value
    return df


DATA_CASES = {
    "float32 overflow": (dict(frame_edit=lambda df: _set(df, "x1", 7, 1e39)),
                         ["d.csv: column 'x1', line 9", "1e+39", "float32 range"]),
    "float32 overflow streamed": (dict(frame_edit=lambda df: _set(df, "x2", 150, -5e38)),
                                  ["column 'x2', line 152", "float32 range"]),
    "nan value": (dict(frame_edit=lambda df: _set(df, "x1", 3, "nan")), ["column 'x1', line 5", "value 'nan' is not a number"]),
    "not utf-8": (dict(text_edit=lambda b: b.replace(b"a3", b"a\xff3", 1)), ["d.csv: line", "not UTF-8"]),
    "extra field": (dict(text_edit=lambda b: b.replace(b"\n", b",surplus\n", 3).replace(b",surplus", b"", 2)),
                    ["d.csv: line 3", "8 fields, expected 7", "'surplus' has no column"]),
    "bad label": (dict(frame_edit=lambda df: _set(df, "buy", 10, 3)), ["column 'buy', line 12", "not 0 or 1"]),
    "one label": (dict(schema=SCHEMA.replace("[click, buy]", "[click]")), ["labels: ['click'] names one task"]),
    "no valid rows": (dict(schema=SCHEMA.replace("valid: 0.2", "valid: 0.0")), ["validation split is empty"]),
    "missing column": (dict(frame_edit=lambda df: df.drop(columns=["x2"])), ["missing column(s) ['x2']"]),
    "parquet list column": (dict(frame_edit=lambda df: df.assign(tags=[[1, 2]] * len(df)), ext="parquet"),
                            ["d.parquet: column 'tags' is a Parquet list", "scalars"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_errors(env, capsys, tmp_path, case):
    kw, needles = DATA_CASES[case]
    if kw.get("ext") == "parquet":
        pytest.importorskip("pyarrow")
    argv = _table_case(env, tmp_path, **kw)
    if case == "float32 overflow streamed":
        argv += ["--stream", "--chunk-rows", "50"]
    expect_error(capsys, argv, *needles, protect=[tmp_path])


def test_missing_data_file(env, capsys, tmp_path):
    expect_error(capsys, ["train", "--data-schema", env["dir"] / "s.yaml", "--data", tmp_path / "gone.csv", *SMALL,
                          "--out", tmp_path / "r"], "gone.csv", "does not exist")


def test_truncated_census_xz(capsys, tmp_path):
    full = lzma.compress(b"73, Not in universe, 0, 0\n" * 2000)
    (tmp_path / "census-income.data.xz").write_bytes(full[: len(full) // 2])
    (tmp_path / "census-income.test").write_text("x\n")
    expect_error(capsys, ["train", "--dataset", "census", "--data-dir", tmp_path, *SMALL, "--out", tmp_path / "r"],
                 "census-income.data.xz: cannot decompress", "truncated", protect=[tmp_path])


# ---- checkpoints ----------------------------------------------------------------------------------------
def _bad_checkpoint(env, tmp_path, kind):
    best = env["run"] / "best.pt"
    p = tmp_path / "c.pt"
    if kind == "truncated":
        p.write_bytes(best.read_bytes()[:5000])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a checkpoint\n")
    elif kind == "other torch file":
        torch.save({"weights": torch.zeros(3)}, p)
    elif kind == "folder":
        return env["run"]
    elif kind == "missing":
        return tmp_path / "nope.pt"
    else:
        ck = torch.load(best, weights_only=False)
        if kind == "other weights":
            ck["model_state"].pop(next(iter(ck["model_state"])))
            ck["model_state"]["extra.weight"] = torch.zeros(2)
        elif kind == "newer format":
            ck["format"] = 99
        elif kind == "altered encoders":
            ck["encoder"]["vocab"]["c1"] = {"zz": 1}
        elif kind == "invalid config":
            ck["config"]["train"]["batch_size"] = 0
        torch.save(ck, p)
    return p


CKPT_CASES = {"truncated": ["not a readable checkpoint", "truncated"], "empty": ["an empty file (0 bytes)"],
              "text": ["not a readable checkpoint"], "other torch file": ["not a dtn checkpoint", "weights"],
              "folder": ["a folder, not a checkpoint file"], "missing": ["nope.pt", "does not exist"],
              "other weights": ["weights do not fit the 'dtn' model", "extra.weight"],
              "newer format": ["checkpoint format 99 is newer"],
              "altered encoders": ["encoder state does not match its fingerprint"],
              "invalid config": ["its config is not valid", "train.batch_size = 0"]}


@pytest.mark.parametrize("kind", list(CKPT_CASES))
def test_evaluate_bad_checkpoint(env, capsys, tmp_path, kind):
    ckpt = _bad_checkpoint(env, tmp_path, kind)
    expect_error(capsys, ["evaluate", "--checkpoint", ckpt, "--out", tmp_path / "m.json"], *CKPT_CASES[kind],
                 protect=[env["run"], tmp_path])
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("kind", ["truncated", "other weights"])
def test_export_bad_checkpoint(env, capsys, tmp_path, kind):
    ckpt = _bad_checkpoint(env, tmp_path, kind)
    shutil.copytree(env["art"], tmp_path / "art")
    expect_error(capsys, ["export", "--checkpoint", ckpt, "--out", tmp_path / "art"], *CKPT_CASES[kind],
                 protect=[tmp_path])


def _edit_checkpoint(path, edit):
    ck = torch.load(path, weights_only=False)
    edit(ck)
    torch.save(ck, path)


def _run_copy(env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    return run


@pytest.mark.parametrize("edit, needles", [
    (lambda run: (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:3000]), ["last.pt", "truncated"]),
    (lambda run: (run / "last.pt").write_bytes(b""), ["last.pt: an empty file"]),
    (lambda run: shutil.copy(run / "best.pt", run / "last.pt"), ["no training state"]),
    (lambda run: _edit_checkpoint(run / "last.pt", lambda ck: ck["model_state"].pop(next(iter(ck["model_state"])))),
     ["last.pt: its training state does not fit this model", "Missing key"]),
], ids=["truncated last.pt", "empty last.pt", "best.pt as last.pt", "other weights"])
def test_resume_bad_last_checkpoint(env, capsys, tmp_path, edit, needles):
    run = _run_copy(env, tmp_path)
    edit(run)
    expect_error(capsys, ["train", *env["base"], "--out", run, "--resume"], *needles, protect=[run])


@pytest.mark.parametrize("extra, needles", [
    (["--model", "mmoe"], ["holds a 'dtn' run", "'mmoe'"]),
    (["--set", "train.batch_size=32"], ["cannot resume with other settings", "train.batch_size 64 -> 32"]),
    (["--set", "model.fim_dim=16"], ["model.fim_dim 8 -> 16"]),
    (["--set", "train.seed=3"], ["train.seed"]),
], ids=["other model", "batch size", "model width", "seed"])
def test_resume_refuses_other_settings(env, capsys, tmp_path, extra, needles):
    run = _run_copy(env, tmp_path)
    expect_error(capsys, ["train", *env["base"], "--out", run, "--resume", *extra], *needles, protect=[run])


def test_resume_refuses_changed_data(env, capsys, tmp_path):
    run = _run_copy(env, tmp_path)
    changed = tmp_path / "t.csv"
    df = pd.read_csv(env["dir"] / "t.csv")
    df.loc[0, "x1"] = 9.5
    df.to_csv(changed, index=False)
    base = [a if a != str(env["dir"] / "t.csv") else str(changed) for a in env["base"]]
    expect_error(capsys, ["train", *base, "--out", run, "--resume", "--epochs", "3"], "cannot resume on other data",
                 "train file", "differs", protect=[run])


# ---- compare: stale runs are refused, never silently reused ----------------------------------------------
def test_compare_refuses_stale_runs(env, capsys, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--models", "shared_bottom", *env["base"], "--epochs", "1", "--out", out]
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 0, err
    assert "training" in stdout and "reusing" not in stdout
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 0 and "reusing" in stdout and "reused 1 of 1 run(s)" in stdout, stdout
    # other settings, other data, or results without a fingerprint: refused, nothing touched
    expect_error(capsys, [*args, "--set", "train.lr=0.01"], "cmp/shared_bottom holds a run that is not this one",
                 "train.lr 0.002 -> 0.01", "--fresh", protect=[out])
    df = pd.read_csv(env["dir"] / "t.csv")
    df.loc[1, "x2"] = -3.0
    df.to_csv(tmp_path / "t2.csv", index=False)
    other = [a if a != str(env["dir"] / "t.csv") else str(tmp_path / "t2.csv") for a in args]
    expect_error(capsys, other, "other data", "differs", protect=[out])
    m = json.loads((out / "shared_bottom" / "metrics.json").read_text())
    del m["fingerprint"]
    (out / "shared_bottom" / "metrics.json").write_text(json.dumps(m))
    expect_error(capsys, args, "no run fingerprint", protect=[out])
    # --fresh retrains there
    rc, stdout, err = run_cli([*args, "--fresh"], capsys)
    assert rc == 0 and "training" in stdout and "reusing" not in stdout
    assert json.loads((out / "compare.json").read_text())["runs"]["shared_bottom"][0]["reused"] is False


def test_compare_bad_seeds(env, capsys, tmp_path):
    expect_error(capsys, ["compare", *env["base"], "--seeds", "1,x", "--out", tmp_path / "c"], "--seeds '1,x'")


# ---- output folders and the disk --------------------------------------------------------------------------
def test_out_is_not_a_folder(env, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error(capsys, ["train", *env["base"], "--out", tmp_path / "file" / "run"], "--out", "cannot write there",
                 protect=[tmp_path])
    expect_error(capsys, ["export", "--checkpoint", env["run"] / "best.pt", "--out", tmp_path / "file"],
                 "exists and is not a folder", protect=[tmp_path])
    expect_error(capsys, ["evaluate", "--checkpoint", env["run"] / "best.pt", "--out", tmp_path / "file" / "m.json"],
                 "--out folder", "exists and is not a folder", protect=[tmp_path])


def _fail_fsync_after(monkeypatch, n: int):
    """Every fsync after the first ``n`` fails with ENOSPC (a disk that fills up)."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_during_training_keeps_last_good_files(env, capsys, tmp_path, monkeypatch):
    run = _run_copy(env, tmp_path)
    _fail_fsync_after(monkeypatch, 0)
    line = expect_error(capsys, ["train", *env["base"], "--out", run, "--resume", "--epochs", "4"],
                        "No space left on device", "after epoch 3", "files of epoch 2", "--resume", protect=[run])
    assert "best.pt" in line or "last.pt" in line


def test_disk_full_during_export_keeps_the_old_artifact(env, capsys, tmp_path, monkeypatch):
    shutil.copytree(env["art"], tmp_path / "art")
    _fail_fsync_after(monkeypatch, 2)
    expect_error(capsys, ["export", "--checkpoint", env["run"] / "best.pt", "--out", tmp_path / "art"],
                 "No space left on device", "unchanged", protect=[tmp_path])


# ---- the exported predictor ---------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, needles", [
    (lambda df, p: df.to_csv(p, index=False) or p.write_text(p.read_text().replace("\n", ",9\n", 2)
                                                              .replace(",9\n", "\n", 1)), ["line 2", "8 fields"]),
    (lambda df, p: _set(df, "x1", 4, "1e39").to_csv(p, index=False), ["row 4", "'x1'", "float32"]),
    (lambda df, p: _set(df, "x2", 2, "inf").to_csv(p, index=False), ["row 2", "'x2'", "not a finite number"]),
    (lambda df, p: df.to_csv(p, index=False) or p.write_bytes(p.read_bytes().replace(b"a1", b"\xe9", 1)),
     ["rows.csv: line", "not UTF-8"]),
    (lambda df, p: df.drop(columns=["x2"]).to_csv(p, index=False), ["missing column(s) ['x2']"]),
], ids=["extra field", "1e39", "inf", "latin-1", "missing column"])
def test_predictor_rejects_bad_rows(env, tmp_path, capsys, edit, needles):
    """The artifact's own predict.py (loaded from the artifact folder, as `python predict.py` runs it)."""
    import importlib.util

    rows = tmp_path / "rows.csv"
    edit(make_frame(20, seed=9), rows)
    spec = importlib.util.spec_from_file_location("artifact_predict", env["art"] / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    rc = predict.main([str(rows), "--artifact", str(env["art"]), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "p.csv").exists()


def test_predictor_process_exit(env, tmp_path):
    rows = tmp_path / "rows.csv"
    make_frame(5, seed=9).to_csv(rows, index=False)
    rows.write_text(rows.read_text().replace("\n", ",extra\n", 2).replace(",extra\n", "\n", 1))
    r = subprocess.run([sys.executable, str(env["art"] / "predict.py"), str(rows)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"predict: {rows}: line 2: 8 fields, expected 7: field 8 " \
        "'extra' has no column", r.stderr


# ---- successes the fixes promise ------------------------------------------------------------------------------
def test_one_class_validation_selects_on_logloss(env, capsys, tmp_path):
    """A task whose validation rows hold one class: a warning naming it, best.pt written, strict JSON."""
    df = make_frame(300, seed=2)
    df.to_csv(tmp_path / "train.csv", index=False)
    df.head(40).assign(buy=0).to_csv(tmp_path / "valid.csv", index=False)
    df.tail(40).assign(buy=0).to_csv(tmp_path / "test.csv", index=False)
    rc, out, err = run_cli(["train", "--data-schema", env["dir"] / "s.yaml", "--data", tmp_path / "train.csv",
                            "--valid", tmp_path / "valid.csv", "--test", tmp_path / "test.csv", *SMALL,
                            "--epochs", "2", "--out", tmp_path / "r"], capsys)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "['buy']" in warnings[0] and "LogLoss" in warnings[0], err
    assert (tmp_path / "r" / "best.pt").exists() and "best epoch 0" not in out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert m["test"]["buy"]["auc"] is None and m["selection"] == "logloss" and m["best_epoch"] >= 1
    assert run_cli(["evaluate", "--checkpoint", tmp_path / "r" / "best.pt", "--split", "valid"], capsys)[0] == 0


def test_resume_applies_and_records_a_new_lr(env, capsys, tmp_path):
    run = _run_copy(env, tmp_path)
    rc, out, err = run_cli(["train", *env["base"], "--out", run, "--resume", "--epochs", "3", "--set",
                            "train.lr=1e-3"], capsys)
    assert rc == 0, err
    assert "train.lr 0.002 -> 0.001" in out
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["config"]["train"]["lr"] == 0.001
    assert all(g["lr"] == 0.001 for g in last["optimizer_state"]["param_groups"])
    assert {"epoch": 2, "key": "train.lr", "old": 0.002, "new": 0.001} in last["resumed"]


def test_moved_data_resume_and_compare_reuse(env, capsys, tmp_path):
    """The same data under another path: a resume continues and compare reuses (the data are keyed on content)."""
    run = _run_copy(env, tmp_path)
    shutil.copy(env["dir"] / "t.csv", tmp_path / "moved.csv")
    base = [a if a != str(env["dir"] / "t.csv") else str(tmp_path / "moved.csv") for a in env["base"]]
    rc, out, err = run_cli(["train", *base, "--out", run, "--resume", "--epochs", "3"], capsys)
    assert rc == 0 and "resumed from" in out, err
    cmp = ["compare", "--models", "mmoe", "--epochs", "1", "--out", tmp_path / "cmp"]
    assert run_cli([*cmp, *env["base"]], capsys)[0] == 0
    rc, out, err = run_cli([*cmp, *base, "--threads", "2"], capsys)
    assert rc == 0 and "reusing" in out, err


def test_stale_temp_files_are_removed_and_modes_follow_the_umask(env, tmp_path, capsys):
    run = _run_copy(env, tmp_path)
    dead = run / ".last.pt.999999999.deadbeef.tmp"
    old_style = run / ".best.pt.k2j4h5.tmp"
    dead.write_bytes(b"partial")
    old_style.write_bytes(b"partial")
    mask = os.umask(0o022)
    try:
        assert run_cli(["train", *env["base"], "--out", run, "--resume", "--epochs", "3"], capsys)[0] == 0
    finally:
        os.umask(mask)
    assert not dead.exists() and not old_style.exists()
    for f in ("best.pt", "last.pt", "history.csv", "metrics.json"):
        assert os.stat(run / f).st_mode & 0o777 == 0o644, f


def test_debug_shows_the_traceback(env, capsys, tmp_path):
    from dtn.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", *map(str, env["base"]), "--out", str(tmp_path / "r"), "--set", "train.lr=x", "--debug"])


# ---- real processes: a traceback-free exit, kill -9 + --resume, read-only and full file systems ---------------
def _dtn(*args, timeout=600, **kw):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dtn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def test_process_exit_status_and_one_line(env, tmp_path):
    r = _dtn("train", *env["base"], "--out", tmp_path / "r", "--set", "train.lr=1e-3x")
    assert r.returncode == 2 and r.stderr.strip() == \
        "dtn train: config error: train.lr = 1e-3x: not a number; allowed: a number > 0.0", r.stderr


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    df = make_frame(3000, seed=4)
    df.to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "s.yaml").write_text(SCHEMA)
    args = ["train", "--data-schema", tmp_path / "s.yaml", "--data", tmp_path / "t.csv", *SMALL, "--epochs", "6",
            "--set", "train.patience=10", "--set", "train.deterministic=true"]
    straight = _dtn(*args, "--out", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    # the same run, killed with SIGKILL as soon as its first checkpoint exists (so in epoch 2 or later); on a
    # starved machine the run could finish before the kill lands: then it is tried again in a new folder
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for attempt in range(3):
        out = tmp_path / f"b{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "dtn", *map(str, args), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while not (out / "last.pt").exists() and proc.poll() is None:
            assert time.time() < deadline, "no last.pt after 300 s"
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc.wait(timeout=60) == -signal.SIGKILL and not (out / "metrics.json").exists():
            break
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    shutil.move(str(out), str(tmp_path / "b"))
    resumed = _dtn(*args, "--out", tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = (torch.load(tmp_path / d / "best.pt", weights_only=False) for d in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    for k in ("best_epoch", "epochs_run", "valid", "test", "fingerprint"):
        assert ma[k] == mb[k], k
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]


def _can_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


def _in_mount_ns(script: str, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PY=sys.executable)
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=str(tmp_path))


def test_real_read_only_and_full_file_systems(env, tmp_path):
    """A read-only --out fails before training; an export onto a full tmpfs exits 2 and leaves no partial file;
    a training run whose disk fills up after its first epoch keeps that epoch's files."""
    if not _can_mount():
        pytest.skip("needs a mount namespace (unshare -m, mount) to make read-only and full file systems")
    base = " ".join(f"'{a}'" for a in env["base"])
    best, last = (os.path.getsize(env["run"] / f) for f in ("best.pt", "last.pt"))
    size_k = (2 * best + last) // 1024 - (best // 2048)  # room for one epoch's files, not for the next best.pt
    os.makedirs(tmp_path / "ro" / "run")
    (tmp_path / "ro" / "run" / "keep.txt").write_text("old")
    for d in ("full", "disk"):
        os.makedirs(tmp_path / d)
    script = f"""
set -u
mount --bind ro ro && mount -o remount,bind,ro ro || exit 90
$PY -m dtn train {base} --out ro/run --epochs 1 > ro.out 2> ro.err; echo $? > ro.rc
mount -t tmpfs -o size=64k tmpfs full || exit 91
$PY -m dtn export --checkpoint '{env["run"] / "best.pt"}' --out full/art > full.out 2> full.err; echo $? > full.rc
ls -a full/art > full.ls 2>&1
mount -t tmpfs -o size={size_k}k tmpfs disk || exit 92
$PY -m dtn train {base} --out disk/run --epochs 3 --set train.patience=9 > disk.out 2> disk.err; echo $? > disk.rc
ls -a disk/run > disk.ls
"""
    r = _in_mount_ns(script, tmp_path)
    assert r.returncode == 0, r.stderr
    err = (tmp_path / "ro.err").read_text()
    assert (tmp_path / "ro.rc").read_text().strip() == "2" and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and "--out" in err and "Read-only file system" in err, err
    assert "epoch" not in (tmp_path / "ro.out").read_text()  # it stopped before training
    assert (tmp_path / "ro" / "run" / "keep.txt").read_text() == "old"
    err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2" and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and "No space left on device" in err, err
    assert not [f for f in (tmp_path / "full.ls").read_text().split() if f not in (".", "..")]
    err = (tmp_path / "disk.err").read_text()
    assert (tmp_path / "disk.rc").read_text().strip() == "2" and "Traceback" not in err, err
    assert "No space left on device" in err and "are intact" in err, err
    left = (tmp_path / "disk.ls").read_text().split()
    assert "last.pt" in left and "best.pt" in left and not [f for f in left if f.endswith(".tmp")], left
