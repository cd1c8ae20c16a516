"""Shared setup for the Triton kernel tests; import it before anything imports triton.

Sets TRITON_INTERPRET=1 (unless the caller set it, e.g. TRITON_INTERPRET=0 on a GPU machine)
and DTN_TRITON_ON_CPU=1 so that the ops run their Triton kernels on CPU tensors through the
interpreter. Independent of tests/conftest.py.

How results are judged (``check_tensor``): against a reference computed in higher precision
(fp64 for fp32 kernels, fp32 for bf16 / fp16 kernels), element-wise
``|a - e| <= atol * scale + rtol * |e|`` with ``scale = max(1, max|e|)`` and (atol, rtol) from
:data:`TOLERANCES` by dtype; the NaN / +inf / -inf pattern must match exactly. A tensor that
misses the element-wise bound still passes when its largest error is within twice eager
PyTorch's own error in the same dtype (flash-attention's rule): an op is never held to more
than PyTorch itself achieves there. (The reference used to be the fp32 twin: a MaskNet case
with a LayerNorm over 2 columns then failed because the *twin* was 20x less accurate than the
kernel against fp64 -- the kernel was right, the oracle was not.)
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

# (atol, rtol) per kernel dtype, against the higher-precision reference
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)  # the GPU tests' dtypes
# fp32 under a TF32 matmul policy ("high"): TF32 keeps 10 mantissa bits, as fp16 does
TF32_TOLERANCES = TOLERANCES[torch.float16]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _pattern(t: torch.Tensor):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def check_tensor(name: str, actual, expected, atol: float, rtol: float, baseline=None) -> None:
    """``actual`` against the higher-precision ``expected`` (see the module docstring); ``baseline``
    is eager PyTorch's result in ``actual``'s dtype, for the 2x rule."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for kind, pa, pe in zip(("NaN", "+inf", "-inf"), _pattern(a), _pattern(e)):
        if not torch.equal(pa, pe):
            where = (pa != pe).nonzero()[0].tolist()
            raise AssertionError(f"{name}: {kind} pattern differs (first at index {where}: actual {a[tuple(where)]}, "
                                 f"expected {e[tuple(where)]})")
    fin = torch.isfinite(e)
    if not fin.any():
        return
    err = torch.where(fin, (a - e).abs(), torch.zeros_like(a))
    scale = max(1.0, float(e[fin].abs().max()))
    bound = atol * scale + rtol * e.abs()
    bad = fin & (err > bound)
    if not bad.any():
        return
    worst = float(err.max())
    base = None
    if baseline is not None:
        b = baseline.detach().double().cpu()
        base = float(torch.where(fin, (b - e).abs(), torch.zeros_like(b)).max())
        if worst <= 2 * base:
            return
    idx = tuple((err == err.max()).nonzero()[0].tolist())
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.numel()} elements outside |a-e| <= {atol:g}*{scale:.3g} + {rtol:g}*|e|; "
        f"worst at index {list(idx)}: actual {float(a[idx]):.6g}, expected {float(e[idx]):.6g} (error {worst:.3e})"
        + (f"; eager PyTorch's own error in this dtype {base:.3e}" if base is not None else ""))


def assert_close(actual, expected, name="", rtol=None, atol=None):
    """Element-wise closeness with the tolerances of ``actual``'s dtype (or the given ones)."""
    d_atol, d_rtol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    check_tensor(name, actual, expected, d_atol if atol is None else atol, d_rtol if rtol is None else rtol)


def _run(fn, args, diff_idx, dtype, n_outputs, n_grad, seed, keep=()):
    """Outputs (first ``n_outputs``) and the gradients of ``diff_idx`` under one fixed random upstream
    gradient per differentiable output, with the floating args cast to ``dtype`` (those in ``keep``
    only when ``dtype`` is the higher-precision reference's)."""
    def cast(i, a):
        if not a.is_floating_point() or (i in keep and dtype.itemsize <= a.dtype.itemsize):
            return a.detach()
        return a.detach().to(dtype)

    xs = [cast(i, a).clone().requires_grad_(i in diff_idx) if torch.is_tensor(a) else a for i, a in enumerate(args)]
    outs = fn(*xs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    outs = outs[:n_outputs]
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
           for o in outs[:n_grad]]
    grads = torch.autograd.grad(outs[:n_grad], [xs[i] for i in diff_idx], ups, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def compare_fwd_bwd(op, twin, args, diff_idx, n_outputs=1, seed=0, names=None, n_grad=None, dtype=None,
                    tolerances=None, keep=()):
    """Run ``op`` in ``dtype`` (default: the args' floating dtype) and compare its outputs and the
    gradients of every arg in ``diff_idx`` with the ``twin`` run in higher precision, eager PyTorch
    (the twin in ``dtype``) as the baseline of the 2x rule; one shared upstream gradient.
    ``tolerances``: (atol, rtol) instead of the dtype's; ``keep``: indices of args that stay in their
    own (higher) dtype in the op's and the baseline's runs (e.g. an fp32 codebook next to bf16 weights)."""
    dtype = dtype or next(a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point())
    n_grad = n_outputs if n_grad is None else n_grad
    atol, rtol = tolerances or TOLERANCES[dtype]
    ko, kg = _run(op, args, diff_idx, dtype, n_outputs, n_grad, seed, keep)
    bo, bg = _run(twin, args, diff_idx, dtype, n_outputs, n_grad, seed, keep)
    eo, eg = _run(twin, args, diff_idx, reference_dtype(dtype), n_outputs, n_grad, seed, keep)
    for k, (a, b, e) in enumerate(zip(ko, bo, eo)):
        check_tensor(f"output {k} ({dtype})", a, e, atol, rtol, baseline=b)
    for i, a, b, e in zip(diff_idx, kg, bg, eg):
        label = names[i] if names else f"arg {i}"
        assert a is not None and e is not None, f"grad of {label} missing"
        want = args[i].dtype if (i in keep and args[i].dtype.itemsize > dtype.itemsize) else dtype
        assert a.dtype == want, f"grad {label} is {a.dtype}, expected {want} (computed in the test's dtype)"
        check_tensor(f"grad {label} ({dtype})", a, e, atol, rtol, baseline=b)
