"""How the tests judge a computed tensor against the expected one: per-dtype (atol, rtol) and an
element-wise bound, with the worst element named on failure.

An element passes when ``|a - e| <= atol + rtol * |e|`` (``e`` the expected value, computed in
higher precision from the same inputs); the NaN / +inf / -inf pattern must match exactly. There is
no scaling of ``atol`` by the tensor's largest value and no escape by comparison with another
implementation's error: a test that needs more room passes its own (atol, rtol) and says why, next
to the case.

Tolerances by the dtype the kernel computes in (:data:`TOLERANCES`). ``u`` is the unit roundoff
(2^-24 fp32, 2^-8 bf16, 2^-11 fp16); the kernels accumulate in fp32 and round each output once:

* fp32: atol 1e-5, rtol 1e-4 -- fp32 accumulation over the tests' reductions (K <= ~100 terms of
  magnitude <= ~10) stays well below 1e-5 absolute; rtol 1e-4 (about 1700 u) covers the
  reassociation of the tiled sums against the twin's order.
* bf16: atol 1e-2, rtol 2e-2 -- one rounding of the output is u = 3.9e-3 relative; intermediates
  that a fused kernel keeps in bf16 (the gated product, a stored activation) add a few u: 2e-2 is
  about 5 u.
* fp16: atol 2e-3, rtol 4e-3 -- the same rule with u = 4.9e-4 (about 8 u).
* fp64: atol 1e-12, rtol 1e-10 -- for references compared with each other.
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results computed in ``dtype`` (fp32's for any other dtype)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def _pattern(t: torch.Tensor):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def check_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """Raise AssertionError unless every element satisfies ``|a - e| <= atol + rtol * |e|`` and the
    non-finite patterns match; the message names the number of elements outside, the worst one (by
    how far it exceeds its bound), its index, both values, its error and its bound."""
    label = f"{name}: " if name else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for kind, pa, pe in zip(("NaN", "+inf", "-inf"), _pattern(a), _pattern(e)):
        if not torch.equal(pa, pe):
            where = tuple((pa != pe).nonzero()[0].tolist())
            raise AssertionError(f"{label}{kind} pattern differs (first at index {list(where)}: actual "
                                 f"{float(a[where]):.6g}, expected {float(e[where]):.6g})")
    fin = torch.isfinite(e)
    zero = torch.zeros_like(a)
    err = torch.where(fin, (a - e).abs(), zero)
    bound = atol + rtol * torch.where(fin, e.abs(), zero)
    bad = fin & (err > bound)
    if not bad.any():
        return
    excess = torch.where(bad, err / bound, zero)
    idx = tuple((excess == excess.max()).nonzero()[0].tolist())
    raise AssertionError(
        f"{label}{int(bad.sum())} of {a.numel()} elements outside |a - e| <= {atol:g} + {rtol:g}*|e|; worst at index "
        f"{list(idx)}: actual {float(a[idx]):.8g}, expected {float(e[idx]):.8g}, error {float(err[idx]):.3e} > bound "
        f"{float(bound[idx]):.3e} ({float(excess[idx]):.1f}x); largest error anywhere {float(err.max()):.3e}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float | None = None,
                 atol: float | None = None, dtype: torch.dtype | None = None) -> None:
    """:func:`check_close` with the tolerances of ``dtype`` (default ``actual``'s dtype) unless given."""
    d_atol, d_rtol = tolerance(dtype or actual.dtype)
    check_close(actual, expected, d_atol if atol is None else atol, d_rtol if rtol is None else rtol, name)
