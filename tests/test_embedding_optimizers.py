"""Fused sparse embedding optimizers at the model and trainer level (train.embedding_optimizer):
the input layer's fused lookup against a dense reference of the same math, touched rows only,
the state in checkpoints, config errors, the lr schedule, gradient clipping, bf16 / fp16, training."""
import dataclasses
import math
import sys
import warnings

import pytest
import torch

from dtn.config import ConfigError, Text, config_from_dict, load_config
from dtn.data import make_synthetic
from dtn.features import FeatureBatch, FeatureSpec, InputLayer, JaggedField, Schema
from dtn.models import build_model
from dtn.train import Trainer, load_checkpoint, model_from_checkpoint, train_model
from dtn.train.embedding_optim import DEFAULT_EMBEDDING_LR, embedding_lr
from dtn.train.trainer import _EpochStats

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_trainer_features import _config  # noqa: E402

SPARSE = ("sgd", "rowwise_adagrad", "lazy_adam")
HYPER = dict(lr=0.05, weight_decay=0.01)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compiled.*")
        warnings.filterwarnings("ignore", message=".*extension.*")
        yield


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(4000, seed=3)


def _quiet(*_a, **_k):
    pass


# ---- the input layer against a dense reference ---------------------------------------------------------
def _schema():
    return Schema([FeatureSpec("a", cardinality=7), FeatureSpec("b", cardinality=40),
                   FeatureSpec("m", kind="multi", cardinality=11, pooling="mean"), FeatureSpec("x", kind="numeric")],
                  labels=["t"])


def _batches():
    """Two batches with duplicate ids (a hot row: id 3 of table a everywhere in batch 1), an empty bag,
    and rows of every table left untouched."""
    b1 = FeatureBatch(torch.tensor([[3, 5], [3, 5], [3, 17], [3, 0]]), torch.randn(4, 1, generator=torch.Generator().manual_seed(1)),
                      (JaggedField(torch.tensor([1, 1, 4, 2]), torch.tensor([0, 2, 3, 3, 4])),))
    b2 = FeatureBatch(torch.tensor([[1, 17], [3, 39], [6, 5]]), torch.randn(3, 1, generator=torch.Generator().manual_seed(2)),
                      (JaggedField(torch.tensor([4, 9, 9, 9]), torch.tensor([0, 1, 1, 4])),))
    return [b1, b2]


def _touched(layer, batch):
    off = layer.table_offsets
    rows = [batch.categorical[:, 0] + off[0], batch.categorical[:, 1] + off[1], batch.multi[0].values + off[2]]
    return torch.unique(torch.cat(rows))


def _dense_reference_step(opt, w, s1, s2, grad, touched, step):
    """The optimizer's math on the dense gradient, applied to ``touched`` rows only (float64 for reference)."""
    w, grad = w.double().clone(), grad.double()
    s1, s2 = s1.double().clone(), s2.double().clone()
    lr, wd = HYPER["lr"], HYPER["weight_decay"]
    for r in touched.tolist():
        g = grad[r] + wd * w[r]
        if opt == "sgd":
            w[r] -= lr * g
        elif opt == "rowwise_adagrad":
            s1[r] += (g * g).mean()
            w[r] -= lr * g / (s1[r].sqrt() + EPS)
        else:
            s1[r] = BETA1 * s1[r] + (1 - BETA1) * g
            s2[r] = BETA2 * s2[r] + (1 - BETA2) * g * g
            w[r] -= (lr / (1 - BETA1 ** step)) * s1[r] / (s2[r].sqrt() / math.sqrt(1 - BETA2 ** step) + EPS)
    return w, s1, s2


@pytest.mark.parametrize("opt", SPARSE)
def test_fused_layer_matches_the_dense_reference_and_touches_only_batch_rows(opt):
    torch.manual_seed(0)
    layer = InputLayer(_schema(), embed_dim=4)
    dense = InputLayer(_schema(), embed_dim=4)
    dense.load_state_dict(layer.state_dict())
    fused = layer.use_sparse_optimizer(opt, **HYPER)
    s1, s2 = fused.state1.clone(), fused.state2.clone()
    target = torch.randn(4, 4, 4)
    for step, batch in enumerate(_batches(), start=1):
        before_w, before_s1, before_s2 = layer.weight.detach().clone(), fused.state1.clone(), fused.state2.clone()
        loss = (layer(batch) * target[: batch.categorical.shape[0]]).sum()
        loss.backward()
        assert layer.weight.grad is None  # no [R, d] gradient
        # the dense path of the same weights gives the reference gradient
        dense.weight.data.copy_(before_w)
        dense.weight.grad = None
        (dense(batch) * target[: batch.categorical.shape[0]]).sum().backward()
        touched = _touched(layer, batch)
        want_w, want_s1, want_s2 = _dense_reference_step(opt, before_w, s1, s2, dense.weight.grad, touched, step)
        s1, s2 = want_s1.float(), want_s2.float()
        untouched = torch.ones(layer.weight.shape[0], dtype=torch.bool)
        untouched[touched] = False
        assert untouched.sum() > 10
        assert torch.equal(layer.weight.detach()[untouched], before_w[untouched])  # bit for bit
        torch.testing.assert_close(layer.weight.detach().double(), want_w, rtol=1e-5, atol=1e-6)
        assert not torch.equal(layer.weight.detach()[touched], before_w[touched])
        for st, before in ((fused.state1, before_s1), (fused.state2, before_s2)):
            if st.numel():
                assert torch.equal(st[untouched], before[untouched])
        if fused.state1.numel():
            torch.testing.assert_close(fused.state1.double(), want_s1, rtol=1e-5, atol=1e-9)
        assert fused.step == step


def test_eval_no_grad_and_compile_take_the_dense_path(monkeypatch):
    torch.manual_seed(0)
    layer = InputLayer(_schema(), embed_dim=4)
    layer.use_sparse_optimizer("sgd", lr=1.0)
    batch = _batches()[0]
    layer.eval()
    layer(batch).sum().backward()  # eval: a dense gradient, no update
    assert layer.weight.grad is not None and layer.sparse_optimizer.step == 0
    layer.train()
    with torch.no_grad():
        layer(batch)
    assert layer.sparse_optimizer.step == 0
    layer.weight.grad = None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what torch.compile / export trace
    layer(batch).sum().backward()
    assert layer.weight.grad is not None and layer.sparse_optimizer.step == 0


def test_state_dict_carries_the_state_and_model_files_load_either_way():
    torch.manual_seed(0)
    layer = InputLayer(_schema(), embed_dim=4)
    layer.use_sparse_optimizer("lazy_adam", lr=0.1)
    layer(_batches()[0]).sum().backward()
    sd = layer.state_dict()
    assert {"sparse_optimizer.state1", "sparse_optimizer.state2", "sparse_optimizer._extra_state"} <= set(sd)
    assert sd["sparse_optimizer._extra_state"] == {"optimizer": "lazy_adam", "step": 1}
    plain = InputLayer(_schema(), embed_dim=4)
    plain.load_state_dict(sd)  # a layer without an optimizer ignores the state
    assert torch.equal(plain.weight, layer.weight)
    again = InputLayer(_schema(), embed_dim=4)
    again.use_sparse_optimizer("lazy_adam", lr=0.1)
    again.load_state_dict(sd)
    assert again.sparse_optimizer.step == 1 and torch.equal(again.sparse_optimizer.state2, layer.sparse_optimizer.state2)
    other = InputLayer(_schema(), embed_dim=4)
    other.use_sparse_optimizer("rowwise_adagrad", lr=0.1)
    with pytest.raises(RuntimeError, match="the state is of 'lazy_adam', this layer uses 'rowwise_adagrad'"):
        other.load_state_dict(sd)


def test_init_scales_in_place_with_the_same_values():
    torch.manual_seed(5)
    layer = InputLayer(_schema(), embed_dim=4, init_std=0.05)
    torch.manual_seed(5)
    assert torch.equal(layer.weight.detach(), torch.randn(layer.weight.shape) * 0.05)


# ---- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, needles", [
    ("embedding_optimizer", "adagrad", ["train.embedding_optimizer = 'adagrad'",
                                        "'adam', 'sgd', 'rowwise_adagrad', 'lazy_adam'"]),
    ("embedding_lr", "0", ["train.embedding_lr = 0", "> 0.0"]),
    ("embedding_lr", "fast", ["train.embedding_lr = fast", "not a number"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(key, value, needles):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"train": {key: Text(value)}}, load_config("cpu"))
    for n in needles:
        assert n in str(exc.value), (n, str(exc.value))


def test_default_embedding_lrs():
    t = load_config("cpu").train
    assert t.embedding_optimizer == "rowwise_adagrad" and t.embedding_lr is None
    assert embedding_lr(t) == 0.1  # the default optimizer's default lr
    assert load_config("paper").train.embedding_optimizer == "adam"  # the paper's Adam on every weight
    for opt in ("adam", "lazy_adam"):
        assert embedding_lr(dataclasses.replace(t, embedding_optimizer=opt)) == t.lr
    for opt in ("sgd", "rowwise_adagrad"):
        assert embedding_lr(dataclasses.replace(t, embedding_optimizer=opt)) == DEFAULT_EMBEDDING_LR[opt]
    assert embedding_lr(dataclasses.replace(t, embedding_optimizer="sgd", embedding_lr=0.3)) == 0.3


# ---- the trainer ----------------------------------------------------------------------------------
def _trainer(synth, name="mmoe", **train):
    cfg = _config(**train)
    torch.manual_seed(0)
    return Trainer(build_model(name, synth.schema, cfg.model), cfg)


@pytest.mark.parametrize("opt", SPARSE)
def test_a_step_touches_only_the_batch_rows(synth, opt):
    trainer = _trainer(synth, embedding_optimizer=opt)
    layer = trainer.model.input_layer
    assert all(p is not layer.weight for g in trainer.optimizer.param_groups for p in g["params"])
    batch, labels = synth.train.batch(slice(0, 8))
    w0, s0 = layer.weight.detach().clone(), layer.sparse_optimizer.state1.clone()
    trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
    off = layer.table_offsets[:-1]
    touched = torch.zeros(layer.weight.shape[0], dtype=torch.bool)
    C = batch.categorical.shape[1]
    touched[(batch.categorical + off[:C]).flatten()] = True
    for j, jf in enumerate(batch.multi):
        touched[jf.values.long() + off[C + j]] = True
    changed = (layer.weight.detach() != w0).any(1)
    assert changed.any() and not (changed & ~touched).any() and layer.weight.grad is None
    if s0.numel():
        assert torch.equal(layer.sparse_optimizer.state1[~touched], s0[~touched])
        assert not torch.equal(layer.sparse_optimizer.state1[touched], s0[touched])


def test_the_lr_schedule_scales_the_embedding_lr(synth):
    trainer = _trainer(synth, embedding_optimizer="rowwise_adagrad", embedding_lr=0.04, warmup_steps=4)
    seen = []
    real = trainer.embedding.opt.backward_update

    def spy(*args):
        seen.append(trainer.embedding.opt.lr)
        return real(*args)

    trainer.embedding.opt.backward_update = spy
    for step in range(5):
        batch, labels = synth.train.batch(slice(64 * step, 64 * step + 64))
        trainer.train_step(batch, labels, step, _EpochStats(trainer.device, 2))
    assert seen == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.04])


def test_adam_with_an_embedding_lr_is_a_group_of_its_own(synth):
    trainer = _trainer(synth, embedding_optimizer="adam", embedding_lr=0.05, warmup_steps=2)
    groups = trainer.optimizer.param_groups
    assert groups[1]["params"] == [trainer.model.input_layer.weight] and groups[1]["lr"] == 0.05
    batch, labels = synth.train.batch(slice(0, 64))
    trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
    assert groups[0]["lr"] == pytest.approx(0.0025) and groups[1]["lr"] == pytest.approx(0.025)


def test_gradient_clipping_leaves_the_fused_rows_alone(synth):
    """Clipping acts on the dense gradients only: the first step's embedding update is the same with a
    tiny clip norm as without one (the dense weights differ)."""
    batch, labels = synth.train.batch(slice(0, 256))
    out = []
    for clip in (None, 1e-6):
        trainer = _trainer(synth, embedding_optimizer="sgd", grad_clip=clip)
        trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
        out.append([p.detach().clone() for p in trainer.model.parameters()])
    emb = [i for i, p in enumerate(trainer.model.parameters()) if p is trainer.model.input_layer.weight][0]
    assert torch.equal(out[0][emb], out[1][emb])
    assert not all(torch.equal(a, b) for a, b in zip(out[0], out[1]))  # the dense weights were clipped


@pytest.mark.parametrize("opt", SPARSE)
def test_fp16_unscales_and_skips_with_the_scaler(synth, opt):
    """fp16: the deferred update sees the true (unscaled) gradients, so two scales give the same table
    (powers of two: exact); an overflowing step leaves the table, the state and the step count as they were."""
    batch, labels = synth.train.batch(slice(0, 256))
    seen = []
    for scale in (2.0 ** 8, 2.0 ** 12):
        trainer = _trainer(synth, embedding_optimizer=opt, amp="fp16")
        assert trainer.embedding.opt.deferred
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        w0 = trainer.model.input_layer.weight.detach().clone()
        trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
        assert trainer.embedding.opt.step == 1
        # what scales with the gradient: sgd's move, adagrad's sum of squares, Adam's first moment
        seen.append(trainer.model.input_layer.weight.detach() - w0 if opt == "sgd"
                    else trainer.embedding.opt.state1.clone())
    assert seen[0].abs().max() > 0
    # the same whatever the scale (not 16x / 256x apart); float16 rounding of the scaled backward differs a little
    torch.testing.assert_close(seen[0], seen[1], rtol=0.02, atol=1e-3 * float(seen[0].abs().max()))
    trainer = _trainer(synth, embedding_optimizer=opt, amp="fp16")
    layer = trainer.model.input_layer
    w0, s0 = layer.weight.detach().clone(), layer.sparse_optimizer.state1.clone()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
    assert trainer.scaler.get_scale() == 2.0 ** 99
    assert torch.equal(layer.weight.detach(), w0) and torch.equal(layer.sparse_optimizer.state1, s0)
    assert layer.sparse_optimizer.step == 0


def test_fp16_a_non_finite_embedding_gradient_skips_the_whole_step(synth):
    trainer = _trainer(synth, embedding_optimizer="sgd", amp="fp16")
    real = trainer.embedding.opt.take_pending

    def poisoned():
        rows, grads = real()
        return rows, torch.full_like(grads, float("inf"))

    trainer.embedding.opt.take_pending = poisoned
    params = [p.detach().clone() for p in trainer.model.parameters()]
    scale = trainer.scaler.get_scale()
    batch, labels = synth.train.batch(slice(0, 256))
    trainer.train_step(batch, labels, 0, _EpochStats(trainer.device, 2))
    assert trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, p) for a, p in zip(params, trainer.model.parameters()))


@pytest.mark.parametrize("opt", SPARSE)
def test_training_reduces_the_loss(synth, opt):
    trainer, result = train_model("mmoe", synth, _config(epochs=3, embedding_optimizer=opt), log=_quiet)
    losses = [r["train_loss"] for r in trainer.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(m["auc"] > 0.7 for m in result["valid"].values()), result["valid"]
    assert trainer.model.input_layer.weight.grad is None
    assert trainer.history[-1]["embedding_lr"] == embedding_lr(trainer.cfg)


def test_bf16_trains_with_a_fused_optimizer(synth):
    trainer, result = train_model("dtn", synth, _config(epochs=2, amp="bf16", embedding_optimizer="rowwise_adagrad"),
                                  log=_quiet)
    losses = [r["train_loss"] for r in trainer.history]
    assert losses[-1] < losses[0] and all(m["auc"] > 0.7 for m in result["valid"].values())


def test_checkpoints_last_carries_the_state_best_is_a_model_file(synth, tmp_path):
    trainer, _ = train_model("dtn", synth, _config(epochs=1, embedding_optimizer="lazy_adam"), out_dir=str(tmp_path),
                             log=_quiet)
    last, best = load_checkpoint(str(tmp_path / "last.pt")), load_checkpoint(str(tmp_path / "best.pt"))
    key = "input_layer.sparse_optimizer.state1"
    assert key in last["model_state"] and key not in best["model_state"]
    steps = synth.train.num_batches(256)
    assert last["model_state"]["input_layer.sparse_optimizer._extra_state"]["step"] == steps
    assert torch.equal(last["model_state"][key], trainer.model.input_layer.sparse_optimizer.state1)
    for path in ("best.pt", "last.pt"):  # both rebuild a model (without an optimizer) for evaluation
        model, _, _ = model_from_checkpoint(str(tmp_path / path))
        assert model.input_layer.sparse_optimizer is None
        assert torch.equal(model.input_layer.weight, trainer.model.input_layer.weight)
