"""Shared setup for the Triton kernel tests; import it before anything imports triton.

Sets TRITON_INTERPRET=1 (unless the caller set it, e.g. TRITON_INTERPRET=0 on a GPU machine)
and DTN_TRITON_ON_CPU=1 so that the ops run their Triton kernels on CPU tensors through the
interpreter. Independent of tests/conftest.py. Without Triton the interpreter and GPU tests skip
(there is no kernel to test; the twin against itself would prove nothing).

How results are judged: :mod:`numerics` (tests/numerics.py) -- element-wise
``|a - e| <= atol + rtol * |e|`` with (atol, rtol) by the kernel's dtype, the NaN / inf pattern
exact. :func:`compare_fwd_bwd` runs the op in the test's dtype and the twin in higher precision
(fp64 for fp32 kernels, fp32 for bf16 / fp16) on the same inputs (rounded to the test's dtype
first, so input rounding is no part of the error) with the same upstream gradient, and asserts
that the op launched Triton kernels. (The reference used to be the fp32 twin: a MaskNet case
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

import contextlib  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from numerics import TOLERANCES, check_close, tolerance  # noqa: E402,F401
from numerics import assert_close  # noqa: E402,F401  (the tests import it from here)

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# interpreter tests: marked, and skipped when the interpreter is off (GPU runs) or Triton is missing
interpreter = pytest.mark.interpreter
needs_interpreter = pytest.mark.skipif(not INTERPRET or not HAS_TRITON,
                                       reason="needs TRITON_INTERPRET=1 and triton installed")
requires_cuda = pytest.mark.requires_cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRET or not HAS_TRITON,
                                reason="needs a CUDA device, triton and TRITON_INTERPRET=0")

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)  # the GPU tests' dtypes
# fp32 under a TF32 matmul policy ("high"): TF32 keeps 10 mantissa bits, as fp16 does
TF32_TOLERANCES = tolerance(torch.float16)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


@contextlib.contextmanager
def triton_launches():
    """Counts the Triton launches inside the block: every launcher of dtn_kernels.triton calls
    ``_launch.launch`` (imported by name into each kernel module, so each module's binding is
    wrapped). Yields a list that gets one kernel name per launch."""
    import importlib
    import pkgutil
    import sys

    import dtn_kernels.triton as package
    from dtn_kernels.triton import _launch

    for mod in pkgutil.iter_modules(package.__path__):  # the launchers are imported lazily by the ops
        importlib.import_module(f"{package.__name__}.{mod.name}")
    real = _launch.launch
    seen: list[str] = []

    def counting(kernel, grid, *args, **meta):
        seen.append(getattr(kernel, "__name__", str(kernel)))
        return real(kernel, grid, *args, **meta)

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("dtn_kernels.triton") and getattr(m, "launch", None) is real]
    for m in patched:
        m.launch = counting
    try:
        yield seen
    finally:
        for m in patched:
            m.launch = real


def _run(fn, args, diff_idx, dtype, n_outputs, n_grad, seed, compute_dtype=None, keep=()):
    """Outputs (first ``n_outputs``) and the gradients of ``diff_idx`` under one fixed random upstream
    gradient per differentiable output. Floating args are rounded to ``dtype`` and run in
    ``compute_dtype`` (default ``dtype``), so a higher-precision reference sees the very inputs the
    op saw; the upstream gradients are rounded the same way."""
    compute_dtype = compute_dtype or dtype
    def cast(i, a):
        if not a.is_floating_point():
            return a.detach()
        if i in keep and a.dtype.itemsize >= compute_dtype.itemsize:  # e.g. an fp32 codebook beside bf16 weights
            return a.detach()
        return a.detach().to(dtype).to(compute_dtype)

    xs = [cast(i, a).clone().requires_grad_(i in diff_idx) if torch.is_tensor(a) else a for i, a in enumerate(args)]
    outs = fn(*xs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    outs = outs[:n_outputs]
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float32).to(dtype).to(device=o.device, dtype=o.dtype)
           for o in outs[:n_grad]]
    grads = torch.autograd.grad(outs[:n_grad], [xs[i] for i in diff_idx], ups, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def compare_fwd_bwd(op, twin, args, diff_idx, n_outputs=1, seed=0, names=None, n_grad=None, dtype=None,
                    atol=None, rtol=None, tolerances=None, keep=()):
    """Run ``op`` in ``dtype`` (default: the args' floating dtype) and compare its outputs and the
    gradients of every arg in ``diff_idx`` with the ``twin`` run in higher precision on the same
    (rounded) inputs and upstream gradients, element-wise with :mod:`numerics`' tolerances of
    ``dtype`` (or ``atol`` / ``rtol``, or ``tolerances`` = (atol, rtol): a case that passes them says
    why). ``keep``: indices of args that stay in their own (higher) dtype in the op's run (e.g. an fp32
    codebook next to bf16 weights). Fails unless ``op`` launched at least one Triton kernel."""
    dtype = dtype or next(a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point())
    n_grad = n_outputs if n_grad is None else n_grad
    d_atol, d_rtol = tolerance(dtype) if tolerances is None else tolerances
    atol, rtol = d_atol if atol is None else atol, d_rtol if rtol is None else rtol
    with triton_launches() as launched:
        ko, kg = _run(op, args, diff_idx, dtype, n_outputs, n_grad, seed, keep=keep)
    assert launched, "the op launched no Triton kernel (it ran its PyTorch fallback): nothing was tested"
    eo, eg = _run(twin, args, diff_idx, dtype, n_outputs, n_grad, seed, compute_dtype=reference_dtype(dtype), keep=keep)
    for k, (a, e) in enumerate(zip(ko, eo)):
        check_close(a, e, atol, rtol, f"output {k} ({dtype})")
    for i, a, e in zip(diff_idx, kg, eg):
        label = names[i] if names else f"arg {i}"
        assert a is not None and e is not None, f"grad of {label} missing"
        want = args[i].dtype if i in keep and args[i].dtype.itemsize >= dtype.itemsize else dtype
        assert a.dtype == want, f"grad {label} is {a.dtype}, expected {want} (computed in the test's dtype)"
        check_close(a, e, atol, rtol, f"grad {label} ({dtype})")
