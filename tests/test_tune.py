"""dtn tune on the synthetic data: a short study beats a bad default, studies resume, the best config loads
and trains, bad search spaces are named; and the significance functions of Table 3 on known inputs."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("optuna")

from conftest import small_model_config  # noqa: E402
from dtn.analysis import significance as S  # noqa: E402
from dtn.cli import main  # noqa: E402
from dtn.config import Config, ConfigError, DataConfig, TrainConfig, load_config  # noqa: E402
from dtn.data import load_dataset  # noqa: E402
from dtn.train.metrics import auc  # noqa: E402
from dtn.tune import (SearchSpaceError, StaleStudyError, StudySettings, default_params, load_search_space,  # noqa: E402
                      run_study)

ROWS = 4000
# a space with the learning rate only: the planted problem is a default lr 30x too small
LR_SPACE = """study:
  sampler: {type: tpe, startup_trials: 3}
  pruner: {type: median, startup_trials: 2, warmup_epochs: 1}
common:
  train.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
"""


def _base(lr=1e-4, **train):
    model = small_model_config(fim_dim=8, tower_hidden=[8], expert_hidden=[16], bottom_hidden=[16],
                               masknet={"mask_hidden": 8, "block_dim": 8}, memonet={"num_buckets": 97})
    t = TrainConfig(lr=lr, batch_size=256, eval_batch_size=4096, epochs=3, patience=3, progress=False, seed=5,
                    num_threads=1)
    return Config(model=model, train=dataclasses.replace(t, **train),
                  data=DataConfig(dataset="synthetic", synthetic_rows=ROWS, split_seed=3))


@pytest.fixture(scope="module")
def synth():
    return load_dataset(_base().data, progress=False)


@pytest.fixture(scope="module")
def lr_space(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "lr.yaml"
    path.write_text(LR_SPACE)
    return load_search_space(str(path))


def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def keep_threads():
    yield from _threads()


# ---- the planted problem ----------------------------------------------------------------------------
def test_short_study_beats_a_too_small_default_lr(synth, lr_space, tmp_path):
    settings = StudySettings(trials=6, max_epochs=2, seed=0)
    s = run_study("shared_bottom", synth, _base(), lr_space, str(tmp_path), settings, log=lambda *_: None)
    assert s["counts"]["finished"] == 6
    assert s["default"]["number"] == 0 and s["trials"][0]["params"]["train.lr"] == pytest.approx(1e-4)
    best = s["best"]
    assert best["params"]["train.lr"] > 1e-3, s["trials"]
    assert best["value"] > s["default"]["value"] + 0.02, (best, s["default"])
    # the written config carries the tuned lr, names the model, and loads with load_config
    cfg = load_config(str(tmp_path / "shared_bottom" / "best.yaml"))
    assert cfg.train.lr == pytest.approx(best["params"]["train.lr"]) and cfg.model.name == "shared_bottom"
    assert cfg.train.epochs == 3  # the base config's, not the study's cap
    assert (tmp_path / "shared_bottom" / "study.db").exists() and not (tmp_path / "shared_bottom" / "study.lock").exists()


def test_tuning_never_reads_the_test_split(synth, lr_space, tmp_path):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the test split was read ({name})")

        def __len__(self):
            raise AssertionError("the test split was read (len)")

    sealed = dataclasses.replace(synth, test=Untouchable())
    s = run_study("mmoe", sealed, _base(lr=3e-3), lr_space, str(tmp_path), StudySettings(trials=2, max_epochs=1),
                  log=lambda *_: None)
    assert s["counts"]["complete"] == 2


def test_subsample_is_fixed_and_from_train_only(synth, lr_space, tmp_path):
    events = []
    run_study("shared_bottom", synth, _base(lr=3e-3), lr_space, str(tmp_path),
              StudySettings(trials=1, subsample=0.25, max_epochs=1, seed=7), on_event=events.append, log=lambda *_: None)
    start = next(e for e in events if e["event"] == "start")
    assert start["rows"] == round(0.25 * len(synth.train))


# ---- resume ---------------------------------------------------------------------------------------
def test_interrupted_study_resumes_and_reruns_the_cut_trial(synth, lr_space, tmp_path, monkeypatch):
    import optuna

    from dtn.train import Trainer

    base, out = _base(), str(tmp_path)
    settings = StudySettings(trials=3, max_epochs=1, seed=1)
    real_fit, calls = Trainer.fit, []

    def fit_then_interrupt(self, *a, **k):
        calls.append(self.cfg.lr)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third trial
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", fit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_study("shared_bottom", synth, base, lr_space, out, settings, log=lambda *_: None)
    monkeypatch.setattr(Trainer, "fit", real_fit)
    db = f"sqlite:///{tmp_path / 'shared_bottom' / 'study.db'}"
    # a kill -9 leaves its trial RUNNING: fake one more such trial
    study = optuna.load_study(study_name="shared_bottom", storage=db)
    first_two = [(t.number, t.value) for t in study.trials[:2]]
    killed = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)})
    assert not (tmp_path / "shared_bottom" / "study.lock").exists()  # the interrupted run released its lock
    logs = []
    s = run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=5, max_epochs=1, seed=1),
                  log=logs.append)
    assert "2 interrupted trial(s) (2, 3) queued again" in " ".join(logs)
    study = optuna.load_study(study_name="shared_bottom", storage=db)
    assert [(t.number, t.value) for t in study.trials[:2]] == first_two  # finished trials are not rerun
    states = {t.number: t.state.name for t in study.trials}
    assert states[2] == states[3] == "FAIL" and s["counts"]["finished"] == 5
    retried = {t.user_attrs.get("retry_of"): t.params["train.lr"] for t in study.trials if t.user_attrs.get("retry_of")}
    assert retried[2] == pytest.approx(calls[2]) and retried[3] == pytest.approx(killed.params["train.lr"])
    # an extended budget runs only the difference; a finished study is only summarised
    s2 = run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=5, max_epochs=1, seed=1),
                   log=lambda *_: None)
    assert len(s2["trials"]) == len(s["trials"])
    # a retry that is cut off too is not queued a third time: a fresh draw takes its place
    study = optuna.load_study(study_name="shared_bottom", storage=db)
    cut = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)})
    cut.set_user_attr("retry_of", 2)
    logs = []
    s3 = run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=6, max_epochs=1, seed=1),
                   log=logs.append)
    assert "queued again" not in " ".join(logs) and s3["counts"]["finished"] == 6
    study = optuna.load_study(study_name="shared_bottom", storage=db)
    assert not any(t.user_attrs.get("retry_of") == cut.number for t in study.trials)


def test_resume_refuses_other_settings_and_a_live_owner(synth, lr_space, tmp_path):
    base, out = _base(lr=3e-3), str(tmp_path)
    run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=1, max_epochs=1), log=lambda *_: None)
    with pytest.raises(StaleStudyError, match=r"study.db holds a study of shared_bottom with other settings \(max_epochs"):
        run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=2, max_epochs=2), log=lambda *_: None)
    with pytest.raises(StaleStudyError, match="base_config"):
        run_study("shared_bottom", synth, _base(lr=1e-3), lr_space, out, StudySettings(trials=2, max_epochs=1),
                  log=lambda *_: None)
    s = run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=1, max_epochs=2), fresh=True,
                  log=lambda *_: None)
    assert len(s["trials"]) == 1
    (tmp_path / "shared_bottom" / "study.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(StaleStudyError, match=f"being run by process {os.getppid()}"):
        run_study("shared_bottom", synth, base, lr_space, out, StudySettings(trials=1, max_epochs=2), log=lambda *_: None)


# ---- the CLI: tune, then train and table3 with the tuned configs ----------------------------------------
SMALL = ["--dataset", "synthetic", "--set", f"data.synthetic_rows={ROWS}", "--set", "model.embed_dim=4",
         "--set", "model.fim_dim=8", "--set", "model.memonet.num_buckets=97", "--set", "model.masknet.mask_hidden=8",
         "--set", "model.masknet.block_dim=8", "--set", "model.expert_hidden=[16]", "--set", "model.bottom_hidden=[16]",
         "--set", "model.tower_hidden=[8]", "--set", "train.batch_size=256", "--set", "train.progress=false",
         "--threads", "1"]


def test_cli_tune_then_train_and_table3(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(LR_SPACE + "models:\n  dtn:\n    model.gdcn.num_layers: {type: int, low: 1, high: 2}\n")
    tuned = tmp_path / "tuned"
    assert main(["tune", *SMALL, "--set", "train.lr=1e-4", "--models", "shared_bottom,dtn", "--space", str(space),
                 "--trials", "3", "--max-epochs", "1", "--out", str(tuned)]) == 0
    out = capsys.readouterr().out
    assert "| shared_bottom | 3 (" in out and "| dtn | 3 (" in out
    summary = json.loads((tuned / "tune.json").read_text())
    assert set(summary["studies"]) == {"shared_bottom", "dtn"}
    dtn_yaml = tuned / "dtn" / "best.yaml"
    best = summary["studies"]["dtn"]["best"]["params"]
    assert set(best) == {"train.lr", "model.gdcn.num_layers"}
    # dtn train --config best.yaml trains the model it was tuned for, with its values
    assert main(["train", "--config", str(dtn_yaml), "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["model"] == "dtn"
    ckpt = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert ckpt["config"]["train"]["lr"] == pytest.approx(best["train.lr"])
    assert ckpt["config"]["model"]["gdcn"]["num_layers"] == best["model.gdcn.num_layers"]
    # table3 with every model's tuned config, 2 seeds, significance
    t3 = tmp_path / "t3"
    args = ["table3", "--tuned", str(tuned), "--models", "shared_bottom,dtn", "--seeds", "1,2", "--epochs", "1",
            "--threads", "1", "--bootstrap", "200", "--out", str(t3)]
    assert main(args) == 0
    s3 = json.loads((t3 / "compare.json").read_text())
    assert s3["configs"]["dtn"]["train"]["lr"] == pytest.approx(best["train.lr"])
    sig = s3["significance"]
    assert [r["model"] for r in sig["rows"]] == ["shared_bottom", "shared_bottom"] and sig["resamples"] == 200
    for r in sig["rows"]:
        assert r["ci_low"] <= r["ci_high"] and r["verdict"] in ("better", "worse", "not significant")
    md = (t3 / "compare.md").read_text()
    assert "| DTN vs | task |" in md and "| Shared-Bottom | task1 |" in md
    # the cached test predictions reproduce each run's test AUC
    run = t3 / "dtn" / "seed1"
    probs = np.load(run / "test_predictions.npz")["probs"]
    m = json.loads((run / "metrics.json").read_text())
    labels = load_dataset(load_config(str(dtn_yaml)).data, progress=False).test.labels.numpy()
    assert auc(labels[:, 0], probs[:, 0]) == pytest.approx(m["test"]["task1"]["auc"], abs=1e-6)
    # a rerun reuses every run and its predictions and gives the same significance
    capsys.readouterr()
    assert main(args) == 0
    assert "] training" not in capsys.readouterr().out
    assert json.loads((t3 / "compare.json").read_text())["significance"]["rows"] == sig["rows"]
    # a stale cache under the same fingerprint (the run retrained) is recomputed from best.pt, not trusted
    with np.load(run / "test_predictions.npz") as z:
        key = z["key"]
    np.savez(run / "test_predictions.npz", probs=1.0 - probs, key=key)
    assert main(args) == 0
    assert json.loads((t3 / "compare.json").read_text())["significance"]["rows"] == sig["rows"]
    assert np.array_equal(np.load(run / "test_predictions.npz")["probs"], probs)


@pytest.mark.parametrize("argv, needles", [
    (["tune", "--trials", "0"], ["--trials 0", "an integer >= 1"]),
    (["tune", "--subsample", "1.5"], ["--subsample 1.5", "(0, 1]"]),
    (["tune", "--models", "dtn,nope"], ["unknown model 'nope'"]),
    (["tune", "--space", "/nonexistent.yaml"], ["no search-space file"]),
    (["table3", "--tuned", "{tmp}", "--models", "shared_bottom,dtn"], ["no tuned config", "shared_bottom/best.yaml"]),
    (["table3", "--tuned", "{tmp}", "--config", "cpu"], ["give --config or --tuned, not both"]),
])
def test_cli_errors(tmp_path, capsys, argv, needles):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_without_optuna_a_clear_message(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", "--out", str(tmp_path)]) == 2
    assert "pip install 'dtn-kernels[tune]'" in capsys.readouterr().err


# ---- search spaces ----------------------------------------------------------------------------------
def test_packaged_space_covers_every_table3_model_and_its_base_config():
    from dtn.analysis.table3 import TABLE3_MODELS

    space, cfg = load_search_space("cpu"), load_config("cpu")
    for m in TABLE3_MODELS:
        params = space.for_model(m)
        assert {"train.lr", "train.batch_size", "train.weight_decay", "model.embed_dim", "model.dropout"} <= set(params)
        # trial 0 is the cpu config itself: each of its values lies in the space
        assert set(default_params(cfg, params)) == set(params), m
    assert "model.num_experts" in space.for_model("mmoe") and "model.fim_dim" in space.for_model("tfi")
    assert "model.memonet.num_buckets" in space.for_model("dtn") and "model.memonet.num_buckets" not in space.for_model("tfi")


BAD_SPACES = [
    ("common: {train.lrr: {type: float, low: 0.1, high: 1}}", ["common.train.lrr", "unknown config key train.lrr"]),
    ("common: {data.numeric_ids: {type: int, low: 1, high: 3}}", ["common.data.numeric_ids", "data.* cannot be tuned"]),
    ("common: {train.seed: {type: int, low: 1, high: 3}}", ["train.seed cannot be tuned"]),
    ("common: {train.lr: {type: uniform, low: 0.1, high: 1}}", ["common.train.lr", "type 'uniform'"]),
    ("common: {train.lr: {type: float, low: 0.1, high: 0.01}}", ["common.train.lr", "low = 0.1 must be < high"]),
    ("common: {train.weight_decay: {type: float, low: 0, high: 0.01, log: true}}", ["log: true needs low > 0"]),
    ("common: {model.dropout: {type: float, low: 0.0, high: 1.5}}", ["common.model.dropout", "1.5", "model.dropout"]),
    ("common: {train.batch_size: {type: categorical, choices: [512, 0]}}", ["train.batch_size", "the value 0"]),
    ("models: {dtn: {model.masknet.mode: {type: categorical, choices: [serial, diagonal]}}}",
     ["models.dtn.model.masknet.mode", "'diagonal'"]),
    ("models: {dtn: {model.gdcn.depth: {type: int, low: 1, high: 3}}}", ["unknown option 'depth' of model.gdcn"]),
    ("models: {dtn: {model.gdcn: {type: int, low: 1, high: 3}}}", ["tune the options of model.gdcn one by one"]),
    ("models: {dnt: {train.lr: {type: float, low: 0.1, high: 1}}}", ["models", "unknown model 'dnt'"]),
    ("families: {f: {models: [mmoe], space: {train.lr: {type: int, low: 1, high: 2.5}}}}",
     ["families.f.space.train.lr", "high = 2.5"]),
    ("commons: {}", ["unknown section(s) ['commons']"]),
    ("study: {pruner: {type: hyperband}}", ["study.pruner.type", "'hyperband'"]),
    ("common: {train.lr: [0.1, 1]}", ["common.train.lr", "a parameter mapping"]),
    ("common: {train.lr: {type: float, low: 0.1, high: 1, stepp: 2}}", ["unknown setting(s) ['stepp']"]),
    ("common: [", ["not a valid YAML file"]),
]


@pytest.mark.parametrize("text, needles", BAD_SPACES, ids=[t[:40] for t, _ in BAD_SPACES])
def test_search_space_errors_name_the_key(tmp_path, text, needles):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SearchSpaceError) as exc:
        load_search_space(str(path))
    for n in needles + [str(path)]:
        assert n in str(exc.value), str(exc.value)


def test_search_space_error_through_the_cli(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(BAD_SPACES[0][0])
    assert main(["tune", "--space", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dtn tune: config error: search space") and "train.lrr" in err and "\n" not in err


def test_list_choices_round_trip(synth, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"common": {"model.tower_hidden": {"type": "categorical", "choices": [[8], [16, 8]]}}}))
    s = run_study("shared_bottom", synth, _base(lr=3e-3), load_search_space(str(path)), str(tmp_path / "o"),
                  StudySettings(trials=2, max_epochs=1), log=lambda *_: None)
    assert all(t["params"]["model.tower_hidden"] in ([8], [16, 8]) for t in s["trials"])
    assert load_config(str(tmp_path / "o" / "shared_bottom" / "best.yaml")).model.tower_hidden in ([8], [16, 8])


# ---- significance on known inputs -----------------------------------------------------------------------
def test_paired_tests_known_values():
    r = S.paired_tests([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    # t = mean / (sd / sqrt(n)) = 3 / (1.5811 / 2.2361) = 4.2426 on 4 df; exact Wilcoxon: 2 / 2**5
    assert r["t"] == pytest.approx(4.242641, rel=1e-6) and r["p_t"] == pytest.approx(0.013236, abs=1e-6)
    assert r["p_wilcoxon"] == pytest.approx(0.0625) and r["mean_diff"] == 3 and r["std_diff"] == pytest.approx(1.581139)
    same = S.paired_tests([0.9, 0.8], [0.9, 0.8])
    assert same["p_t"] == 1.0 and same["p_wilcoxon"] == 1.0
    shift = S.paired_tests([0.91, 0.81, 0.71], [0.9, 0.8, 0.7])  # a constant difference: t is infinite
    assert shift["p_t"] == 0.0
    assert math.isnan(S.paired_tests([0.9], [0.8])["p_t"])
    with pytest.raises(ValueError, match="same length"):
        S.paired_tests([1, 2], [1])


def test_min_detectable_difference():
    # large n: the normal approximation (z_0.975 + z_0.8) * sd / sqrt(n)
    assert S.min_detectable_difference(1.0, 400) == pytest.approx((1.959964 + 0.841621) / 20, rel=0.01)
    # 5 seeds: the noncentral t gives about 1.68 sd, and the test's power there is 0.8 by simulation
    mde = S.min_detectable_difference(1.0, 5)
    assert mde == pytest.approx(1.682, abs=0.01)
    from scipy import stats

    d = np.random.default_rng(0).normal(mde, 1.0, size=(20000, 5))
    p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.015)
    assert S.min_detectable_difference(0.0, 5) == 0.0 and math.isnan(S.min_detectable_difference(1.0, 1))


def test_holm_known_values():
    assert S.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = S.holm([0.2, float("nan"), 0.001])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1]) and out[2] == pytest.approx(0.002)


def test_weighted_auc_equals_auc_on_repeated_rows():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.3).astype(float)
    p = np.round(rng.random(500), 2)  # many ties
    w = S.resample_counts(rng, 500, 6)
    assert np.all(w.sum(axis=1) == 500)
    got = S.weighted_auc(y, p, w)
    for i in range(6):
        idx = np.repeat(np.arange(500), w[i].astype(int))
        assert got[i] == pytest.approx(auc(y[idx], p[idx]), abs=1e-12)
    assert S.weighted_auc(y, p, np.ones((1, 500)))[0] == pytest.approx(auc(y, p), abs=1e-12)
    assert np.isnan(S.weighted_auc(y, p, (1 - y)[None, :]))[0]  # no positive in the resample


def test_bootstrap_interval_known_cases():
    rng = np.random.default_rng(1)
    n = 2000
    y = (rng.random((n, 1)) < 0.3).astype(float)
    good = np.clip(y + rng.normal(0, 0.6, (n, 1)), 0, 1)
    noise = rng.random((n, 1))
    preds = {"good": np.stack([good, good]), "same": np.stack([good, good]), "noise": np.stack([noise, noise])}
    boot = S.bootstrap_aucs(y, preds, resamples=300, seed=0)
    same = S.bootstrap_diff(boot["good"], boot["same"])[0]
    assert same["ci_low"] == same["ci_high"] == 0.0 and same["p_boot"] == 1.0
    better = S.bootstrap_diff(boot["good"], boot["noise"])[0]
    point = auc(y[:, 0], good[:, 0]) - auc(y[:, 0], noise[:, 0])
    assert 0 < better["ci_low"] < point < better["ci_high"] and better["p_boot"] == 0.0
    # the same seed draws the same resamples
    again = S.bootstrap_aucs(y, {"good": preds["good"]}, resamples=300, seed=0)
    assert np.array_equal(again["good"], boot["good"])


def test_without_a_bootstrap_the_t_test_decides():
    """--bootstrap 0: the intervals are n/a, and a clear t-test result still gives a verdict."""
    rng = np.random.default_rng(3)
    base = 0.95 + rng.normal(0, 0.0005, size=(5, 1))
    aucs = {"dtn": base + 0.01, "sb": base, "worse_than": base + 0.02}
    boot = {m: np.full((5, 1, 1), np.nan) for m in aucs}
    verdict = {r["model"]: r["verdict"] for r in S.compare_to("dtn", aucs, boot, ["income"])["rows"]}
    assert verdict == {"sb": "better", "worse_than": "worse"}


def test_without_test_seals_streamed_data_too():
    """Data without in-memory frames (streamed) get their test split sealed the same way."""
    from dtn.tune import subsample_rows, without_test

    @dataclasses.dataclass
    class Streamed:
        train: object
        test: object

    sealed = without_test(Streamed(train=[1, 2, 3], test=[4]))
    assert sealed.train == [1, 2, 3]
    with pytest.raises(RuntimeError, match="must not look at the test split"):
        len(sealed.test)
    with pytest.raises(ConfigError, match="cannot be subsampled"):
        subsample_rows([1, 2, 3], 0.5, seed=0)


def test_compare_to_verdicts():
    rng = np.random.default_rng(2)
    base = 0.95 + rng.normal(0, 0.0005, size=(5, 2))
    aucs = {"dtn": base + [0.01, 0.0], "sb": base, "worse_than": base + [0.02, 0.0]}
    # bootstrap AUCs consistent with them: a tiny spread around the per-seed values
    boot = {m: a[:, None, :] + rng.normal(0, 0.001, size=(5, 400, 2)) for m, a in aucs.items()}
    sig = S.compare_to("dtn", aucs, boot, ["income", "marital"])
    verdict = {(r["model"], r["task"]): r["verdict"] for r in sig["rows"]}
    assert verdict[("sb", "income")] == "better" and verdict[("worse_than", "income")] == "worse"
    assert verdict[("sb", "marital")] == "not significant"  # identical AUCs
    assert all(r["p_t_holm"] >= r["p_t"] for r in sig["rows"] if r["p_t"] == r["p_t"])
    md = S.significance_markdown(sig, {"dtn": "DTN", "sb": "Shared-Bottom"})
    assert "| Shared-Bottom | income |" in md and "at least 0.0625" in md
