"""Grouped mode (dtn_kernels.set_kernels(model, "grouped")): each kind of module runs once as a group
through the grouped ops; outputs, every gradient and training match the reference modules."""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import assert_close, interpreter, needs_interpreter

import copy

import pytest
import torch

import dtn_kernels
from conftest import small_model_config
from dtn.features import FeatureBatch, FeatureSpec, Schema
from dtn.models import build_model

CARDS = (5, 7, 3, 11, 4)


def _schema():
    return Schema([FeatureSpec(f"c{i}", cardinality=c) for i, c in enumerate(CARDS)]
                  + [FeatureSpec("x", kind="numeric")], labels=["t1", "t2", "t3"])


def _cfg(**kw):
    return small_model_config(**{"fim_dim": 12, "tower_hidden": [6], "expert_hidden": [10],
                                 "masknet": {"mask_hidden": 10, "block_dim": 9},
                                 "memonet": {"num_buckets": 37, "num_hcnets": 2}, **kw})


def _batch(B=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in CARDS], 1)
    return FeatureBatch(cat, torch.randn(B, 1, generator=g)), (torch.rand(B, 3, generator=g) < 0.4).float()


def _pair(name, **kw):
    torch.manual_seed(0)
    ref = build_model(name, _schema(), _cfg(**kw))
    grouped = copy.deepcopy(ref)
    dtn_kernels.set_kernels(ref, "reference")
    dtn_kernels.set_kernels(grouped, "grouped")
    assert dtn_kernels.kernels_of(grouped) == "grouped"
    return ref, grouped


def _compare(ref, grouped, batch):
    out_ref, out = ref(batch), grouped(batch)
    assert_close(out, out_ref, "logits")
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * up).sum().backward()
    (out_ref * up).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), grouped.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        assert q.grad is not None, f"grad {name} missing in grouped mode"
        assert_close(q.grad, p.grad, f"grad {name}")


@interpreter
@needs_interpreter
@pytest.mark.parametrize("name,kw", [
    ("dtn", {}), ("dtn", {"tsn": False}), ("mmoe", {}), ("ple", {"num_levels": 2}), ("cgc", {}),
    ("tfi", {"tfi_fim": "memonet"}), ("tfi", {"tfi_fim": "gdcn"}), ("sfm", {}),
])
def test_grouped_matches_reference(name, kw):
    ref, grouped = _pair(name, **kw)
    _compare(ref, grouped, _batch()[0])


@interpreter
@needs_interpreter
def test_grouped_runs_each_kind_once(monkeypatch):
    """DTN in grouped mode: one gated_cross call per cross layer, one mask_block and one hcnet call
    for all T + 1 MFI modules, one softmax_mix per task and no per-module FIM forward."""
    import dtn.models.grouped as grp

    ref, grouped = _pair("dtn")
    calls = {"gated_cross": 0, "mask_block": 0, "hcnet": 0, "softmax_mix": 0}
    for name in calls:
        orig = getattr(grp, name)

        def counted(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(grp, name, counted)
    monkeypatch.setattr(grp, "mix", lambda *a, **k: (calls.__setitem__("softmax_mix", calls["softmax_mix"] + 1),
                                                     grp.softmax_mix(*a, **k))[1])
    grouped(_batch()[0])
    layers = _cfg().gdcn["num_layers"]
    assert calls == {"gated_cross": layers, "mask_block": 1, "hcnet": 1, "softmax_mix": 3}, calls


@interpreter
@needs_interpreter
def test_trimmed_fims_drop_out_of_their_group():
    ref, grouped = _pair("dtn")
    K = ref.K
    active = ref.active.clone()
    active[0, 0] = False  # task 0 no longer uses its own GDCN ...
    active[1, 2 * K] = False  # ... nor does its successor through the TSN
    for model in (ref, grouped):
        report = model.apply_trim(active)
        assert "t1/gdcn" in report["removed"]
    _compare(ref, grouped, _batch()[0])


@interpreter
@needs_interpreter
def test_grouped_training_matches_reference():
    """A few Adam steps in grouped mode follow the reference model's losses and weights."""
    ref, grouped = _pair("dtn")
    losses = {}
    for tag, model in (("ref", ref), ("grouped", grouped)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[tag] = []
        for step in range(4):
            batch, labels = _batch(seed=step)
            opt.zero_grad(set_to_none=True)
            loss, _ = model.loss(model(batch), labels)
            loss.backward()
            opt.step()
            losses[tag].append(loss.item())
    for a, b in zip(losses["grouped"], losses["ref"]):
        assert abs(a - b) <= 1e-5 * abs(b), losses
    for (name, p), q in zip(ref.named_parameters(), grouped.parameters()):
        assert_close(q, p, name, atol=2e-5, rtol=1e-4)


def test_state_dict_is_per_module_in_every_mode():
    ref, grouped = _pair("dtn")
    assert list(ref.state_dict()) == list(grouped.state_dict())
    grouped.load_state_dict(ref.state_dict())
    dtn_kernels.set_kernels(grouped, "reference")
    assert dtn_kernels.kernels_of(grouped) == "reference" and not grouped.group_kernels


@interpreter
@needs_interpreter
def test_group_parameters_stay_stacked_and_are_not_copied_per_step(monkeypatch):
    """The first grouped step moves each group's parameters into one [G, ...] storage that the members'
    parameters view; later steps (optimizer steps included) read it in place: no restack, no
    torch.stack of parameters. The state_dict, the parameters' identity and their values are unchanged;
    a model whose parameters were moved (deepcopy, .to) is restacked."""
    import dtn.models.grouped as grp

    ref, grouped = _pair("dtn")
    params_before = list(grouped.parameters())
    restacks = []
    orig = grp._restack
    monkeypatch.setattr(grp, "_restack", lambda ts: restacks.append(len(ts)) or orig(ts))
    opt = torch.optim.Adam(grouped.parameters(), lr=0.01)
    for step in range(3):
        batch, labels = _batch(seed=step)
        opt.zero_grad(set_to_none=True)
        loss, _ = grouped.loss(grouped(batch), labels)
        loss.backward()
        opt.step()
        if step == 0:
            first = len(restacks)
            assert first > 0
    assert len(restacks) == first, "parameters were restacked after the first step"
    assert list(grouped.parameters()) == params_before  # the same Parameter objects
    def codebooks(model):
        return [net.codebook for m in model.modules() for net in getattr(m, "hcnets", [])]

    assert len(codebooks(grouped)) >= 2
    storage = codebooks(grouped)[0]._dtn_group_storage
    assert grp._aliases(storage, codebooks(grouped)) and storage.shape[0] == len(codebooks(grouped))
    assert list(ref.state_dict()) == list(grouped.state_dict())
    moved = copy.deepcopy(grouped)
    want = moved(_batch()[0])
    assert grp._aliases(codebooks(moved)[0]._dtn_group_storage, codebooks(moved))
    torch.testing.assert_close(grouped(_batch()[0]), want)
