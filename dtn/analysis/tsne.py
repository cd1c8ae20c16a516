"""t-SNE of DTN's FIM representations (paper Fig. 5).

(a) ``--fim K``: the outputs of FIM kind K in every task's own MFI module, coloured by task — do
    the same kind of FIM learn different things for different tasks?
(b) ``--task t``: the outputs of every FIM kind in task t's MFI module, coloured by kind — do
    different kinds of FIM learn different things for one task?
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import ensure_dir, plt, subsample
from ..fileio import atomic_write_text
from .gates import require_dtn


@torch.no_grad()
def own_representations(model, data, batch_size: int = 4096) -> list[np.ndarray]:
    """Per task, the own-MFI outputs [N, K, h] on ``data``."""
    model.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in model.tasks]
    for b, _ in data.batches(batch_size):
        own = model.forward_details(b)["representations"]["own"]
        for t, r in enumerate(own):
            parts[t].append(r.float())
    return [torch.cat(p).numpy() for p in parts]


def removed(model, t: int, k: int) -> bool:
    from ..models.dtn import RemovedFIM

    return isinstance(model.task_mfi[t][k], RemovedFIM)


def embed_2d(X: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(perplexity, max(2.0, (len(X) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)


def _scatter(Y: np.ndarray, labels: list[str], groups: list[str], title: str, path: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 5.5))
    lab = np.array(labels)
    for i, g in enumerate(groups):
        m = lab == g
        ax.scatter(Y[m, 0], Y[m, 1], s=4, alpha=0.6, color=pyplot.cm.tab10(i % 10), label=g)
    ax.legend(markerscale=3, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    pyplot.close(fig)


def _save_points(Y, labels, path):
    lines = ["x,y,group"] + [f"{a:.5f},{b:.5f},{g}" for (a, b), g in zip(Y, labels)]
    atomic_write_text("\n".join(lines) + "\n", path)


def run_tsne(model, split, out_dir: str, fim: str | None = "masknet", task: str | None = None, n: int = 1000,
             seed: int = 0, perplexity: float = 30.0) -> dict:
    """Writes tsne_fim-<fim>.png (a) and tsne_task-<task>.png (b) plus each plot's points as CSV."""
    require_dtn(model, "dtn tsne")
    if fim is not None and fim not in model.kinds:
        raise ValueError(f"unknown --fim {fim!r}; this DTN's FIM kinds: {model.kinds}")
    task = task if task is not None else model.tasks[0]
    if task not in model.tasks:
        raise ValueError(f"unknown --task {task!r}; tasks: {model.tasks}")
    if n < 5:
        raise ValueError(f"--samples must be at least 5, got {n}")
    rows = subsample(split, n, seed)
    reps = own_representations(model, rows)
    ensure_dir(out_dir)
    paths = {}
    if fim is not None:
        k = model.kinds.index(fim)
        tasks = [t for i, t in enumerate(model.tasks) if not removed(model, i, k)]
        if len(tasks) < 1:
            raise ValueError(f"FIM kind {fim!r} was trimmed from every task's MFI module")
        X = np.concatenate([reps[model.tasks.index(t)][:, k] for t in tasks])
        labels = [t for t in tasks for _ in range(len(rows))]
        Y = embed_2d(X, seed, perplexity)
        paths["fim_png"] = os.path.join(out_dir, f"tsne_fim-{fim}.png")
        _scatter(Y, labels, tasks, f"t-SNE of {fim} outputs of each task's MFI ({len(rows)} samples)",
                 paths["fim_png"])
        paths["fim_csv"] = os.path.join(out_dir, f"tsne_fim-{fim}.csv")
        _save_points(Y, labels, paths["fim_csv"])
    t = model.tasks.index(task)
    kinds = [kind for k, kind in enumerate(model.kinds) if not removed(model, t, k)]
    X = np.concatenate([reps[t][:, model.kinds.index(kind)] for kind in kinds])
    labels = [kind for kind in kinds for _ in range(len(rows))]
    Y = embed_2d(X, seed, perplexity)
    paths["task_png"] = os.path.join(out_dir, f"tsne_task-{task}.png")
    _scatter(Y, labels, kinds, f"t-SNE of the FIM outputs of {task}'s MFI ({len(rows)} samples)", paths["task_png"])
    paths["task_csv"] = os.path.join(out_dir, f"tsne_task-{task}.csv")
    _save_points(Y, labels, paths["task_csv"])
    return paths
