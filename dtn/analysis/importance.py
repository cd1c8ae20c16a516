"""Permutation feature importance per task (paper Table 1 and Fig. 2).

FI^k(X_i) = AUC^k(base) - AUC^k(X_i permuted across the rows of the evaluation data), one input
field at a time: a categorical field's column of ids, a numeric field's column of values, or a
multi-valued field's whole bags. Each field is permuted ``repeats`` times (mean ± std reported).
Ranks are per task, 1 = the most important field.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import torch

from . import ensure_dir, get_split, markdown_table, plt, predict_probs, subsample
from ..data.encoders import EncodedData, _take_jagged
from ..fileio import atomic_write_text
from ..train.metrics import auc

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def field_kinds(schema) -> dict[str, tuple[str, int]]:
    """field name -> (kind, position among the fields of that kind in EncodedData)."""
    out = {}
    for kind in ("categorical", "multi", "numeric"):
        for j, f in enumerate(schema.of_kind(kind)):
            out[f.name] = (kind, j)
    return out


def permute_field(data: EncodedData, schema, name: str, perm: torch.Tensor) -> EncodedData:
    """A copy of ``data`` whose field ``name`` is reordered across rows by ``perm`` (other fields untouched)."""
    kinds = field_kinds(schema)
    if name not in kinds:
        raise KeyError(f"unknown field {name!r}; fields: {list(kinds)}")
    kind, j = kinds[name]
    cat, num, multi = data.categorical, data.numeric, list(data.multi)
    if kind == "categorical":
        cat = cat.clone()
        cat[:, j] = data.categorical[perm, j]
    elif kind == "numeric":
        num = num.clone()
        num[:, j] = data.numeric[perm, j]
    else:
        multi[j] = _take_jagged(data.multi[j], perm)
    return EncodedData(cat, num, multi, data.labels)


def _aucs(model, data, batch_size) -> np.ndarray:
    p = predict_probs(model, data, batch_size)
    y = data.labels.numpy()
    return np.array([auc(y[:, t], p[:, t]) for t in range(y.shape[1])])


def permutation_importance(model, data: EncodedData, schema, repeats: int = 3, seed: int = 0, fields=None,
                           batch_size: int = 8192, progress: bool = True) -> dict:
    """{"tasks", "base_auc" {task: auc}, "fields": [{"feature", "kind", "fi": {task: [R drops]}}]}."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if len(data) < 2:
        raise ValueError("permutation importance needs at least 2 rows")
    tasks = list(model.tasks)
    base = _aucs(model, data, batch_size)
    kinds = field_kinds(schema)
    names = list(fields) if fields else schema.field_order()
    gen = torch.Generator().manual_seed(seed)
    it = names
    if progress and tqdm is not None:
        it = tqdm(names, desc="permutation importance", leave=False)
    out = []
    for name in it:
        drops = []
        for _ in range(repeats):
            perm = torch.randperm(len(data), generator=gen)
            drops.append(base - _aucs(model, permute_field(data, schema, name, perm), batch_size))
        drops = np.stack(drops)  # [R, T]
        out.append({"feature": name, "kind": kinds[name][0],
                    "fi": {t: [float(x) for x in drops[:, i]] for i, t in enumerate(tasks)}})
    result = {"tasks": tasks, "base_auc": {t: float(b) for t, b in zip(tasks, base)}, "rows": len(data),
              "repeats": repeats, "seed": seed, "fields": out}
    add_ranks(result)
    return result


def add_ranks(result: dict) -> None:
    """Per task: mean and std of FI, and rank (1 = largest mean drop; ties broken by field order)."""
    for f in result["fields"]:
        f["mean"] = {t: float(np.mean(v)) for t, v in f["fi"].items()}
        f["std"] = {t: float(np.std(v)) for t, v in f["fi"].items()}
    for t in result["tasks"]:
        order = sorted(range(len(result["fields"])), key=lambda i: -result["fields"][i]["mean"][t])
        for r, i in enumerate(order, 1):
            result["fields"][i].setdefault("rank", {})[t] = r


def ranks(result: dict, task: str) -> dict[str, int]:
    return {f["feature"]: f["rank"][task] for f in result["fields"]}


def importance_markdown(result: dict) -> str:
    tasks = result["tasks"]
    header = ["feature", "kind"] + [f"FI {t}" for t in tasks] + [f"rank {t}" for t in tasks]
    multi = result["repeats"] > 1
    rows = []
    first = tasks[0]
    for f in sorted(result["fields"], key=lambda f: f["rank"][first]):
        fi = [f"{f['mean'][t]:.4f}" + (f" ± {f['std'][t]:.4f}" if multi else "") for t in tasks]
        rows.append([f["feature"], f["kind"], *fi, *[f["rank"][t] for t in tasks]])
    base = ", ".join(f"{t} {a:.4f}" for t, a in result["base_auc"].items())
    note = (f"\nFI = base AUC - AUC with the field permuted across rows; {result['rows']} rows of the "
            f"{result.get('split', 'evaluation')} split, {result['repeats']} permutation(s) per field"
            f"{' (mean ± std)' if multi else ''}. Base AUC: {base}. Rank 1 = most important.\n")
    return markdown_table(header, rows) + note


def importance_csv(result: dict) -> str:
    tasks = result["tasks"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["feature", "kind"] + [f"fi_{t}" for t in tasks] + [f"fi_std_{t}" for t in tasks] +
               [f"rank_{t}" for t in tasks])
    for f in sorted(result["fields"], key=lambda f: f["rank"][tasks[0]]):
        w.writerow([f["feature"], f["kind"]] + [f"{f['mean'][t]:.6f}" for t in tasks] +
                   [f"{f['std'][t]:.6f}" for t in tasks] + [f["rank"][t] for t in tasks])
    return buf.getvalue()


def divergence_scatter(result: dict, path: str, task_a: str, task_b: str, label_top: int = 10) -> None:
    """FI on ``task_a`` (x) against FI on ``task_b`` (y), one point per field (the most important labelled),
    with the diagonal: fields far from it matter to one task and not the other."""
    pyplot = plt()
    x = np.array([f["mean"][task_a] for f in result["fields"]])
    y = np.array([f["mean"][task_b] for f in result["fields"]])
    # with many fields, label the union of each task's top ``label_top`` (the rest crowd around 0)
    n = len(x)
    top = set(range(n)) if n <= 2 * label_top else \
        set(np.argsort(-x)[:label_top].tolist()) | set(np.argsort(-y)[:label_top].tolist())
    fig, ax = pyplot.subplots(figsize=(7, 6))
    colors = ["tab:blue" if i in top else "tab:gray" for i in range(n)]
    ax.scatter(x, y, s=18, c=colors)
    # stagger the labels of points that sit close together (e.g. many fields near FI 0 on one task)
    span = max(float(np.ptp(x)), float(np.ptp(y)), 1e-9)
    placed: list[tuple[float, float]] = []
    for i in sorted(top, key=lambda i: (x[i], y[i])):
        near = sum(1 for (px, py) in placed if abs(px - x[i]) < 0.06 * span and abs(py - y[i]) < 0.03 * span)
        placed.append((x[i], y[i]))
        dy = (2, 11, -10, 20, -19, 29, -28)[near % 7]
        ax.annotate(result["fields"][i]["feature"], (x[i], y[i]), fontsize=7, xytext=(3, dy), textcoords="offset points",
                    arrowprops=dict(arrowstyle="-", lw=0.3, color="gray") if near else None)
    lo, hi = float(min(x.min(), y.min(), 0.0)), float(max(x.max(), y.max(), 1e-6))
    pad = 0.05 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", lw=0.8, color="gray")
    ax.axhline(0, lw=0.5, color="gray")
    ax.axvline(0, lw=0.5, color="gray")
    ax.set_xlabel(f"feature importance on {task_a} (AUC drop)")
    ax.set_ylabel(f"feature importance on {task_b} (AUC drop)")
    ax.set_title(f"Permutation importance: {task_a} vs {task_b}")
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    pyplot.close(fig)


def run_importance(model, data, out_dir: str, split: str = "test", repeats: int = 3, max_rows: int | None = 20000,
                   seed: int = 0, tasks=None, batch_size: int = 8192, progress: bool = True):
    """Permutation importance of every field on a split of ``data``; writes importance.{md,csv,json} and
    importance_<a>_vs_<b>.png. Returns (result, paths)."""
    if tasks:
        unknown = [t for t in tasks if t not in model.tasks]
        if unknown or len(tasks) != 2:
            raise ValueError(f"--tasks needs two of the model's tasks {model.tasks}, got {tasks}")
    elif len(model.tasks) >= 2:
        tasks = model.tasks[:2]
    rows = subsample(get_split(data, split), max_rows, seed)
    result = permutation_importance(model, rows, data.schema, repeats=repeats, seed=seed, batch_size=batch_size,
                                    progress=progress)
    result["split"] = split
    ensure_dir(out_dir)
    paths = {"md": os.path.join(out_dir, "importance.md"), "csv": os.path.join(out_dir, "importance.csv"),
             "json": os.path.join(out_dir, "importance.json")}
    atomic_write_text(importance_markdown(result), paths["md"])
    atomic_write_text(importance_csv(result), paths["csv"])
    atomic_write_text(json.dumps(result, indent=2), paths["json"])
    if tasks:
        paths["png"] = os.path.join(out_dir, f"importance_{tasks[0]}_vs_{tasks[1]}.png")
        divergence_scatter(result, paths["png"], tasks[0], tasks[1])
    return result, paths
