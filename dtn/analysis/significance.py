"""Is DTN's AUC difference to a baseline real? Two questions, two tests.

* Training randomness: the same model retrained with another seed scores differently. The paired
  t-test over seeds (:func:`paired_tests`; seed k of DTN paired with seed k of the baseline) asks
  whether the mean per-seed AUC difference is zero; the Wilcoxon signed-rank test asks the same
  without assuming normal differences. With 5 seeds the exact two-sided Wilcoxon p-value cannot
  go below 2/32 = 0.0625, so at the 5% level only the t-test can say "significant";
  :func:`min_detectable_difference` gives the difference the t-test finds with 80% power.
* Test-set sampling: another draw of test rows would give other AUCs. The paired bootstrap
  (:func:`bootstrap_auc_diff`) resamples test rows with replacement, the same resample for every
  model and seed, recomputes every AUC on it and takes the difference of the seed-averaged AUCs
  (the quantity the table reports); its 2.5 / 97.5 percentiles are the 95% confidence interval.

:func:`holm` adjusts a family of p-values (DTN against five baselines on two tasks is ten tests)
for multiple comparisons (Holm 1979).
"""
from __future__ import annotations

import math

import numpy as np


def paired_tests(a, b) -> dict:
    """Paired t-test and Wilcoxon signed-rank test of ``a - b`` (one value per seed, same seed order).
    Returns n, the mean and std (ddof 1) of the differences, t, p_t and p_wilcoxon (two-sided)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_tests: a and b must be 1-d of the same length, got {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()) if n else float("nan"),
           "std_diff": float(d.std(ddof=1)) if n > 1 else float("nan"),
           "t": float("nan"), "p_t": float("nan"), "p_wilcoxon": float("nan")}
    if n < 2:
        return out
    if np.all(d == d[0]):  # no spread: the t statistic is 0/0 or ±inf
        out["t"], out["p_t"] = (0.0, 1.0) if d[0] == 0 else (math.copysign(math.inf, d[0]), 0.0)
    else:
        res = stats.ttest_rel(a, b)
        out["t"], out["p_t"] = float(res.statistic), float(res.pvalue)
    if np.all(d == 0):
        out["p_wilcoxon"] = 1.0
    else:
        out["p_wilcoxon"] = float(stats.wilcoxon(d, alternative="two-sided", zero_method="wilcox").pvalue)
    return out


def min_detectable_difference(std_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The mean difference a two-sided paired t-test over ``n`` seeds detects with probability ``power`` at
    level ``alpha``, when the per-seed differences have standard deviation ``std_diff``."""
    from scipy import optimize, stats

    if n < 2 or not math.isfinite(std_diff):
        return float("nan")
    if std_diff == 0:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def gap(delta):
        nc = delta * math.sqrt(n) / std_diff
        lower = stats.nct.cdf(-crit, df, nc)  # the wrong-sign tail: negligible, and NaN in scipy for large nc
        return stats.nct.sf(crit, df, nc) + (0.0 if math.isnan(lower) else lower) - power

    # the power is below ``power`` at 0 and near 1 at a non-centrality of crit + 5
    return float(optimize.brentq(gap, 0.0, (crit + 5) * std_diff / math.sqrt(n)))


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="mergesort")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def weighted_auc(y, p, weights) -> np.ndarray:
    """ROC AUC of scores ``p`` for labels ``y`` under each row of ``weights`` [B, N] (row counts of a bootstrap
    resample): the Mann-Whitney statistic with ties given half credit, as :func:`dtn.train.metrics.auc` on the
    rows repeated by their weights. NaN where a resample holds one class only."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # tie groups of equal scores
    ws = w[:, order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * (1.0 - ys), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower than each group
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), num / (n_pos * n_neg), np.nan)


def resample_counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """[b, n] how often each of ``n`` rows is drawn in each of ``b`` bootstrap resamples of size ``n``."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def bootstrap_aucs(labels, preds: dict, resamples: int = 1000, seed: int = 0, chunk: int = 50) -> dict:
    """``{model: [S, B, T]}`` AUC of every model, seed and task on ``resamples`` paired bootstrap resamples of
    the test rows (``preds``: ``{model: [S, N, T]}`` probabilities; ``labels``: [N, T]). Every model and seed is
    scored on the same resamples."""
    labels = np.asarray(labels, dtype=np.float64)
    N, T = labels.shape
    for m, p in preds.items():
        if p.ndim != 3 or p.shape[1:] != (N, T):
            raise ValueError(f"bootstrap: predictions of {m} have shape {p.shape}; expected [seeds, {N}, {T}]")
    rng = np.random.default_rng(seed)
    out = {m: np.empty((p.shape[0], resamples, T)) for m, p in preds.items()}
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        w = resample_counts(rng, N, b)
        for m, p in preds.items():
            for s in range(p.shape[0]):
                for t in range(T):
                    out[m][s, start:start + b, t] = weighted_auc(labels[:, t], p[s, :, t], w)
    return out


def bootstrap_diff(aucs_a: np.ndarray, aucs_b: np.ndarray, level: float = 0.95) -> list[dict]:
    """Per task: the bootstrap distribution of (seed-mean AUC of a) - (seed-mean AUC of b) summarised as its
    ``level`` percentile interval, the fraction of resamples where a is not better, and a two-sided p-value."""
    diff = aucs_a.mean(axis=0) - aucs_b.mean(axis=0)  # [B, T]
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out = []
    for t in range(diff.shape[1]):
        d = diff[:, t][~np.isnan(diff[:, t])]
        if not len(d):
            out.append({"ci_low": float("nan"), "ci_high": float("nan"), "p_boot": float("nan"), "resamples": 0})
            continue
        p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
        out.append({"ci_low": float(np.quantile(d, lo)), "ci_high": float(np.quantile(d, hi)), "p_boot": float(p),
                    "resamples": int(len(d))})
    return out


def compare_to(target: str, aucs: dict[str, np.ndarray], boot: dict[str, np.ndarray], tasks: list[str],
               alpha: float = 0.05, level: float = 0.95) -> dict:
    """``target`` against every other model: per task the paired tests over seeds (``aucs``: ``{model: [S, T]}``
    test AUCs per seed, seeds in the same order), the bootstrap interval (``boot``: :func:`bootstrap_aucs`), the
    Holm-adjusted t-test p-value over the whole family, and a verdict: ``better`` / ``worse`` when the adjusted
    t-test p < alpha and the bootstrap interval excludes 0 on that side, else ``not significant``."""
    rows = []
    for other in [m for m in aucs if m != target]:
        ci = bootstrap_diff(boot[target], boot[other], level)
        for t, task in enumerate(tasks):
            tests = paired_tests(aucs[target][:, t], aucs[other][:, t])
            rows.append({"model": other, "task": task, **tests,
                         "mde80": min_detectable_difference(tests["std_diff"], tests["n"], alpha), **ci[t]})
    for r, adj in zip(rows, holm([r["p_t"] for r in rows])):
        r["p_t_holm"] = adj
        sig = not math.isnan(adj) and adj < alpha
        no_ci = math.isnan(r["ci_low"])  # no bootstrap (0 resamples): the t-test alone decides
        r["verdict"] = ("better" if sig and r["mean_diff"] > 0 and (no_ci or r["ci_low"] > 0) else
                        "worse" if sig and r["mean_diff"] < 0 and (no_ci or r["ci_high"] < 0) else "not significant")
    return {"target": target, "alpha": alpha, "level": level, "rows": rows}


def significance_markdown(sig: dict, display: dict) -> str:
    name = display.get(sig["target"], sig["target"])
    n = sig["rows"][0]["n"] if sig["rows"] else 0
    res = sig["rows"][0]["resamples"] if sig["rows"] else 0
    lines = [f"| {name} vs | task | ΔAUC (mean ± std over seeds) | paired t p | Holm p | Wilcoxon p | "
             f"bootstrap {sig['level']:.0%} CI of ΔAUC | 80%-power MDE | verdict |", "|---" * 9 + "|"]
    for r in sig["rows"]:
        lines.append(f"| {display.get(r['model'], r['model'])} | {r['task']} | {r['mean_diff']:+.4f} ± {r['std_diff']:.4f} | "
                     f"{_p(r['p_t'])} | {_p(r['p_t_holm'])} | {_p(r['p_wilcoxon'])} | "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['mde80']:.4f} | {r['verdict']} |")
    lines.append(f"\nΔAUC = {name} − the other model on the test split. Paired over {n} seeds (seed k with seed k); "
                 f"Holm-adjusted over the {len(sig['rows'])} comparisons; the bootstrap resamples the test rows "
                 f"({res} resamples, the same ones for every model and seed) and takes the difference of the "
                 f"seed-mean AUCs. Verdict: better / worse when the Holm-adjusted t-test p < {sig['alpha']} and the "
                 "bootstrap interval excludes 0. MDE: the mean difference the t-test would detect with 80% power "
                 "given the observed spread of the per-seed differences, at the unadjusted level α (a verdict, "
                 "judged on the Holm-adjusted p, needs more)."
                 + (f" With {n} seeds the two-sided exact Wilcoxon p is at least {2 / 2 ** n:.4f}." if n else ""))
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else "<0.001"
