"""What a :class:`dtn.train.trainer.Trainer` writes to its output folder after every epoch and reads
back on resume:

  best.pt       the model file (:func:`dtn.train.model_file.checkpoint_payload`), when the epoch improved
  last.pt       the model file with the training state (:func:`training_state`, :func:`load_training_state`):
                optimizer, lr schedule, GradScaler, learned task weights, model selection, history, RNGs
  history.csv   one row per epoch (:func:`write_history`)

Sharded TorchRec tables are written by every rank through :mod:`dtn.train.sharded` (:func:`save_sharded`).
"""
from __future__ import annotations

import csv
import io
import os
import random

import numpy as np
import torch

from ..features.fused_embedding import is_optimizer_state_key
from .checkpoint import CheckpointError, FileWriteError, atomic_save, atomic_write_text, checkpoint_origin
from .model_file import state_mismatch


def training_state(trainer) -> dict:
    """The last.pt payload: the model file (``trainer.payload()``) with the optimizers' state in the weights,
    and the training state."""
    payload = trainer.payload()
    payload["model_state"] = trainer.model.state_dict()  # with the fused embedding optimizer's state
    payload.update(optimizer_state=trainer.optimizer.state_dict(), epoch=trainer.epoch, history=trainer.history,
                   best_score=trainer.best_score, best_epoch=trainer.best_epoch, bad_epochs=trainer.bad_epochs,
                   selection=trainer.selection, resumed=trainer.resumed, schedule=trainer.schedule.state_dict(),
                   scaler=None if trainer.scaler is None else trainer.scaler.state_dict(),
                   task_weighting=None if trainer.task_weighting is None else trainer.task_weighting.state_dict(),
                   torch_rng=torch.get_rng_state(), numpy_rng=np.random.get_state(), python_rng=random.getstate())
    return payload


def load_training_state(trainer, ckpt: dict) -> None:
    """Put a last.pt's weights and training state into ``trainer``; a state that does not fit its model,
    optimizers or sharding is a CheckpointError naming the file."""
    if trainer.embedding.fused and not any(is_optimizer_state_key(k) for k in ckpt["model_state"]):
        raise CheckpointError(f"{ckpt.get('_path', 'last.pt')}: holds no state of the embedding optimizer "
                              f"{trainer.cfg.embedding_optimizer!r}; written by {checkpoint_origin(ckpt)}")
    if bool(ckpt.get("sharded")) != bool(trainer.sharded):
        raise CheckpointError(f"{ckpt.get('_path', 'last.pt')}: a {'sharded' if ckpt.get('sharded') else 'unsharded'} "
                              "run; it resumes only as one (model.torchrec.shard)")
    try:
        if trainer.sharded:
            trainer.sharded.load(ckpt, optimizer=True)
        else:
            trainer.model.load_state_dict(ckpt["model_state"])
        if trainer.task_weighting is not None:
            trainer.task_weighting.load_state_dict(ckpt["task_weighting"])
        trainer.optimizer.load_state_dict(ckpt["optimizer_state"])
        if trainer.scaler is not None:
            trainer.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("schedule") is not None:  # absent from checkpoints written before lr schedules
            trainer.schedule.load_state_dict(ckpt["schedule"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{ckpt.get('_path', 'last.pt')}: its training state does not fit this model "
                              f"({state_mismatch(exc) or exc}); written by {checkpoint_origin(ckpt)}") from None
    # the optimizer state carries the old run's lr and weight decay: this run's config decides them
    # (the learned task weights' group has no weight decay; the embedding's, if any, has this run's)
    trainer.embedding.reset_group_lrs(trainer.optimizer)
    for i, group in enumerate(trainer.optimizer.param_groups):
        if i == 0 or "lr_scale" in group:
            group["weight_decay"] = trainer.cfg.weight_decay
    if trainer.embedding.fused:
        trainer.embedding.opt.weight_decay = trainer.cfg.weight_decay
    trainer.epoch = ckpt["epoch"]
    trainer.history = list(ckpt["history"])
    trainer.best_score, trainer.best_epoch, trainer.bad_epochs = ckpt["best_score"], ckpt["best_epoch"], ckpt["bad_epochs"]
    trainer.selection = ckpt.get("selection")
    trainer.resumed = list(ckpt.get("resumed", []))
    torch.set_rng_state(ckpt["torch_rng"])
    np.random.set_state(ckpt["numpy_rng"])
    random.setstate(ckpt["python_rng"])


def save_epoch(trainer, improved: bool) -> None:
    """best.pt (when improved), then last.pt, then history.csv. best.pt goes first: a last.pt that names
    this epoch as the best must never sit beside an older best.pt."""
    try:
        if improved:
            atomic_save(trainer.payload(), os.path.join(trainer.out_dir, "best.pt"))
        atomic_save(trainer.state(), os.path.join(trainer.out_dir, "last.pt"))
        write_history(trainer.history, os.path.join(trainer.out_dir, "history.csv"))
    except OSError as exc:
        done = trainer.epoch - 1
        kept = (f"the files of epoch {done} in {trainer.out_dir} are intact; fix it and rerun with --resume" if done
                else f"nothing of this run was written to {trainer.out_dir}")
        raise FileWriteError(f"{exc} after epoch {trainer.epoch}; {kept}", getattr(exc, "errno", None)) from None


def save_sharded(trainer, improved: bool) -> None:
    """save_epoch for sharded tables: best and last through torch.distributed.checkpoint (every rank
    writes its shards), then rank 0 writes best.pt / last.pt naming them, and history.csv."""
    try:
        if improved:
            trainer.sharded.save(trainer.out_dir, "best", trainer.epoch, trainer.payload, optimizer=False)
        trainer.sharded.save(trainer.out_dir, "last", trainer.epoch, trainer.state, optimizer=True)
        if trainer.is_main:
            write_history(trainer.history, os.path.join(trainer.out_dir, "history.csv"))
    except OSError as exc:
        raise FileWriteError(f"{exc} after epoch {trainer.epoch}; rerun with --resume", getattr(exc, "errno", None)) \
            from None


def write_history(history: list[dict], path: str) -> None:
    """history.csv: one row per epoch, the columns of every row (an option's column starts where it does)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(buf.getvalue(), path)
