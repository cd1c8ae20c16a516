"""The benchmark suite's numerics gate: every provider's forward output and gradients against the
eager reference's, once per group, after the warm-up, at the benchmarked shape and precision
(``benchmarks/harness.py`` runs it in ``run_group``; docs/benchmarks.md describes the tolerances).
"""
from __future__ import annotations

from typing import Optional

import torch


# Element-wise tolerances per precision policy (``precision_record``'s roofline_precision): a value
# a passes against the eager reference e when |a - e| <= atol * max|e| + rtol * |e|, max over the
# tensor (so a gradient's tolerance does not depend on its scale). fp32-ieee: summation order only;
# fp32-tf32: 10-bit mantissa inputs; bf16: 8-bit mantissa activations under autocast, on both sides.
TOLERANCES = {
    "fp32-ieee": {"rtol": 1e-4, "atol": 1e-4},
    "fp32-tf32": {"rtol": 1e-2, "atol": 1e-2},
    "fp32-medium": {"rtol": 5e-2, "atol": 3e-2},
    "bf16": {"rtol": 5e-2, "atol": 3e-2},
}
REFERENCE_PROVIDER = "eager"


def tolerance(roofline_precision: str) -> dict:
    return dict(TOLERANCES.get(roofline_precision, TOLERANCES["bf16"]))


def _dense(t):
    if not isinstance(t, torch.Tensor):
        return torch.as_tensor(t)
    return (t.to_dense() if t.layout != torch.strided else t).detach().to(torch.float64)


def compare_outputs(ref: dict, got: dict, tol: dict, compare_grads: bool = True) -> dict:
    """The gate's verdict on one provider: ``status`` ok / FAILED, the worst tensor (largest error
    over its bound), its max |a - e| and the number of elements over the bound."""
    problems, worst = [], None
    for name, e in ref.items():
        if name.startswith("grad") and not compare_grads:
            continue
        if name not in got or got[name] is None:
            problems.append(f"{name}: missing")
            continue
        e, a = _dense(e), _dense(got[name])
        if a.shape != e.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
            continue
        if not e.numel():
            continue
        scale = float(e.abs().max()) if bool(torch.isfinite(e).all()) else float("inf")
        bound = tol["atol"] * scale + tol["rtol"] * e.abs()
        err = (a - e).abs()
        bad = ~(err <= bound) & ~(a == e)  # NaN or inf where the reference is not: bad
        ratio = float((err / bound.clamp_min(1e-30)).nan_to_num(float("inf")).max())
        entry = {"tensor": name, "max_abs_err": float(err.nan_to_num(float("inf")).max()), "scale": scale,
                 "over_bound": int(bad.sum()), "numel": e.numel(), "err_over_bound": ratio}
        if worst is None or ratio > worst["err_over_bound"]:
            worst = entry
        if bad.any():
            problems.append(f"{name}: {entry['over_bound']} of {e.numel()} elements over the bound "
                            f"(max |a - e| {entry['max_abs_err']:.3g}, max |e| {scale:.3g})")
    extra = sorted(k for k in got if k not in ref and (compare_grads or not k.startswith("grad")))
    problems += [f"{k}: not in the reference" for k in extra]
    return {"status": "FAILED" if problems else "ok", **tol, "worst": worst, "problems": problems[:5],
            "compared": len(ref) if compare_grads else sum(1 for k in ref if not k.startswith("grad"))}


class NumericsGate:
    """Compares providers with the eager reference, once each, after their warm-up, at the
    benchmarked shape and precision. The reference runs again for every provider: a whole model's
    warm-up steps move its weights (the providers' checks start from the reference's weights)."""

    def __init__(self, reference: Optional["Case"], roofline_precision: str):
        self.reference, self.tol = reference, tolerance(roofline_precision)
        self._why: Optional[str] = None if reference is not None else "no eager reference for this case"

    def expected(self) -> Optional[dict]:
        if self._why is not None:
            return None
        try:
            out = self.reference.outputs()
        except Exception as exc:  # noqa: BLE001 -- the reference failing leaves nothing to compare with
            self._why = f"the eager reference failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
            return None
        if out is None:
            self._why = "the case has no numerics check"
        return out

    def verdict(self, case: "Case") -> dict:
        """``status``: ``reference`` (the eager case itself), ``ok``, ``FAILED`` (a mismatch, or the
        check raised) or ``unchecked`` (with the reason)."""
        if case is self.reference:
            return {"status": "reference", **self.tol}
        expected = self.expected()
        if expected is None:
            return {"status": "unchecked", "reason": self._why}
        try:
            got = case.outputs()
        except Exception as exc:  # noqa: BLE001
            return {"status": "FAILED", **self.tol, "problems": [f"{type(exc).__name__}: {str(exc).strip()[:300]}"]}
        if got is None:
            return {"status": "unchecked", "reason": "the case has no numerics check"}
        return compare_outputs(expected, got, self.tol, case.compare_grads and self.reference.compare_grads)


def numerics_reason(verdict: dict) -> str:
    return ("numerics FAILED against eager (|a - e| <= {atol} * max|e| + {rtol} * |e|): ".format(**verdict)
            if "atol" in verdict else "numerics FAILED against eager: ") + "; ".join(verdict.get("problems", []))
