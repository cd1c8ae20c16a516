"""torch.ops.dtn.gated_cross: Triton kernels (interpreter) vs the PyTorch twin, opcheck, gradcheck."""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import (LOW_PRECISION, compare_fwd_bwd, interpreter, needs_cuda, needs_interpreter,
                        requires_cuda)

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dtn_kernels.sm90_check import GPU_TEST_SHAPES

import dtn_kernels  # noqa: F401  (registers the ops)
from dtn_kernels.ops.gated_cross import gated_cross
from dtn_kernels.reference.pt_gated_cross import pt_gated_cross

NAMES = ["x0", "xl", "weight", "bias", "gate_weight"]


def make_args(B, D, gated, dtype=torch.float32, device="cpu", seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    x0, xl = r(B, D), r(B, D)
    if noncontig:  # column slices of wider tensors
        x0, xl = r(B, 2 * D)[:, ::2], r(B, 2 * D)[:, 1::2]
    w = r(D, D) / D ** 0.5
    return [x0, xl, w, r(D), (r(D, D) / D ** 0.5) if gated else None]


def op(x0, xl, w, b, wg):
    return torch.ops.dtn.gated_cross(x0, xl, w, b, wg, False)[0]


@interpreter
@needs_interpreter
@pytest.mark.parametrize("route", ["triton", "torch"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("B,D,noncontig", [(1, 1, False), (1, 7, False), (19, 23, False), (5, 33, True)])
def test_matches_twin(B, D, gated, noncontig, route, monkeypatch):
    """Both GEMM routes: the fused tensor-core kernel (route triton) and cuBLAS pre-activations with
    the element-wise kernel (route torch, what IEEE fp32 runs on a GPU)."""
    monkeypatch.setenv("DTN_FUSED_GEMM", route)
    args = make_args(B, D, gated, noncontig=noncontig)
    diff = [0, 1, 2, 3] + ([4] if gated else [])
    compare_fwd_bwd(op, pt_gated_cross, args, diff, names=NAMES)


@interpreter
@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(B=st.integers(1, 20), D=st.integers(1, 24), gated=st.booleans(), seed=st.integers(0, 99))
def test_matches_twin_hypothesis(B, D, gated, seed):
    args = make_args(B, D, gated, seed=seed)
    compare_fwd_bwd(op, pt_gated_cross, args, [0, 1, 2, 3] + ([4] if gated else []), seed=seed, names=NAMES)


@interpreter
@needs_interpreter
def test_empty_batch():
    x0, xl, w, b, wg = make_args(0, 5, True)
    out = op(x0, xl, w, b, wg)
    assert out.shape == (0, 5)


@interpreter
@needs_interpreter
def test_kernel_is_used_not_the_twin(monkeypatch):
    """Under DTN_TRITON_ON_CPU=1 the op must run the Triton launcher."""
    import dtn_kernels.triton.triton_gated_cross as T

    calls = []
    orig = T.gated_cross_forward
    monkeypatch.setattr(T, "gated_cross_forward", lambda *a: calls.append(1) or orig(*a))
    op(*make_args(3, 5, True))
    assert calls


@interpreter
@needs_interpreter
@pytest.mark.parametrize("gated", [True, False])
def test_opcheck_triton(gated):
    args = [a.requires_grad_() if a is not None else None for a in make_args(3, 9, gated)]
    torch.library.opcheck(torch.ops.dtn.gated_cross.default, (*args, False))


@pytest.mark.parametrize("gated", [True, False])
def test_opcheck_and_gradcheck_twin(gated):
    """float64 always runs the twin: gradcheck checks its closed-form backward."""
    args = [a.requires_grad_() if a is not None else None for a in make_args(3, 5, gated, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.dtn.gated_cross.default, (*args, False))
    assert torch.autograd.gradcheck(lambda *a: op(*a), args)


def test_autocast_wrapper_casts():
    x0, xl, w, b, wg = make_args(2, 4, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_cross(x0, xl, w, b, wg)
    assert out.dtype == torch.bfloat16


@requires_cuda
@needs_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,D,gated", GPU_TEST_SHAPES["gated_cross"])
def test_cuda_dtypes(B, D, gated, dtype):
    """Forward and every gradient computed in ``dtype`` on the GPU, against the twin in higher precision."""
    args = make_args(B, D, gated, device="cuda")
    compare_fwd_bwd(op, pt_gated_cross, args, [0, 1, 2, 3] + ([4] if gated else []), names=NAMES, dtype=dtype)


def _members(G, x0, xl, w, b, wg):
    """G separate single-layer twins: member g of the parameters, of x0 / xl unless shared ([B, D])."""
    pick = lambda t, g: t if t.dim() == 2 else t[g]  # noqa: E731
    return torch.stack([pt_gated_cross(pick(x0, g), pick(xl, g), w[g], b[g], wg[g] if wg is not None else None)
                        for g in range(G)])


@interpreter
@needs_interpreter
@pytest.mark.parametrize("route", ["triton", "torch"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("G,shared", [(1, True), (2, False), (3, True)])
def test_group_matches_members(G, shared, gated, route, monkeypatch):
    """G cross layers in one launch equal G separate layers, forward and every gradient; a shared
    input (x0 = xl = e, DTN's first layer) gets the sum of the members' gradients."""
    monkeypatch.setenv("DTN_FUSED_GEMM", route)
    B, D = 7, 13
    members = [make_args(B, D, gated, seed=s) for s in range(G)]
    x0, xl = members[0][0], members[0][1]
    if not shared:
        x0, xl = torch.stack([m[0] for m in members]), torch.stack([m[1] for m in members])
    params = [torch.stack([m[i] for m in members]) for i in (2, 3)]
    wg = torch.stack([m[4] for m in members]) if gated else None
    diff = [0, 1, 2, 3] + ([4] if gated else [])
    compare_fwd_bwd(op, lambda *a: _members(G, *a), [x0, xl, *params, wg], diff, names=NAMES)


@interpreter
@needs_interpreter
def test_group_opcheck():
    members = [make_args(3, 9, True, seed=s) for s in range(2)]
    args = [members[0][0], torch.stack([m[1] for m in members])] + [torch.stack([m[i] for m in members])
                                                                    for i in (2, 3, 4)]
    torch.library.opcheck(torch.ops.dtn.gated_cross.default, (*[a.requires_grad_() for a in args], None))


@interpreter
@needs_interpreter
def test_group_backward_with_a_broadcast_gradient():
    """The group's output gradient may arrive with any member stride (out.sum(0) gives stride 0): the
    backward packs it before the kernel reads member g at g * B * D."""
    G, B, D = 3, 5, 8
    members = [make_args(B, D, True, seed=s) for s in range(G)]
    e = members[0][0]
    params = [torch.stack([m[i] for m in members]) for i in (2, 3, 4)]
    compare_fwd_bwd(lambda *a: op(*a).sum(0), lambda e, xl, w, b, wg: _members(G, e, xl, w, b, wg).sum(0),
                    [e, e, *params], [0, 1, 2, 3, 4], names=NAMES)


def _aten_ops(fn):
    """The aten ops (names without the ``aten::`` prefix) that ``fn()`` runs, custom ops' insides included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name[len("aten::"):] for e in prof.events() if e.name.startswith("aten::")]


@interpreter
@needs_interpreter
@pytest.mark.parametrize("route", ["triton", "torch"])
@pytest.mark.parametrize("G", [0, 3])
def test_backward_does_only_the_gemms_the_math_needs(route, G, monkeypatch):
    """No dual GEMM recomputed in the backward (it reads the forward's pre-activations), ONE GEMM for
    [dW; dWg], dxl as two accumulating GEMMs on the separate weights, and no weight concatenation in
    forward or backward -- on both GEMM routes, single and grouped."""
    import dtn_kernels.triton.triton_gated_cross as T

    monkeypatch.setenv("DTN_FUSED_GEMM", route)
    pre_calls = []
    orig = T.pre_activations
    monkeypatch.setattr(T, "pre_activations", lambda *a: pre_calls.append(1) or orig(*a))
    x0, xl, w, b, wg = make_args(6, 10, True)
    if G:
        w, b, wg = (torch.stack([t] * G) for t in (w, b, wg))
    params = [t.requires_grad_() for t in (x0, xl, w, b, wg)]
    outs = []
    fwd = _aten_ops(lambda: outs.append(op(*params)))
    bwd = _aten_ops(lambda: outs[0].backward(torch.ones_like(outs[0])))
    assert len(pre_calls) == (1 if route == "torch" else 0), "pre-activations computed in the backward"
    assert "cat" not in fwd and "cat" not in bwd
    gemms = [n for n in bwd if n in ("mm", "bmm", "addmm", "baddbmm", "baddbmm_", "matmul")]
    assert sorted(gemms) == ["baddbmm", "baddbmm_", "bmm"], gemms  # dxl (2, the second accumulating) + [dW; dWg] (1)


@interpreter
@needs_interpreter
@pytest.mark.parametrize("route", ["triton", "torch"])
def test_without_saved_pre_activations(route, monkeypatch):
    """save_pre=False (inference: no gradient needed) returns empty pre-activations; a backward given
    them anyway recomputes z and a and still matches the twin."""
    monkeypatch.setenv("DTN_FUSED_GEMM", route)
    args = make_args(5, 9, True)
    out, z, a = torch.ops.dtn.gated_cross(*args, False, False)
    assert z.numel() == 0 and a.numel() == 0
    torch.testing.assert_close(out, pt_gated_cross(*args), atol=1e-5, rtol=1e-4)
    go = torch.randn(5, 9)
    got = torch.ops.dtn.gated_cross_backward(go, *args, z, a, False)
    _, z1, a1 = torch.ops.dtn.gated_cross(*args, False, True)
    want = torch.ops.dtn.gated_cross_backward(go, *args, z1, a1, False)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the wrapper asks for no pre-activations when no gradient will be taken
        calls = []
        orig = torch.ops.dtn.gated_cross
        x0, xl, w, b, wg = args
        monkeypatch.setattr(torch.ops.dtn, "gated_cross", lambda *a: calls.append(a[-1]) or orig(*a))
        gated_cross(x0, xl, w, b, wg)
    assert calls == [False]
