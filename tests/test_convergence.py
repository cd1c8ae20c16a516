"""Convergence: a small DTN trained N steps with the fused kernels and with the reference layers,
from the same initial weights on the same batches, gives the same loss curve and the same parameter
changes.

What a short run can resolve: every parameter change (final minus initial weights) is compared
element-wise with the reference's (:func:`numerics.check_close`), with a tolerance far below one
optimizer step, and the run must move the weights well beyond that tolerance (else it would
resolve nothing). Comparing the final weights to a few learning rates, as this test once did,
passes whatever the kernels compute: 8 Adam steps at lr 2e-3 move a weight by at most 1.6e-2.

On CPU the fused kernels run through the Triton interpreter (fp32); on a GPU (when one is lent)
the same comparison runs in fp32 under torch's default matmul policy and in bf16 autocast.
"""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import interpreter, needs_cuda, needs_interpreter, requires_cuda

import copy

import pytest
import torch

import dtn_kernels
from conftest import small_model_config
from numerics import check_close
from dtn.features import FeatureBatch, FeatureSpec, Schema
from dtn.models import build_model

CARDS = (5, 7, 3, 11)


def _setup(device="cpu"):
    schema = Schema([FeatureSpec(f"c{i}", cardinality=c) for i, c in enumerate(CARDS)]
                    + [FeatureSpec("x", kind="numeric"), FeatureSpec("y", kind="numeric")], labels=["t1", "t2"])
    cfg = small_model_config(tower_hidden=[8], masknet={"mask_hidden": 12}, memonet={"num_buckets": 53})
    torch.manual_seed(0)
    ref = build_model("dtn", schema, cfg).to(device)
    fused = copy.deepcopy(ref)
    dtn_kernels.set_kernels(ref, "reference")
    assert dtn_kernels.set_kernels(fused, "fused") > 0
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        B = 24
        cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in CARDS], 1)
        labels = (torch.rand(B, 2, generator=g) < 0.4).float()
        batches.append((FeatureBatch(cat, torch.randn(B, 2, generator=g)).to(device), labels.to(device)))
    return ref, fused, batches


def _train(model, batches, steps, opt_name, autocast_dtype=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if opt_name == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    device = next(model.parameters()).device.type
    for step in range(steps):
        batch, labels = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = model.loss(model(batch), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _compare(ref, fused, batches, steps, opt_name, loss_rtol, delta_atol, delta_rtol, autocast_dtype=None,
             resolves=True):
    start = {name: p.detach().clone() for name, p in ref.named_parameters()}
    l_ref = _train(ref, batches, steps, opt_name, autocast_dtype)
    l_fused = _train(fused, batches, steps, opt_name, autocast_dtype)
    assert l_ref[-1] < l_ref[0], f"the reference did not learn: {l_ref}"
    for step, (a, b) in enumerate(zip(l_fused, l_ref)):
        assert abs(a - b) <= loss_rtol * abs(b), f"step {step}: fused loss {a:.6f} vs reference {b:.6f}\n{l_fused}\n{l_ref}"
    ref_params = dict(ref.named_parameters())
    moved = 0.0
    for name, p in fused.named_parameters():
        want = (ref_params[name].detach().float() - start[name].float())
        got = p.detach().float() - start[name].float()
        check_close(got, want, delta_atol, delta_rtol, f"change of parameter {name} after {steps} steps")
        moved = max(moved, float(want.abs().max()))
    assert not resolves or moved > 100 * delta_atol, f"the weights moved at most {moved:.2e}: the tolerance {delta_atol:g} resolves nothing"


@interpreter
@needs_interpreter
def test_sgd_fp32_interpreter():
    """SGD is linear in the gradients: the changes (up to ~1e-3 here, lr 0.05) agree to fp32 rounding
    of the gradients: atol 1e-6, rtol 1e-3 (measured: largest difference 3e-8, loss curves 1e-7)."""
    ref, fused, batches = _setup()
    _compare(ref, fused, batches, steps=8, opt_name="sgd", loss_rtol=1e-5, delta_atol=1e-6, delta_rtol=1e-3)


@interpreter
@needs_interpreter
def test_adam_fp32_interpreter():
    """Adam moves every weight by up to lr = 2e-3 a step whatever the gradient's size; the changes must
    agree to a thousandth of one step (atol 2e-6 = 1e-3 lr, rtol 1e-3). A gradient at rounding level
    whose sign differed between the two would flip an update by up to 2 lr and be named here; none
    does in this case (measured: largest difference 1.4e-7, loss curves 2e-7)."""
    ref, fused, batches = _setup()
    _compare(ref, fused, batches, steps=8, opt_name="adam", loss_rtol=1e-5, delta_atol=2e-6, delta_rtol=1e-3)


@requires_cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu(dtype):
    ref, fused, batches = _setup("cuda")
    # the GPU bounds are the earlier absolute ones on the weights (the same start, so on the changes); not
    # yet re-derived on a GPU: bf16's 5e-2 is above 20 Adam steps' largest travel (4e-2), it only checks the loss
    if dtype is None:
        _compare(ref, fused, batches, steps=20, opt_name="sgd", loss_rtol=1e-4, delta_atol=1e-4, delta_rtol=0.0,
                 resolves=False)
    else:  # both models under bf16 autocast: each rounds differently, so curves agree to bf16 precision
        _compare(ref, fused, batches, steps=20, opt_name="adam", loss_rtol=3e-2, delta_atol=5e-2, delta_rtol=0.0,
                 autocast_dtype=dtype, resolves=False)
