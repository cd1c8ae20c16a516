"""Training, checkpoints, exact resume, divergence handling, and the CLI."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from conftest import small_model_config
from dtn.config import Config, ConfigError, DataConfig, TrainConfig, load_config
from dtn.data import make_synthetic
from dtn.train import (Trainer, TrainingDivergedError, load_checkpoint, model_from_checkpoint, rela_imp, train_model)
from dtn.train.metrics import auc, log_loss


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(6000, seed=3)


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _config(small=True, **train):
    model = small_model_config()
    t = TrainConfig(lr=5e-3, batch_size=256, eval_batch_size=4096, epochs=3, patience=5, progress=False, seed=11)
    return Config(model=model, train=dataclasses.replace(t, **train), data=DataConfig(dataset="synthetic"))


def test_metrics():
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties get half credit
    assert np.isnan(auc(np.ones(3), np.ones(3)))
    assert abs(log_loss(np.array([1, 0]), np.array([0.9, 0.1])) + np.log(0.9)) < 1e-9
    assert rela_imp(0.9560, 0.9361) == pytest.approx(4.5632, abs=1e-3)  # the paper (+4.56%)'s DTN vs Shared-Bottom


@pytest.mark.parametrize("name", ["shared_bottom", "dtn"])
def test_beats_constant_predictor_on_every_task(synth, name):
    trainer, result = train_model(name, synth, _config(), log=lambda *_: None)
    # a constant predictor has AUC 0.5; the planted signal is strong, so a trained model is far above it
    for task, m in result["test"].items():
        assert m["auc"] > 0.75, (task, m)
        base = float(synth.test.labels[:, synth.schema.labels.index(task)].mean())
        const_ll = log_loss(synth.test.labels[:, synth.schema.labels.index(task)].numpy(), np.full(len(synth.test), base))
        assert m["logloss"] < const_ll - 0.05, (task, m["logloss"], const_ll)


def test_save_load_identical_predictions(synth, tmp_path):
    trainer, result = train_model("dtn", synth, _config(epochs=1), out_dir=str(tmp_path), log=lambda *_: None)
    model, encoder, cfg = model_from_checkpoint(str(tmp_path / "best.pt"))
    batch, _ = synth.test.batch(slice(0, 500))
    model.eval()
    trainer.model.eval()
    assert torch.equal(model(batch), trainer.model(batch))
    assert encoder.vocab == synth.encoder.vocab
    assert json.load(open(tmp_path / "metrics.json"))["model"] == "dtn"
    assert (tmp_path / "history.csv").read_text().startswith("epoch,")


def test_trimmed_model_round_trip(synth, tmp_path):
    from dtn.train.trainer import checkpoint_payload
    from dtn.train import atomic_save

    trainer, _ = train_model("dtn", synth, _config(epochs=1), log=lambda *_: None)
    model = trainer.model
    weights = model.mean_gate_weights(b for b, _ in synth.valid.batches(1000))
    info = model.trim(weights, threshold=max(float(weights[1][:3].max()), float(weights[1][3:].min())) + 1e-9)
    assert info["removed"], info
    atomic_save(checkpoint_payload(model, synth.encoder, trainer.config), str(tmp_path / "trim.pt"))
    again, _, _ = model_from_checkpoint(str(tmp_path / "trim.pt"))
    batch, _ = synth.test.batch(slice(0, 200))
    model.eval()
    again.eval()
    assert torch.equal(again(batch), model(batch))
    assert again.num_parameters() == info["params_after"]


def test_resume_continues_exactly(synth, tmp_path):
    cfg = _config(epochs=3, patience=10, deterministic=True)
    straight, _ = train_model("dtn", synth, cfg, out_dir=str(tmp_path / "a"), log=lambda *_: None)
    # two epochs, "crash", then resume for the third
    train_model("dtn", synth, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2)),
                out_dir=str(tmp_path / "b"), log=lambda *_: None)
    last = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert last["epoch"] == 2
    resumed, _ = train_model("dtn", synth, cfg, out_dir=str(tmp_path / "b"), resume=True, log=lambda *_: None)
    assert resumed.epoch == 3
    a = load_checkpoint(str(tmp_path / "a" / "last.pt"))["model_state"]
    b = load_checkpoint(str(tmp_path / "b" / "last.pt"))["model_state"]
    assert a.keys() == b.keys()
    for k in a:  # the fused embedding optimizer's step count is a dict (its "_extra_state"), the rest tensors
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]


def test_nan_loss_stops_and_keeps_last_checkpoint(synth, tmp_path):
    cfg = _config(epochs=1)
    train_model("shared_bottom", synth, cfg, out_dir=str(tmp_path), log=lambda *_: None)
    before = (tmp_path / "last.pt").read_bytes()
    model, enc, _ = model_from_checkpoint(str(tmp_path / "last.pt"))
    with torch.no_grad():
        model.input_layer.numeric_weight.fill_(float("nan"))
    trainer = Trainer(model, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2)), str(tmp_path), enc)
    trainer.epoch = 1
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 2, step 1 .*last good checkpoint"):
        trainer.fit(synth.train, synth.valid)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_atomic_save_leaves_no_partial_file(tmp_path):
    from dtn.train import atomic_save
    from dtn.train.checkpoint import read_torch_file

    class Boom:
        def __reduce__(self):
            raise RuntimeError("serialisation failed")

    atomic_save({"ok": 1}, str(tmp_path / "c.pt"))
    with pytest.raises(RuntimeError, match="serialisation failed"):
        atomic_save({"bad": Boom()}, str(tmp_path / "c.pt"))
    assert read_torch_file(str(tmp_path / "c.pt")) == {"ok": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


def test_early_stopping(synth):
    cfg = _config(epochs=20, patience=1, lr=0.05)
    trainer, _ = train_model("shared_bottom", synth, cfg, log=lambda *_: None)
    assert trainer.epoch < 20 and trainer.epoch == trainer.best_epoch + 1


def test_config_yaml_round_trip_and_errors(tmp_path):
    from dtn.config import save_config

    cfg = load_config("paper")
    assert cfg.model.embed_dim == 16 and cfg.model.fim_dim == 512 and cfg.train.batch_size == 2048
    p = tmp_path / "c.yaml"
    save_config(cfg, str(p))
    assert load_config(str(p)) == cfg
    p.write_text("base: cpu\nmodel:\n  fim_dim: 32\n")
    c = load_config(str(p))
    assert c.model.fim_dim == 32 and c.model.embed_dim == load_config("cpu").model.embed_dim
    p.write_text("model:\n  fim_width: 32\n")
    with pytest.raises(ConfigError, match="unknown config key model.fim_width"):
        load_config(str(p))
    with pytest.raises(FileNotFoundError, match="packaged"):
        load_config("nope")


def test_cli_train_evaluate_compare(tmp_path, capsys):
    from dtn.cli import main

    small = ["--dataset", "synthetic", "--set", "data.synthetic_rows=3000", "--set", "train.epochs=1",
             "--set", "train.progress=false", "--set", "model.fim_dim=16", "--set", "model.embed_dim=4",
             "--set", "model.memonet={fields: 3, num_buckets: 101, codebook_dim: 4}"]
    assert main(["train", "--model", "dtn", "--out", str(tmp_path / "t"), *small]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "t" / "best.pt"), "--out", str(tmp_path / "e.json")]) == 0
    assert "task1" in json.load(open(tmp_path / "e.json"))["metrics"]
    assert main(["compare", "--models", "shared_bottom,mmoe", "--out", str(tmp_path / "c"), *small]) == 0
    out = capsys.readouterr().out
    assert "| Shared-Bottom |" in out and "| MMoE |" in out
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "task1 RelaImp" in md
    summary = json.load(open(tmp_path / "c" / "compare.json"))
    assert summary["rows"]["shared_bottom"]["relaimp/task1"] == 0.0
    # rerunning reuses finished runs
    assert main(["compare", "--models", "shared_bottom,mmoe", "--out", str(tmp_path / "c"), *small]) == 0
    assert "reusing" in capsys.readouterr().out
    assert main(["train", "--model", "nope", "--out", str(tmp_path / "x"), *small]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
