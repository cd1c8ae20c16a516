"""torch.ops.dtn.softmax_gate: Triton kernels (interpreter) vs the PyTorch twin, opcheck, gradcheck."""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import (LOW_PRECISION, assert_close, compare_fwd_bwd, interpreter, needs_cuda, needs_interpreter,
                        requires_cuda)

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dtn_kernels.sm90_check import GPU_TEST_SHAPES

import dtn_kernels  # noqa: F401
from dtn_kernels.reference.pt_softmax_gate import pt_softmax_gate

NAMES = ["x", "experts", "weight", "bias"]


def make_args(B, din, K, h, mask_kind=None, dtype=torch.float32, device="cpu", seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = r(B, din)
    experts = r(B, K, h) if not noncontig else r(B, h, K).transpose(1, 2)
    mask = None
    if mask_kind == "1d":
        mask = (torch.arange(K) % 3 != 1).to(device)
    elif mask_kind == "2d":
        mask = torch.rand(B, K, generator=g) > 0.4
        mask[:, 0] = True  # never a fully masked row (softmax of all -inf is NaN on both paths)
        mask = mask.to(device)
    return [x, experts, r(K, din), r(K), mask]


def op(x, experts, w, b, mask):
    return torch.ops.dtn.softmax_gate(x, experts, w, b, mask, False)


@interpreter
@needs_interpreter
@pytest.mark.parametrize("B,din,K,h,mask_kind,noncontig", [
    (1, 1, 1, 1, None, False), (1, 5, 3, 7, "1d", False), (19, 23, 6, 37, "2d", False), (7, 9, 17, 5, "1d", True)])
def test_matches_twin(B, din, K, h, mask_kind, noncontig):
    args = make_args(B, din, K, h, mask_kind, noncontig=noncontig)
    compare_fwd_bwd(op, pt_softmax_gate, args, [0, 1, 2, 3], n_outputs=2, names=NAMES)


@interpreter
@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(B=st.integers(1, 20), din=st.integers(1, 20), K=st.integers(1, 9), h=st.integers(1, 20),
       masked=st.booleans(), seed=st.integers(0, 99))
def test_matches_twin_hypothesis(B, din, K, h, masked, seed):
    args = make_args(B, din, K, h, "1d" if (masked and K > 1) else None, seed=seed)
    compare_fwd_bwd(op, pt_softmax_gate, args, [0, 1, 2, 3], n_outputs=2, seed=seed, names=NAMES)


@interpreter
@needs_interpreter
def test_masked_experts_get_zero_weight_and_grad():
    args = [a.requires_grad_() if a.is_floating_point() else a for a in make_args(4, 6, 5, 3, "1d")]
    out, w = op(*args)
    assert torch.all(w[:, 1] == 0) and torch.all(w[:, 4] == 0)
    assert_close(w.sum(1), torch.ones(4), "weights sum")
    out.sum().backward()
    assert torch.all(args[1].grad[:, 1] == 0) and torch.all(args[2].grad[1] == 0)


@interpreter
@needs_interpreter
def test_empty_batch():
    out, w = op(*make_args(0, 4, 3, 5))
    assert out.shape == (0, 5) and w.shape == (0, 3)


@interpreter
@needs_interpreter
@pytest.mark.parametrize("mask_kind", [None, "1d"])
def test_opcheck_triton(mask_kind):
    args = [a.requires_grad_() if a is not None and a.is_floating_point() else a
            for a in make_args(3, 5, 4, 6, mask_kind)]
    torch.library.opcheck(torch.ops.dtn.softmax_gate.default, (*args, False))


@pytest.mark.parametrize("mask_kind", [None, "2d"])
def test_opcheck_and_gradcheck_twin(mask_kind):
    args = [a.requires_grad_() if a is not None and a.is_floating_point() else a
            for a in make_args(3, 4, 4, 5, mask_kind, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.dtn.softmax_gate.default, (*args, False))
    assert torch.autograd.gradcheck(lambda *a: op(*a), args)


@requires_cuda
@needs_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,din,K,h,masked", GPU_TEST_SHAPES["softmax_gate"])
def test_cuda_dtypes(B, din, K, h, masked, dtype):
    """Forward (both outputs) and every gradient computed in ``dtype`` on the GPU, against the twin in
    higher precision."""
    args = make_args(B, din, K, h, "1d" if masked else None, device="cuda")
    compare_fwd_bwd(op, pt_softmax_gate, args, [0, 1, 2, 3], n_outputs=2, names=NAMES, dtype=dtype)


def mix(logits, experts, mask):
    return torch.ops.dtn.softmax_mix(logits, experts, mask)


@interpreter
@needs_interpreter
@pytest.mark.parametrize("B,K,h,mask_kind", [(1, 1, 1, None), (7, 6, 13, "1d"), (19, 9, 37, "2d")])
def test_mix_matches_twin(B, K, h, mask_kind):
    """softmax_mix (logits given, e.g. a column slice of every task's logits from one GEMM)."""
    from dtn_kernels.reference.pt_softmax_gate import pt_softmax_mix

    x, experts, _, _, mask = make_args(B, 3, K, h, mask_kind)
    logits = torch.randn(B, K + 5)[:, 2:2 + K]  # a column slice: row stride K + 5
    compare_fwd_bwd(mix, pt_softmax_mix, [logits, experts, mask], [0, 1], n_outputs=2,
                    names=["logits", "experts"])


@interpreter
@needs_interpreter
def test_mix_opcheck():
    _, experts, _, _, mask = make_args(3, 3, 4, 6, "1d")
    logits = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.dtn.softmax_mix.default, (logits, experts.requires_grad_(), mask))


def test_mix_twin_gradcheck():
    _, experts, _, _, mask = make_args(3, 3, 4, 5, "2d", dtype=torch.float64)
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.dtn.softmax_mix.default, (logits, experts.requires_grad_(), mask))
    assert torch.autograd.gradcheck(lambda lg, ex: mix(lg, ex, mask), (logits, experts))
