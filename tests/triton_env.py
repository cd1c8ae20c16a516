"""Shared setup for the Triton kernel tests; import it before anything imports triton.

Sets TRITON_INTERPRET=1 (unless the caller set it, e.g. TRITON_INTERPRET=0 on a GPU machine)
and DTN_TRITON_ON_CPU=1 so that the ops run their Triton kernels on CPU tensors through the
interpreter. Independent of tests/conftest.py.
"""
from __future__ import annotations

import os
import sys

INTERPRET = os.environ.setdefault("TRITON_INTERPRET", "1") == "1"
if INTERPRET:
    os.environ["DTN_TRITON_ON_CPU"] = "1"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# interpreter tests: marked, and skipped when the interpreter is off (GPU runs)
interpreter = pytest.mark.interpreter
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
requires_cuda = pytest.mark.requires_cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device and TRITON_INTERPRET=0")


def assert_close(actual, expected, name="", rtol=1e-4, atol=1e-5):
    """allclose scaled to the reference's magnitude, reporting NaN/inf and the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: NaN/inf pattern differs"
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    err = (a - e).abs()
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= atol * scale + rtol * scale, f"{name}: max abs err {worst:.3e} (scale {scale:.3g})"


def compare_fwd_bwd(op, twin, args, diff_idx, n_outputs=1, seed=0, names=None, n_grad=None, **tol):
    """Run ``op`` and ``twin`` on the same args, compare outputs (the first ``n_outputs``) and the
    gradients of every arg in ``diff_idx`` under one shared random upstream gradient for each of the
    first ``n_grad`` outputs (default: all compared outputs)."""
    def run(fn):
        xs = [a.detach().clone().requires_grad_(i in diff_idx) if torch.is_tensor(a) else a
              for i, a in enumerate(args)]
        outs = fn(*xs)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        return xs, outs[:n_outputs]

    xs1, o1 = run(op)
    xs2, o2 = run(twin)
    g = torch.Generator().manual_seed(seed)
    for k, (a, b) in enumerate(zip(o1, o2)):
        assert_close(a, b, f"output {k}", **tol)
    n_grad = n_outputs if n_grad is None else n_grad
    o1, o2 = o1[:n_grad], o2[:n_grad]
    ups = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in o2]
    diff = [i for i in diff_idx]
    g1 = torch.autograd.grad(o1, [xs1[i] for i in diff], ups, allow_unused=True)
    g2 = torch.autograd.grad(o2, [xs2[i] for i in diff], ups, allow_unused=True)
    for i, a, b in zip(diff, g1, g2):
        label = names[i] if names else f"arg {i}"
        assert a is not None and b is not None, f"grad of {label} missing"
        assert_close(a, b, f"grad {label}", **tol)
