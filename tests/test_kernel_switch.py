"""dtn_kernels.set_kernels: one switch moves a whole model between reference layers and fused ops."""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import assert_close, interpreter, needs_interpreter

import copy

import pytest
import torch

import dtn_kernels
from dtn.config import load_config
from dtn.features import FeatureBatch, FeatureSpec, Schema
from dtn.layers import CrossNetwork, GatedCrossLayer, HCNet, MaskBlock, SoftmaxGate
from dtn.models import build_model
from dtn_kernels.nn import FUSED_TWINS

OPS = ("dtn.gated_cross", "dtn.mask_block", "dtn.hcnet", "dtn.softmax_gate")


def tiny():
    schema = Schema([FeatureSpec("a", cardinality=5), FeatureSpec("b", cardinality=7), FeatureSpec("c", cardinality=3),
                     FeatureSpec("x", kind="numeric")], labels=["t1", "t2"])
    torch.manual_seed(0)
    model = build_model("dtn", schema, load_config("cpu").model)
    g = torch.Generator().manual_seed(1)
    B = 5
    cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in (5, 7, 3)], dim=1)
    return model, FeatureBatch(cat, torch.randn(B, 1, generator=g))


def test_switch_swaps_every_known_layer_and_back():
    model, _ = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    known = [m for m in model.modules() if type(m) in FUSED_TWINS]
    assert {type(m) for m in known} >= {GatedCrossLayer, CrossNetwork, MaskBlock, HCNet, SoftmaxGate}
    assert dtn_kernels.set_kernels(model, "fused") == len(known)
    assert dtn_kernels.kernels_of(model) == "fused"
    assert all(type(m) in FUSED_TWINS.values() for m in known)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert dtn_kernels.set_kernels(model, "reference") == len(known)
    assert dtn_kernels.kernels_of(model) == "reference"
    with pytest.raises(ValueError):
        dtn_kernels.set_kernels(model, "fast")


def test_fused_state_dict_loads_into_reference():
    model, batch = tiny()
    fused = copy.deepcopy(model)
    dtn_kernels.set_kernels(fused, "fused")
    ref = copy.deepcopy(model)
    ref.load_state_dict(fused.state_dict())
    assert torch.equal(ref(batch), model(batch))


def _compare_models(ref_model, fused_model, batch):
    out_ref = ref_model(batch)
    out = fused_model(batch)
    assert_close(out, out_ref, "logits")
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(ref_model.named_parameters(), fused_model.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        assert_close(q.grad, p.grad, f"grad {name}")


@interpreter
@needs_interpreter
def test_dtn_fused_eager_matches_reference():
    model, batch = tiny()
    fused = copy.deepcopy(model)
    dtn_kernels.set_kernels(fused, "fused")
    _compare_models(model, fused, batch)


@interpreter
@needs_interpreter
def test_dtn_fused_compiled_fullgraph_runs_the_ops():
    """torch.compile(fullgraph=True) of the fused DTN on CPU: the graph holds the dtn ops, which run
    their Triton kernels through the interpreter; output and gradients match the reference model."""
    from torch._inductor.compile_fx import compile_fx

    model, batch = tiny()
    fused = copy.deepcopy(model)
    dtn_kernels.set_kernels(fused, "fused")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    _compare_models(model, compiled, batch)
    code = "\n".join(graphs)
    for name in OPS:
        assert f"torch.ops.{name}" in code, f"{name} not in the compiled graph"


def test_fused_layers_run_the_reference_forward_where_triton_cannot(monkeypatch):
    """Without a Triton kernel to run (CPU, no interpreter), a fused layer runs its reference
    forward, not the op's slower closed-form twin; REFERENCE_WITHOUT_TRITON=False calls the op."""
    import dtn_kernels.nn as fnn

    calls = []
    monkeypatch.setattr(fnn, "use_triton", lambda t: False)
    monkeypatch.setattr(fnn, "gated_cross", lambda *a, **k: calls.append(a) or a[1])
    layer = GatedCrossLayer(6)
    ref = copy.deepcopy(layer)
    dtn_kernels.set_kernels(layer, "fused")
    x0, xl = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(layer(x0, xl), ref(x0, xl), rtol=0, atol=0)
    assert calls == []
    monkeypatch.setattr(fnn, "REFERENCE_WITHOUT_TRITON", False)
    layer(x0, xl)
    assert len(calls) == 1
