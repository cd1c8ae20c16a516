"""A training run end to end: :func:`train_model` builds the model for the data, trains it with
:class:`dtn.train.trainer.Trainer`, evaluates the best weights on validation and test and writes
``metrics.json`` (:func:`write_metrics`) with the run's fingerprint (:func:`run_fingerprint`, what
``dtn compare`` keys the reuse of a finished run on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import numpy as np

from .. import distributed as D
from ..config import Config
from ..models import build_model
from . import sharded as S
from .checkpoint import FileWriteError, atomic_write_text, code_version, run_key
from .trainer import Trainer, seed_everything


def _json_safe(obj):
    """``obj`` with NaN / infinite floats as None (JSON has no NaN: an undefined AUC is written as null)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def write_metrics(metrics: dict, path: str) -> None:
    """Metrics as strict JSON (undefined values as null), written atomically."""
    atomic_write_text(json.dumps(_json_safe(metrics), indent=2, default=float, allow_nan=False), path)


def run_fingerprint(trainer) -> dict:
    """What ``dtn compare`` keys the reuse of a finished run on: its config, data, encoders and code."""
    return run_key(trainer.config.to_dict(), trainer.data_fingerprint, trainer._encoder_fp, code_version())


def train_model(name: str, data, config: Config, out_dir: str | None = None, resume: bool | dict = False, log=print,
                warn=None):
    """Build ``name`` for ``data`` (SplitData, or StreamingData for a streamed table), train, evaluate on test.
    ``resume``: continue from ``out_dir/last.pt`` when it exists (True), or from a loaded last.pt (dict);
    either is checked to be a run of this model, config and data first."""
    seed_everything(config.train.seed)
    sharded = S.wanted(config, D.rank_and_world()[1], resume)
    S.check_embedding_optimizer(config, sharded)
    from ..features.torchrec_input import deferred_tables

    with deferred_tables() if sharded else contextlib.nullcontext():  # sharded: no process allocates whole tables
        model = build_model(name, data.schema, config.model, device=config.train.device)
    n_params = model.num_parameters()  # before any sharding (a rank then holds a part of the tables)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=model.cfg.name))
    trainer = Trainer(model, config, out_dir, data.encoder, getattr(data, "fingerprint", None), warn=warn,
                      sharded=sharded, log=log)
    t0 = time.perf_counter()
    trainer.fit(data.train, data.valid, resume=resume, log=log)
    result = {"model": model.cfg.name, "params": n_params, "best_epoch": trainer.best_epoch,
              "epochs_run": trainer.epoch, "train_seconds": time.perf_counter() - t0,
              "selection": trainer.selection, "valid": trainer.evaluate(data.valid), "test": trainer.evaluate(data.test)}
    result["world_size"] = trainer.world_size  # processes that trained it (torchrun), 1 without
    if trainer.sharded:
        result["sharding_plan"] = trainer.sharded.plan
    if trainer.task_weighting is not None:  # the learned weights at the end of the last epoch
        result["task_weights"] = dict(zip(model.tasks, trainer.task_weighting.weights()))
    result["fingerprint"] = run_fingerprint(trainer)
    if trainer.resumed:
        result["resumed"] = trainer.resumed
    if out_dir and trainer.is_main:
        try:
            write_metrics(result, os.path.join(out_dir, "metrics.json"))
        except OSError as exc:
            raise FileWriteError(f"{exc}; training finished and best.pt / last.pt in {out_dir} are complete: rerun with "
                                 "--resume to write the metrics", getattr(exc, "errno", None)) from None
    return trainer, result
