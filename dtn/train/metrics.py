"""AUC, LogLoss and RelaImp, per task."""
from __future__ import annotations

import numpy as np


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC with ties given half credit (Mann-Whitney U). NaN if only one class is present."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ends = np.r_[starts[1:], len(ps)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; NaN for no rows (an empty split)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(y) == 0:
        return float("nan")
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rela_imp(auc_model: float, auc_base: float) -> float:
    """RelaImp in percent: ((AUC_model - 0.5) / (AUC_base - 0.5) - 1) * 100."""
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


def task_metrics(labels: np.ndarray, probs: np.ndarray, tasks: list[str]) -> dict[str, dict[str, float]]:
    return {t: {"auc": auc(labels[:, i], probs[:, i]), "logloss": log_loss(labels[:, i], probs[:, i])}
            for i, t in enumerate(tasks)}


def mean_auc(metrics: dict[str, dict[str, float]]) -> float:
    return float(np.mean([m["auc"] for m in metrics.values()]))
