"""The CLI against bad inputs and faults, as a hostile but fair user would try them.

Every case must end with exit status 2, one line on stderr naming the file, key or value, no
traceback, no Python warning, no exception class name, every file that existed before untouched
(and no temp file left) and no output folder created for a refused request. Classes: config
values, data and schema, checkpoints, resume, compare's reuse, the whole request checked before
any data is read (kind-specific schema keys, label columns, contradicting or ineffective settings,
each model's needs against the schema, --base), empty splits, example-data and analysis flags,
argument errors, output folders and the disk, the exported predictor. Then the successes the issue asked for: model selection without a
defined AUC, `--set train.lr=1e-3`, resume applying a new lr, stale temp files, file modes, and a
real `kill -9` during training followed by `--resume`, bit-exact with an uninterrupted run.
"""
import errno
import hashlib
import json
import lzma
import os
import re
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


CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b")


def expect_error(capsys, argv, *needles, protect=(), absent=()):
    """argv fails with exit 2 and one stderr line holding every needle, with no traceback, no Python warning and
    no exception class name; files under ``protect`` unchanged; the paths in ``absent`` (output folders) not
    created."""
    before = snapshot(*protect)
    rc, out, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    assert "Warning" not in err + out, err + out  # numpy / torch warnings, with their venv paths
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not CLASS_NAME.search(lines[0]), lines[0]
    assert snapshot(*protect) == before, "existing outputs changed"
    for folder in protect:
        for root, _, files in os.walk(folder):
            assert not [f for f in files if f.endswith(".tmp")], (root, files)
    for path in absent:
        assert not os.path.exists(path), f"{path} was created before the request was refused"
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


# ---- the whole request, checked before any data is read (dtn.request_check) -------------------------------
# --data names a file that does not exist: each refusal must come before the data are read
def _request(env, tmp_path, *extra, schema=None, small=SMALL):
    path = env["dir"] / "s.yaml"
    if schema is not None:
        path = tmp_path / "req.yaml"
        path.write_text(schema)
    return ["train", "--data-schema", path, "--data", tmp_path / "missing.csv", *small, "--out", tmp_path / "r", *extra]


def _without(*keys):
    """SMALL without its --set of ``keys`` (so a test can give them itself)."""
    out, i = [], 0
    while i < len(SMALL):
        if SMALL[i] == "--set" and SMALL[i + 1].split("=")[0] in keys:
            i += 2
            continue
        out.append(SMALL[i])
        i += 1
    return out


def _kind_cases():
    """Every kind-specific FeatureSpec key (from its metadata) on each feature kind it does not apply to."""
    from dtn.features.schema import KINDS, kind_keys

    values = {"transform": "log1p", "pooling": "mean", "delimiter": "';'", "bins": 4, "min_count": 2,
              "weight_separator": "':'", "weight_column": "w", "hash_buckets": 8, "hash_seed": 3}
    column = {"categorical": "c1", "numeric": "x1", "multi": "tags"}
    return [(key, kind, column[kind], values[key]) for key, kinds in kind_keys().items() for kind in KINDS
            if kind not in kinds]


FEATURES = "  - {columns: [c1, c2], kind: categorical}\n  - {columns: [x1, x2], kind: numeric}\n  - {name: tags, kind: multi}\n"


@pytest.mark.parametrize("key, kind, column, value", _kind_cases(), ids=lambda v: str(v))
def test_kind_specific_schema_keys(env, capsys, tmp_path, key, kind, column, value):
    assert FEATURES in SCHEMA
    one_each = "".join(f"  - {{name: {c}, kind: {k}{f', {key}: {value}' if c == column else ''}}}\n"
                       for c, k in (("c1", "categorical"), ("c2", "categorical"), ("x1", "numeric"), ("x2", "numeric"),
                                    ("tags", "multi")))
    expect_error(capsys, _request(env, tmp_path, schema=SCHEMA.replace(FEATURES, one_each)), "req.yaml",
                 f"({column})", f"{key} applies to", f"this feature is {kind}", absent=[tmp_path / "r"])


def test_kind_specific_key_at_its_default_value(env, capsys, tmp_path):
    """`transform: standard` (the default) on a categorical feature is refused as well: it was written for a reason."""
    schema = SCHEMA.replace("kind: categorical}", "kind: categorical, transform: standard}")
    expect_error(capsys, _request(env, tmp_path, schema=schema), "req.yaml", "features[0] (c1)",
                 "transform applies to numeric features only")


REQUEST_SCHEMA_CASES = {
    "same label column": ("[click, buy]", "[click, {name: ctr2, column: click}]",
                          ["labels: tasks ['click', 'ctr2'] read the same label column 'click'"]),
    "feature key of the wrong type": ("{name: tags, kind: multi}", "{name: tags, kind: multi, min_count: '5'}",
                                      ["features[2]: min_count = '5'", "an integer"]),
    "csv.header not a boolean": ("split:", "csv: {header: 'no'}\nsplit:", ["csv.header: true or false", "'no'"]),
    "split.seed not an integer": ("seed: 1", "seed: abc", ["split.seed: an integer >= 0", "'abc'"]),
    "chunk_rows a boolean": ("split:", "chunk_rows: true\nsplit:", ["chunk_rows: a positive integer", "True"]),
}


@pytest.mark.parametrize("case", list(REQUEST_SCHEMA_CASES))
def test_schema_refused_before_data(env, capsys, tmp_path, case):
    old, new, needles = REQUEST_SCHEMA_CASES[case]
    assert old in SCHEMA
    expect_error(capsys, _request(env, tmp_path, schema=SCHEMA.replace(old, new, 1)), "req.yaml", *needles,
                 absent=[tmp_path / "r"])


REQUEST_CASES = {
    # every --set checked, though a flag overrides its key
    "--set data.dataset=banana with --data-schema": (["--set", "data.dataset=banana"],
                                                     ["data.dataset = 'banana'", "'census', 'synthetic', 'table'"]),
    "--set contradicting --data-schema": (["--set", "data.dataset=census"],
                                          ["--set data.dataset=census contradicts --data-schema", "'table'"]),
    "--set contradicting --epochs": (["--epochs", "2", "--set", "train.epochs=5"],
                                     ["--set train.epochs=5 contradicts --epochs", "train.epochs = 2"]),
    "--set contradicting --threads": (["--set", "train.num_threads=4"], ["--set train.num_threads=4 contradicts --threads"]),
    "--dataset with --data-schema": (["--dataset", "census"], ["--data-schema and --dataset both set data.dataset"]),
    "--data-dir with --data": (["--data-dir", "/tmp"], ["both set data.path"]),
    "an overridden --set is checked too": (["--set", "train.lr=fast", "--set", "train.lr=0.01"],
                                           ["train.lr = fast", "not a number"]),
    # a setting without effect in this run
    "census key on a table": (["--set", "data.bucketize=4"], ["--set data.bucketize=4", "applies only where "
                                                              "data.dataset is 'census'", "(--data-schema)"]),
    "table split seed": (["--set", "data.split_seed=3"], ["data.split_seed applies only where data.dataset is 'census' "
                                                          "or 'synthetic'"]),
    "--workers without --stream": (["--workers", "2"], ["--workers: data.num_workers applies only where data.stream is "
                                                        "True"]),
    "min_lr of a constant schedule": (["--set", "train.min_lr=1e-5"], ["train.min_lr applies only where "
                                                                      "train.lr_schedule is 'cosine' or 'plateau'"]),
    "plateau key of a cosine schedule": (["--set", "train.lr_schedule=cosine", "--set", "train.plateau_patience=3"],
                                         ["train.plateau_patience applies only where train.lr_schedule is 'plateau'",
                                          "(--set train.lr_schedule=cosine)"]),
    # the model choice
    "--set model.name unknown": (["--set", "model.name=banana"], ["model.name = 'banana'", "'dtn'"]),
    "--set model.name contradicting --model": (["--model", "dtn", "--set", "model.name=mmoe"],
                                               ["--set model.name=mmoe contradicts --model dtn"]),
    # each model's needs against the schema, naming the config, the schema and the key
    "task_order": (["--set", "model.task_order=[buy, sale]"], ["model.task_order = ['buy', 'sale']",
                                                               "(--set model.task_order=[buy, sale])",
                                                               "['click', 'buy'] of", "s.yaml"]),
    "early_stop_metric task": (["--set", "train.early_stop_metric=auc/sale"], ["'auc/sale'", "'auc/click'", "s.yaml"]),
    "task_weights length": (["--set", "train.task_weights=[1, 2, 3]"], ["train.task_weights = [1.0, 2.0, 3.0]",
                                                                       "3 weight(s) for the 2 tasks", "s.yaml"]),
    "no experts": (["--model", "ple", "--set", "model.num_specific_experts=0", "--set", "model.num_shared_experts=0"],
                   ["ple: model.num_specific_experts and model.num_shared_experts are both 0", "at least one expert"]),
    "memonet field of another kind": (["--model", "dtn", "--set", "model.memonet={fields: [c1, x1]}"],
                                      ["model.memonet.fields = ['c1', 'x1']", "'x1' is a numeric feature of", "s.yaml",
                                       "['c1', 'c2']"]),
    "memonet field position": (["--model", "sfm", "--set", "model.memonet={fields: [0, 5]}"],
                               ["model.memonet.fields = [0, 5]", "position 5 is not a categorical feature"]),
    "a FIM kind twice": (["--set", "model.fims=[gdcn, gdcn]"], ["model.fims = ['gdcn', 'gdcn']", "more than once"]),
    "the train file as the valid file": (["--valid", "{missing}"], ["missing.csv: named as both the train and the "
                                                                    "valid file"]),
    "the test file as the valid file": (["--valid", "{t}", "--test", "{t}"], ["t.csv: named as both the valid and "
                                                                             "the test file"]),
    "option without a space": (["--set", "model.gdcn={num_layers:3}"], ["model.gdcn: unknown option(s) ['num_layers:3']",
                                                                       "a space after the colon"]),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_request_refused_before_data(env, capsys, tmp_path, case):
    extra, needles = REQUEST_CASES[case]
    small = _without("model.memonet") if "memonet" in case else SMALL
    extra = [a.replace("{missing}", str(tmp_path / "missing.csv")).replace("{t}", str(env["dir"] / "t.csv"))
             for a in extra]
    expect_error(capsys, _request(env, tmp_path, *extra, small=small), *needles, absent=[tmp_path / "r"])


ONE_CATEGORICAL = SCHEMA.replace("{columns: [c1, c2], kind: categorical}", "{name: c1, kind: categorical}")


@pytest.mark.parametrize("model, extra, key", [("dtn", [], "model.fims"), ("sfm", [], "model.fims"),
                                               ("tfi", ["--set", "model.tfi_fim=memonet"], "model.tfi_fim")])
def test_memonet_needs_two_categorical_fields(env, capsys, tmp_path, model, extra, key):
    small = _without("model.memonet")
    where = "--set model.tfi_fim=memonet" if extra else "cpu.yaml"  # the config file, or the --set that chose it
    fix = "--set model.tfi_fim=gdcn" if extra else "--set model.fims=[gdcn, masknet]"
    expect_error(capsys, _request(env, tmp_path, "--model", model, *extra, schema=ONE_CATEGORICAL, small=small),
                 f"{model}: {key}", where, "req.yaml has 1 categorical feature(s) ['c1']", "at least 2", fix,
                 absent=[tmp_path / "r"])


def test_compare_base_must_be_among_models(env, capsys, tmp_path):
    expect_error(capsys, ["compare", "--models", "mmoe,ple", "--base", "shared_bottom", *env["base"], "--out",
                          tmp_path / "c"], "--base shared_bottom", "one of --models ['mmoe', 'ple']",
                 absent=[tmp_path / "c"])
    expect_error(capsys, ["compare", "--models", "mmoe,mmoe", *env["base"], "--out", tmp_path / "c"],
                 "--models lists ['mmoe'] more than once", absent=[tmp_path / "c"])
    expect_error(capsys, ["compare", "--models", "mmoe", "--set", "model.name=dtn", *env["base"], "--out", tmp_path / "c"],
                 "--set model.name=dtn", "--models", absent=[tmp_path / "c"])
    expect_error(capsys, ["table3", "--models", "mmoe,dtn", "--base", "ple", *env["base"], "--out", tmp_path / "c"],
                 "--base ple", absent=[tmp_path / "c"])


def test_compressed_file_hint(env, capsys, tmp_path):
    """A .gz table: one message, whether format: is set or not (never a hint that is then refused)."""
    import gzip

    (tmp_path / "t.csv.gz").write_bytes(gzip.compress((env["dir"] / "t.csv").read_bytes()))
    for schema in (SCHEMA, SCHEMA + "format: csv\n"):
        (tmp_path / "g.yaml").write_text(schema)
        line = expect_error(capsys, ["train", "--data-schema", tmp_path / "g.yaml", "--data", tmp_path / "t.csv.gz",
                                     *SMALL, "--out", tmp_path / "r"], "t.csv.gz: a gzip-compressed file",
                            "decompress it", absent=[tmp_path / "r"])
        assert "format:" not in line


def test_a_refused_data_file_leaves_no_out_folder(env, capsys, tmp_path):
    argv = _table_case(env, tmp_path, frame_edit=lambda df: _set(df, "buy", 10, 3))
    expect_error(capsys, argv, "column 'buy'", "not 0 or 1", absent=[tmp_path / "r"])


# ---- empty splits ------------------------------------------------------------------------------------------
def test_empty_test_split_trains_with_a_notice_and_evaluate_refuses(env, capsys, tmp_path):
    schema = tmp_path / "t0.yaml"
    schema.write_text(SCHEMA.replace("test: 0.2", "test: 0.0"))
    rc, out, err = run_cli(["train", "--data-schema", schema, "--data", env["dir"] / "t.csv", *SMALL, "--model", "mmoe",
                            "--epochs", "1", "--out", tmp_path / "r"], capsys)
    assert rc == 0, err
    assert "Warning" not in err + out and "site-packages" not in err, err
    assert "note: the test split is empty" in out and "t0.yaml: split.test is 0" in out, out
    assert "test: AUC n/a, LogLoss n/a: the test split is empty (0 rows)" in out, out
    expect_error(capsys, ["evaluate", "--checkpoint", tmp_path / "r" / "best.pt", "--split", "test", "--out",
                          tmp_path / "m.json"], "--split test: the test split is empty", "t0.yaml",
                 protect=[tmp_path / "r"], absent=[tmp_path / "m.json"])
    assert run_cli(["evaluate", "--checkpoint", tmp_path / "r" / "best.pt", "--split", "valid"], capsys)[0] == 0


# ---- example-data validates its arguments ------------------------------------------------------------------
EXAMPLE_DATA_CASES = {
    "rows 0": (["--rows", "0"], ["--rows 0", "an integer >= 1"]),
    "rows -5": (["--rows", "-5"], ["--rows -5", "an integer >= 1"]),
    "seed": (["--seed", "-1"], ["--seed -1", ">= 0"]),
    "row groups 0": (["--row-group-rows", "0", "--out", "{new}/x.parquet"], ["--row-group-rows 0"]),
    "row groups of a csv": (["--row-group-rows", "100"], ["--row-group-rows 100", "applies to a Parquet --out only"]),
    "extension": (["--out", "{new}/x.txt"], ["--out", "x.txt", ".csv or .parquet"]),
    "folder": (["--out", "{tmp}/folder.csv"], ["--out", "folder.csv: a folder"]),
}


@pytest.mark.parametrize("case", list(EXAMPLE_DATA_CASES))
def test_example_data_arguments(capsys, tmp_path, case):
    extra, needles = EXAMPLE_DATA_CASES[case]
    (tmp_path / "keep.csv").write_text("old")
    (tmp_path / "folder.csv").mkdir()
    extra = [a.format(new=tmp_path / "new", tmp=tmp_path) for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "new" / "x.csv")]
    expect_error(capsys, ["example-data", "--layout", "aliexpress", *out, *extra], *needles, protect=[tmp_path],
                 absent=[tmp_path / "new"])


# ---- checkpoints and exports: whole messages, no output folder before the inputs are checked -----------------
def test_truncated_checkpoint_message_is_whole(env, capsys, tmp_path):
    p = tmp_path / "c.pt"
    p.write_bytes((env["run"] / "best.pt").read_bytes()[:3000])
    line = expect_error(capsys, ["evaluate", "--checkpoint", p], "c.pt: not a readable checkpoint (3,000 bytes",
                        protect=[tmp_path])
    assert line.endswith(")") and "If yo" not in line, line


@pytest.fixture(scope="module")
def mmoe_run(env):
    out = env["dir"] / "mmoe"
    assert main(["train", "--model", "mmoe", "--out", str(out), "--epochs", "1", *map(str, env["base"])]) == 0
    return out


def test_export_refuses_before_creating_its_folder(env, mmoe_run, capsys, tmp_path):
    ckpt = mmoe_run / "best.pt"
    expect_error(capsys, ["export", "--checkpoint", ckpt, "--trim-threshold", "0.1", "--out", tmp_path / "art"],
                 "dtn export --trim-threshold needs a DTN model", "'mmoe'", protect=[mmoe_run],
                 absent=[tmp_path / "art"])
    expect_error(capsys, ["export", "--checkpoint", env["run"] / "best.pt", "--trim-threshold", "1.5", "--out",
                          tmp_path / "art"], "--trim-threshold 1.5", "[0, 1)", absent=[tmp_path / "art"])
    expect_error(capsys, ["export", "--checkpoint", ckpt, "--data", env["dir"] / "t.csv", "--out", tmp_path / "art"],
                 "--data is read only with --trim-threshold", absent=[tmp_path / "art"])


def test_evaluate_flags_against_the_checkpoint(env, capsys, tmp_path):
    best = env["run"] / "best.pt"
    expect_error(capsys, ["evaluate", "--checkpoint", best, "--data-dir", tmp_path], "--data-dir",
                 "data.dataset = 'table'", "--data", protect=[env["run"]])
    expect_error(capsys, ["evaluate", "--checkpoint", best, "--out", tmp_path], "--out", "a folder",
                 protect=[env["run"], tmp_path])
    expect_error(capsys, ["evaluate", "--checkpoint", best, "--out", tmp_path / "new" / "m.json", "--data",
                          tmp_path / "gone.csv"], "gone.csv", absent=[tmp_path / "new"])


@pytest.mark.parametrize("argv, needles", [
    (["importance", "--max-rows", "-1"], ["--max-rows -1", ">= 0"]),
    (["importance", "--repeats", "0"], ["--repeats 0", ">= 1"]),
    (["trim", "--threshold", "1.5"], ["--threshold 1.5", "[0, 1)"]),
    (["trim", "--threshold", "0.1", "--repeats", "0"], ["--repeats 0", ">= 1"]),
    (["trim", "--threshold", "0.1", "--latency-batch", "0"], ["--latency-batch 0", ">= 1"]),
    (["tsne", "--perplexity", "-1"], ["--perplexity -1.0", "> 0"]),
    (["tsne", "--samples", "50", "--perplexity", "80"], ["--perplexity 80.0", "below --samples (50)"]),
], ids=["importance rows", "importance repeats", "trim threshold", "trim repeats", "trim batch", "tsne perplexity",
        "tsne perplexity over samples"])
def test_analysis_flags_before_any_work(env, capsys, tmp_path, argv, needles):
    expect_error(capsys, [*argv, "--checkpoint", env["run"] / "best.pt", "--out", tmp_path / "a"], *needles,
                 protect=[env["run"]], absent=[tmp_path / "a"])


@pytest.mark.parametrize("argv, needles", [
    (["train", "--epochs", "abc"], ["dtn train: argument error", "--epochs", "'abc'", "--help"]),
    (["example-data", "--layout", "criteo", "--out", "x.csv"], ["dtn example-data: argument error", "'criteo'"]),
    (["evaluate"], ["--checkpoint"]),
], ids=["int", "choice", "required"])
def test_argument_errors_are_one_line(capsys, argv, needles):
    expect_error(capsys, argv, *needles)


@pytest.mark.parametrize("what, needles", [
    ("data folder", ["a folder, not a data file"]),
    ("empty schema", ["req.yaml: the schema must be a mapping", "got an empty file"]),
    ("list schema", ["req.yaml: the schema must be a mapping", "got a list"]),
])
def test_files_of_the_wrong_kind(env, capsys, tmp_path, what, needles):
    if what == "data folder":
        argv = ["train", "--data-schema", env["dir"] / "s.yaml", "--data", tmp_path, *SMALL, "--out", tmp_path / "r"]
    else:
        argv = _request(env, tmp_path, schema="" if what == "empty schema" else "- labels\n")
    expect_error(capsys, argv, *needles, absent=[tmp_path / "r"])


def test_repeated_set_takes_the_later_value_with_a_note(env):
    from dtn.cli import build_parser
    from dtn.request_check import request_config

    notes = []
    args = build_parser().parse_args(["train", "--set", "train.lr=0.1", "--set", "train.lr=0.01", "--set",
                                      "model.memonet={fields: 3}", "--set", "model.memonet={num_buckets: 50}"])
    cfg, explicit = request_config(args, note=notes.append)
    assert cfg.train.lr == 0.01 and cfg.model.memonet["fields"] == 3 and cfg.model.memonet["num_buckets"] == 50
    assert len(notes) == 1 and "--set train.lr=0.1 is overridden by the later --set train.lr=0.01" in notes[0]
    assert explicit["train.lr"] == "--set train.lr=0.01"


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
