"""Every multi-task model: shapes, gradient flow, overfitting a tiny batch; DTN's TSN, gates and trim."""
import dataclasses

import pytest
import torch

from dtn.models import MODEL_REGISTRY, RemovedFIM, build_model

MODELS = sorted(MODEL_REGISTRY)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_gradient_flow(name, tiny_schema, tiny_batch, small_model_cfg):
    batch, labels = tiny_batch
    model = build_model(name, tiny_schema, small_model_cfg)
    logits = model(batch)
    assert logits.shape == (8, 2)
    loss, per_task = model.loss(logits, labels)
    assert per_task.shape == (2,)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"
    assert torch.allclose(model.predict(batch), torch.sigmoid(logits.detach()))


@pytest.mark.parametrize("name", MODELS)
def test_overfits_a_tiny_batch(name, tiny_schema, tiny_batch, small_model_cfg):
    batch, labels = tiny_batch
    model = build_model(name, tiny_schema, small_model_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, _ = model.loss(model(batch), labels)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.05 * first, f"{name}: loss {first:.3f} -> {float(loss):.3f}"
    assert torch.equal((model.predict(batch) > 0.5).float(), labels)


def test_ple_multi_level_and_mmoe_structure(tiny_schema, small_model_cfg):
    ple = build_model("ple", tiny_schema, dataclasses.replace(small_model_cfg, num_levels=3, num_specific_experts=2,
                                                              num_shared_experts=3))
    assert len(ple.levels) == 3
    assert ple.levels[0].shared_gate is not None and ple.levels[-1].shared_gate is None
    assert ple.levels[0].shared_gate.num_experts == 2 * 2 + 3
    assert ple.levels[0].gates[0].num_experts == 2 + 3
    mmoe = build_model("mmoe", tiny_schema, dataclasses.replace(small_model_cfg, num_experts=5))
    assert len(mmoe.levels) == 1 and len(mmoe.levels[0].shared) == 5 and len(mmoe.levels[0].specific[0]) == 0


def test_tfi_uses_fim_experts(tiny_schema, small_model_cfg):
    from dtn.layers import MaskNet

    tfi = build_model("tfi", tiny_schema, dataclasses.replace(small_model_cfg, tfi_fim="masknet"))
    assert isinstance(tfi.levels[0].shared[0], MaskNet) and isinstance(tfi.levels[0].specific[1][0], MaskNet)


def test_dtn_task_sensitive_network(tiny_schema, tiny_batch, small_model_cfg):
    batch, _ = tiny_batch
    model = build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, task_order=["t2", "t1"]))
    assert model.predecessor == {1: None, 0: 1}
    assert model.num_candidates == [3 * 3, 2 * 3]  # t1 also sees t2's MFI
    assert model.candidate_names(0)[-1] == "t2/memonet*p(t2)"
    out = model.forward_details(batch)
    assert [w.shape for w in out["gate_weights"]] == [(8, 9), (8, 6)]
    torch.testing.assert_close(out["gate_weights"][0].sum(1), torch.ones(8))
    # stop-gradient through p(t2): t1's loss does not reach t2's tower
    out["logits"][:, 0].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.towers[1].parameters())
    off = build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, tsn=False))
    assert off.num_candidates == [6, 6]
    with pytest.raises(ValueError, match="permutation"):
        build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, task_order=["t1", "t3"]))


def test_dtn_tsn_without_stop_gradient(tiny_schema, tiny_batch, small_model_cfg):
    batch, _ = tiny_batch
    model = build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, tsn_stop_gradient=False))
    model(batch)[:, 1].sum().backward()  # t2 sees p(t1) with gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.towers[0].parameters())


def test_dtn_reference_gate_mode(tiny_schema, tiny_batch, small_model_cfg):
    batch, _ = tiny_batch
    model = build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, gate_mode="reference"))
    w = model.forward_details(batch)["gate_weights"]
    torch.testing.assert_close(w[1][:, :3].sum(1), torch.ones(8))  # own experts: one softmax
    torch.testing.assert_close(w[1][:, 3:].sum(1), torch.ones(8))  # shared + predecessor: another


def test_dtn_trim_removes_unused_fims(tiny_schema, tiny_batch, small_model_cfg):
    batch, _ = tiny_batch
    model = build_model("dtn", tiny_schema, small_model_cfg)
    K = model.K
    # t2 (last task) drops its own GDCN; nobody else reads t2's MFI, so the module goes
    weights = [torch.full((n,), 1.0 / n, dtype=torch.float64) for n in model.num_candidates]
    weights[1][0] = 0.0
    info = model.trim(weights, threshold=0.01)
    assert info["removed"] == ["t2/gdcn"]
    assert isinstance(model.task_mfi[1][0], RemovedFIM)
    assert info["params_after"] < info["params_before"]
    out = model.forward_details(batch)
    assert torch.all(out["gate_weights"][1][:, 0] == 0)
    torch.testing.assert_close(out["gate_weights"][1].sum(1), torch.ones(8))
    # t1's own GDCN is still offered to t2 through the TSN, so dropping it from t1's gate alone keeps it
    weights = [torch.full((n,), 1.0 / n, dtype=torch.float64) for n in model.num_candidates]
    weights[0][0] = 0.0
    weights[1][0] = 0.0
    assert model.trim(weights, threshold=0.01)["removed"] == []
    weights[1][2 * K] = 0.0
    assert model.trim(weights, threshold=0.01)["removed"] == ["t1/gdcn"]


def test_unknown_model_and_fim(tiny_schema, small_model_cfg):
    with pytest.raises(ValueError, match="unknown model 'xgboost'"):
        build_model("xgboost", tiny_schema, small_model_cfg)
    with pytest.raises(ValueError, match=r"model.fims\[1\] = 'fm': allowed: one of 'gdcn'"):  # a ConfigError
        build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, fims=["gdcn", "fm"]))
    with pytest.raises(ValueError, match="not a categorical feature"):
        build_model("dtn", tiny_schema, dataclasses.replace(small_model_cfg, memonet={"fields": ["a", "x"]}))
