"""The paper's analyses on trained checkpoints: permutation feature importance (Table 1, Fig. 2),
gate weights and DTN-trim (Fig. 4), t-SNE of FIM representations (Fig. 5) and Table 3.

Every analysis starts from a checkpoint written by ``dtn train`` / ``dtn compare``; the data are
rebuilt from the checkpoint's own config with its fitted encoder (``load_checkpoint_data``).
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch


def load_checkpoint_data(checkpoint: str, data_dir: str | None = None):
    """(model, config, data, checkpoint dict) for ``checkpoint``; the model is in eval mode.

    The data set is the one named by the checkpoint's config (``data_dir`` overrides its path),
    encoded with the checkpoint's encoder so ids mean what they meant in training."""
    from ..data import load_dataset
    from ..train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model, encoder, cfg = model_from_checkpoint(ckpt)
    data_cfg = cfg.data if not data_dir else dataclasses.replace(cfg.data, path=data_dir)
    if data_cfg.dataset == "table" and data_cfg.stream:  # the analyses permute and subsample in memory
        data_cfg = dataclasses.replace(data_cfg, stream=False)
    data = load_dataset(data_cfg, encoder=encoder)
    model.eval()
    return model, cfg, data, ckpt


def get_split(data, split: str):
    if split not in ("train", "valid", "test"):
        raise ValueError(f"unknown split {split!r}; use train, valid or test")
    from ..request_check import check_split

    part = getattr(data, split)
    check_split(None, split, f"--split {split}", rows=len(part))
    return part


def subsample(split, max_rows: int | None, seed: int = 0):
    """The first ``max_rows`` of a random permutation of the split's rows (all rows when None/0)."""
    if not max_rows or max_rows >= len(split):
        return split
    from ..data.encoders import EncodedData

    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    batch, labels = split.batch(idx)
    return EncodedData(batch.categorical, batch.numeric, list(batch.multi), labels)


@torch.no_grad()
def predict_probs(model, data, batch_size: int = 8192) -> np.ndarray:
    """Sigmoid outputs [N, T] of ``model`` on an EncodedData, in eval mode."""
    model.eval()
    out = [torch.sigmoid(model(b)).float() for b, _ in data.batches(batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_tasks), dtype=np.float32)


@torch.no_grad()
def inference_latency_ms(model, batch, repeats: int = 30, warmup: int = 5) -> dict:
    """Median (and min / max) wall milliseconds of one forward pass on ``batch`` (eval mode, no_grad),
    measured with time.perf_counter over ``repeats`` runs after ``warmup`` runs."""
    model.eval()
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(batch)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "max_ms": float(np.max(times)),
            "repeats": repeats, "batch_size": batch.batch_size, "threads": torch.get_num_threads()}


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def plt():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
