"""The trainer's options: mixed precision (train.amp), lr schedules (train.lr_schedule), TensorBoard
event files (train.log) and learned task weights (train.task_weighting): checked config values,
what each does to a step, and bit-exact resume of each from last.pt."""
import dataclasses
import math
import sys

import pytest
import torch

from conftest import small_model_config
from dtn.cli import main
from dtn.config import Config, ConfigError, DataConfig, Text, TrainConfig, config_from_dict, load_config
from dtn.data import make_synthetic
from dtn.train import Trainer, load_checkpoint, train_model
from dtn.train.checkpoint import CheckpointError
from dtn.train.schedule import LRSchedule
from dtn.train.task_weighting import UncertaintyWeighting
from dtn.train.trainer import _EpochStats


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(4000, seed=3)


@pytest.fixture(autouse=True)
def _restore_determinism():
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def _config(**train) -> Config:
    model = small_model_config()
    t = TrainConfig(lr=5e-3, batch_size=256, eval_batch_size=4096, epochs=3, patience=10, progress=False, seed=11,
                    num_threads=1)
    return Config(model=model, train=dataclasses.replace(t, **train), data=DataConfig(dataset="synthetic"))


def _quiet(*_a, **_k):
    pass


# ---- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, needles", [
    ("amp", "fp8", ["train.amp = 'fp8'", "'off', 'bf16', 'fp16'"]),
    ("lr_schedule", "step", ["train.lr_schedule = 'step'", "'constant', 'cosine', 'plateau'"]),
    ("warmup_steps", "-1", ["train.warmup_steps = -1", ">= 0"]),
    ("warmup_steps", "1.5", ["train.warmup_steps = 1.5", "not an integer"]),
    ("min_lr", "0.5", ["train.min_lr = 0.5", "<= train.lr (0.002)"]),
    ("plateau_factor", "1", ["train.plateau_factor = 1", "< 1.0"]),
    ("plateau_patience", "0", ["train.plateau_patience = 0", ">= 1"]),
    ("task_weighting", "gradnorm", ["train.task_weighting = 'gradnorm'", "'static', 'uncertainty'"]),
    ("log", "wandb", ["train.log = 'wandb'", "'none', 'tensorboard'"]),
])
def test_bad_values_name_key_value_and_what_is_allowed(key, value, needles):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"train": {key: Text(value)}}, load_config("cpu"))
    for n in needles:
        assert n in str(exc.value), (n, str(exc.value))


def test_uncertainty_excludes_static_weights():
    with pytest.raises(ConfigError, match=r"train.task_weights = \[1.0, 2.0\].*learns the task weights"):
        TrainConfig(task_weights=[1, 2], task_weighting="uncertainty")


def test_yaml_and_set_take_the_options(tmp_path):
    (tmp_path / "c.yaml").write_text("base: cpu\ntrain: {amp: bf16, lr_schedule: cosine, warmup_steps: 100, "
                                     "min_lr: 1e-5, task_weighting: uncertainty, log: tensorboard}\n")
    t = load_config(str(tmp_path / "c.yaml")).train
    assert (t.amp, t.lr_schedule, t.warmup_steps, t.min_lr, t.task_weighting, t.log) == \
        ("bf16", "cosine", 100, 1e-5, "uncertainty", "tensorboard")
    over = {"amp": Text("fp16"), "lr_schedule": Text("plateau"), "plateau_factor": Text("0.2")}
    t = config_from_dict({"train": over}, load_config("cpu")).train
    assert (t.amp, t.lr_schedule, t.plateau_factor) == ("fp16", "plateau", 0.2)
    d = TrainConfig()
    assert (d.amp, d.lr_schedule, d.warmup_steps, d.task_weighting, d.log) == ("off", "constant", 0, "static", "none")


# ---- the lr schedule ---------------------------------------------------------------------------------
def test_cosine_with_warmup_values():
    s = LRSchedule(TrainConfig(lr=1.0, lr_schedule="cosine", warmup_steps=4, min_lr=0.1))
    s.set_total_steps(14)
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == 1.0  # the cosine starts after the warm-up
    assert s.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    after = [s.lr_at(i) for i in range(4, 14)]
    assert all(a > b for a, b in zip(after, after[1:]))
    assert s.lr_at(14) == pytest.approx(0.1) and s.lr_at(100) == pytest.approx(0.1)


def test_plateau_cuts_and_floor():
    s = LRSchedule(TrainConfig(lr=1.0, lr_schedule="plateau", plateau_factor=0.5, plateau_patience=2, min_lr=0.3))
    assert [s.epoch_end(b) for b in (0, 1)] == [None, None] and s.lr_at(0) == 1.0
    assert "lr 1 -> 0.5" in s.epoch_end(2)
    assert s.epoch_end(3) is None and s.lr_at(0) == 0.5
    s.epoch_end(4)
    assert s.lr_at(0) == 0.3  # 0.25, floored at min_lr
    assert s.state_dict() == {"step": 0, "cuts": 2}


def test_constant_schedule_leaves_the_optimizer_alone():
    s = LRSchedule(TrainConfig(lr=1.0))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.123)
    s.before_step(opt)
    assert opt.param_groups[0]["lr"] == 0.123 and s.step == 1 and not s.varies
    assert LRSchedule(TrainConfig(lr=1.0, warmup_steps=3)).varies


def test_every_step_takes_the_scheduled_lr(synth, monkeypatch):
    cfg = _config(epochs=2, lr_schedule="cosine", warmup_steps=7, min_lr=1e-4)
    seen = []
    real = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    trainer, _ = train_model("shared_bottom", synth, cfg, log=_quiet)
    steps = synth.train.num_batches(256)
    ref = LRSchedule(cfg.train)
    ref.set_total_steps(2 * steps)
    assert seen == [ref.lr_at(i) for i in range(2 * steps)]
    assert seen[0] == pytest.approx(5e-3 / 7) and max(seen) == pytest.approx(5e-3, rel=1e-3)
    assert [r["lr"] for r in trainer.history] == [seen[steps - 1], seen[-1]]


# ---- mixed precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_forward_passes_under_autocast(synth, monkeypatch, amp, dtype):
    cfg = _config(epochs=1, amp=amp)
    from dtn.models import DTN

    modes = []
    real = DTN.forward_details

    def spy(self, batch):
        modes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), self.training))
        return real(self, batch)

    monkeypatch.setattr(DTN, "forward_details", spy)
    trainer, result = train_model("dtn", synth, cfg, log=_quiet)
    assert {m[:2] for m in modes} == {(True, dtype)}
    assert {m[2] for m in modes} == {True, False}  # training steps and evaluation
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay float32
    assert (trainer.scaler is not None) == (amp == "fp16")
    assert min(m["auc"] for m in result["test"].values()) > 0.75


def test_off_means_no_autocast_and_the_default_adam(synth, monkeypatch):
    from dtn.models import DTN

    modes = []
    real = DTN.forward_details
    monkeypatch.setattr(DTN, "forward_details", lambda self, b: modes.append(torch.is_autocast_enabled("cpu"))
                        or real(self, b))
    trainer, _ = train_model("dtn", synth, _config(epochs=1), log=_quiet)
    assert not any(modes) and trainer.scaler is None
    assert not trainer.optimizer.defaults.get("fused")


def test_fp16_scaler_skips_an_overflowing_step_on_the_device(synth):
    """A scale so large that the float16 gradients overflow: the step is skipped (weights unchanged) and
    the scale halves; with a sane scale the step updates the weights."""
    from dtn.models import build_model

    cfg = _config(amp="fp16")
    torch.manual_seed(0)
    model = build_model("shared_bottom", synth.schema, cfg.model)
    trainer = Trainer(model, cfg)
    assert trainer.optimizer.defaults["fused"]  # the scaler's inf check stays on the device
    batch, labels = synth.train.batch(slice(0, 256))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert trainer.scaler.get_scale() == 2.0 ** 99
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.train_step(batch, labels, 1, _EpochStats(trainer.device, 2))
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---- learned task weights ----------------------------------------------------------------------------
def test_uncertainty_objective_and_its_optimum():
    w = UncertaintyWeighting(2)
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.5, -1.0]))
    L = torch.tensor([0.2, 0.8])
    want = math.exp(-0.5) * 0.2 + 0.25 + math.exp(1.0) * 0.8 - 0.5
    assert float(w(L).detach()) == pytest.approx(want, rel=1e-6)
    # for fixed task losses the learned weights go to exp(-s_t) = 1 / (2 L_t)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        w(L).backward()
        opt.step()
    assert w.weights() == pytest.approx([1 / 0.4, 1 / 1.6], rel=1e-3)


def test_uncertainty_weights_are_learned_logged_and_outside_the_model(synth, tmp_path):
    trainer, result = train_model("dtn", synth, _config(epochs=2, task_weighting="uncertainty"), out_dir=str(tmp_path),
                                  log=_quiet)
    assert len(trainer.optimizer.param_groups) == 2 and trainer.optimizer.param_groups[1]["weight_decay"] == 0.0
    weights = result["task_weights"]
    assert set(weights) == {"task1", "task2"} and all(w != 1.0 for w in weights.values())
    assert [trainer.history[-1][f"task_weight/{t}"] for t in ("task1", "task2")] == list(weights.values())
    assert "task_weight/task1" in (tmp_path / "history.csv").read_text().splitlines()[0]
    assert not any("log_var" in k for k in load_checkpoint(str(tmp_path / "best.pt"))["model_state"])
    last = load_checkpoint(str(tmp_path / "last.pt"))
    assert torch.equal(last["task_weighting"]["log_var"], trainer.task_weighting.log_var.detach())


# ---- exact resume ------------------------------------------------------------------------------------
RESUME_CASES = {
    "cosine": dict(lr_schedule="cosine", warmup_steps=10, min_lr=1e-4),
    "bf16": dict(amp="bf16"),
    "fp16-clip": dict(amp="fp16", grad_clip=1.0),
    "uncertainty": dict(task_weighting="uncertainty"),
    "plateau": dict(lr_schedule="plateau", plateau_factor=0.5, plateau_patience=1),
    # fused sparse embedding optimizers: their state (input_layer.sparse_optimizer.*) is part of model_state
    "emb-sgd": dict(embedding_optimizer="sgd"),
    "emb-rowwise_adagrad-cosine": dict(embedding_optimizer="rowwise_adagrad", lr_schedule="cosine", warmup_steps=10),
    "emb-lazy_adam-fp16-clip": dict(embedding_optimizer="lazy_adam", amp="fp16", grad_clip=1.0),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_exactly(synth, tmp_path, monkeypatch, case):
    """Three epochs straight equal two epochs, a crash in the third, and a resume: weights, optimizer,
    scheduler, GradScaler and learned task weights bit for bit."""
    if case == "plateau":  # validation scores that get worse after epoch 1: the lr is cut after epochs 2 and 3
        monkeypatch.setattr(Trainer, "_score", lambda self, metrics, rows: [0.9, 0.8, 0.7, 0.6][self.epoch])
    cfg = _config(deterministic=True, **RESUME_CASES[case])
    straight, _ = train_model("dtn", synth, cfg, out_dir=str(tmp_path / "a"), log=_quiet)
    real = Trainer.train_step

    def crash_in_epoch_3(self, batch, labels, step, stats):
        if self.epoch == 2 and step == 3:
            raise KeyboardInterrupt  # mid-epoch: the steps of epoch 3 so far are lost with the process
        return real(self, batch, labels, step, stats)

    monkeypatch.setattr(Trainer, "train_step", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_model("dtn", synth, cfg, out_dir=str(tmp_path / "b"), log=_quiet)
    monkeypatch.setattr(Trainer, "train_step", real)
    assert load_checkpoint(str(tmp_path / "b" / "last.pt"))["epoch"] == 2
    resumed, _ = train_model("dtn", synth, cfg, out_dir=str(tmp_path / "b"), resume=True, log=_quiet)
    assert resumed.epoch == 3
    a, b = load_checkpoint(str(tmp_path / "a" / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    for k, va in a["model_state"].items():
        vb = b["model_state"][k]
        assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), k
    if "embedding_optimizer" in RESUME_CASES[case]:
        assert a["model_state"]["input_layer.sparse_optimizer._extra_state"]["step"] == 3 * synth.train.num_batches(256)
    for sa, sb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["schedule"] == b["schedule"] and a["scaler"] == b["scaler"]
    if a["task_weighting"] is not None:
        assert torch.equal(a["task_weighting"]["log_var"], b["task_weighting"]["log_var"])
    key = ["train_loss", "lr"] + (["embedding_lr"] if "embedding_optimizer" in RESUME_CASES[case] else [])
    assert [[r[k] for k in key] for r in straight.history] == [[r[k] for k in key] for r in resumed.history]
    steps = synth.train.num_batches(256)
    assert a["schedule"]["step"] == 3 * steps
    if case == "plateau":
        assert [r["lr"] for r in resumed.history] == [5e-3, 5e-3, 2.5e-3] and a["schedule"]["cuts"] == 2
    if case == "fp16-clip":
        assert a["scaler"]["scale"] > 0 and a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]


def test_resume_refuses_fixed_and_applies_changeable_settings(synth, tmp_path):
    cfg = _config(epochs=1, amp="bf16", lr_schedule="cosine", warmup_steps=3)
    train_model("shared_bottom", synth, cfg, out_dir=str(tmp_path), log=_quiet)
    for change in (dict(amp="off"), dict(lr_schedule="constant"), dict(warmup_steps=4),
                   dict(task_weighting="uncertainty")):
        other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2, **change))
        key = next(iter(change))
        with pytest.raises(CheckpointError, match=f"cannot resume with other settings: train.{key} "):
            train_model("shared_bottom", synth, other, out_dir=str(tmp_path), resume=True, log=_quiet)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2, min_lr=1e-4))
    trainer, _ = train_model("shared_bottom", synth, other, out_dir=str(tmp_path), resume=True, log=_quiet)
    assert {"epoch": 1, "key": "train.min_lr", "old": 0.0, "new": 1e-4} in trainer.resumed


def test_a_last_pt_from_before_the_options_resumes(synth, tmp_path):
    """A checkpoint whose config lacks the new keys (written before them) resumes as their defaults."""
    from dtn.train import atomic_save

    cfg = _config(epochs=1)
    train_model("shared_bottom", synth, cfg, out_dir=str(tmp_path), log=_quiet)
    last = load_checkpoint(str(tmp_path / "last.pt"))
    for key in ("amp", "lr_schedule", "warmup_steps", "min_lr", "plateau_factor", "plateau_patience", "task_weighting",
                "log"):
        del last["config"]["train"][key]
    for key in ("schedule", "scaler", "task_weighting"):
        del last[key]
    del last["_path"]
    atomic_save(last, str(tmp_path / "last.pt"))
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    trainer, _ = train_model("shared_bottom", synth, longer, out_dir=str(tmp_path), resume=True, log=_quiet)
    assert trainer.epoch == 2 and trainer.resumed == [{"epoch": 1, "key": "train.epochs", "old": 1, "new": 2}]


# ---- TensorBoard -------------------------------------------------------------------------------------
def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_and_resume(synth, tmp_path, monkeypatch):
    """Two epochs with a crash in the second after some running losses were written, then a resume:
    every scalar once, at the run's step count (the crashed epoch's points purged)."""
    pytest.importorskip("tensorboard")
    import dtn.train.trainer as T

    monkeypatch.setattr(T, "SYNC_EVERY", 4)
    cfg = _config(epochs=2, log="tensorboard", task_weighting="uncertainty")
    real = Trainer.train_step

    def crash(self, batch, labels, step, stats):
        if self.epoch == 1 and step == 10:
            raise KeyboardInterrupt
        return real(self, batch, labels, step, stats)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train_model("dtn", synth, cfg, out_dir=str(tmp_path), log=_quiet)
    monkeypatch.setattr(Trainer, "train_step", real)
    trainer, _ = train_model("dtn", synth, cfg, out_dir=str(tmp_path), resume=True, log=_quiet)
    s = _scalars(tmp_path / "tensorboard")
    n = synth.train.num_batches(256)
    for tag in ("train/loss", "train/lr", "train/step_ms", "valid/auc/task1", "valid/logloss/task2",
                "task_weight/task1"):
        assert [step for step, _ in s[tag]] == [n, 2 * n], tag  # one point per epoch, at the step count
    # running losses every 4 steps of each epoch, each step once although epoch 2 was started twice
    assert [step for step, _ in s["train/loss_running"]] == [4, 8, 12, n + 4, n + 8, n + 12]
    assert [v for _, v in s["train/loss"]] == pytest.approx([r["train_loss"] for r in trainer.history], rel=1e-6)
    assert [v for _, v in s["valid/auc/task1"]] == pytest.approx([r["val_auc/task1"] for r in trainer.history],
                                                                 rel=1e-6)


def test_tensorboard_missing_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    rc = main(["train", "--dataset", "synthetic", "--out", str(tmp_path / "r"), "--set", "train.log=tensorboard",
               "--set", "train.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "needs the tensorboard package" in err and "pip install tensorboard" in err and "train.log=none" in err
    assert not (tmp_path / "r").exists()  # nothing was read or written


def test_bf16_matches_fp32_quality(synth):
    """The README's Census-Income measurement in small: bf16 autocast training reaches fp32's test AUC
    (same seed, data and steps) to within 0.005 on the synthetic tasks."""
    fp32 = train_model("dtn", synth, _config(epochs=2), log=_quiet)[1]["test"]
    bf16 = train_model("dtn", synth, _config(epochs=2, amp="bf16"), log=_quiet)[1]["test"]
    for task in fp32:
        assert abs(fp32[task]["auc"] - bf16[task]["auc"]) < 5e-3, (task, fp32[task], bf16[task])
        assert fp32[task]["auc"] != bf16[task]["auc"]  # the modes really differ
