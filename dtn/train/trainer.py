"""Training and evaluation: Adam, weighted per-task BCE, early stopping on validation AUC,
atomic checkpoints with exact resume, metrics to JSON/CSV.

The data are in-memory :class:`dtn.data.EncodedData` or streamed
:class:`dtn.data.stream.StreamingSplit` (anything with ``len()``, ``batches()``,
``num_batches()`` and ``shard()``). In a torch.distributed job (``dtn train`` under torchrun)
the model is wrapped in DistributedDataParallel, each rank trains on its piece of every
global batch (gradients are averaged so that a step equals the single-process step on the
whole batch), evaluation gathers every rank's predictions so that metrics cover the whole
split, and only rank 0 writes files and logs.

Host syncs: a training step never makes the host wait for the GPU. The running loss, the
first non-finite step and the CUDA embedding bag's bad-id flag stay on the device and are read
every ``SYNC_EVERY`` steps and at the end of the epoch; batches are validated on the host
before they are copied (``InputLayer.check_batch``) and copied without blocking.

Files in ``out_dir``:
  last.pt       the resume point (model, optimizer, RNG, history), written after every epoch
  best.pt       the best model so far by the early-stopping metric (what ``dtn evaluate`` loads)
  history.csv   one row per epoch; metrics.json the final metrics
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

from dtn_kernels.ops.embedding_bag import raise_pending_errors

from .. import distributed as D
from ..config import Config, config_from_dict
from ..data.encoders import TabularEncoder
from ..features import FeatureBatch, JaggedField
from ..models import DTN, build_model
from .checkpoint import atomic_save, atomic_write_text, load_checkpoint
from .metrics import mean_auc, task_metrics

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# Steps between the trainer's host syncs (reading the running loss, a divergence, a bad id the
# GPU skipped). A divergence is still reported with its exact step; the steps queued after it
# run on (their weights are discarded with the error), at most SYNC_EVERY - 1 of them.
SYNC_EVERY = 50


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was (the weights in
    memory are not: the steps up to the next sync point ran on)."""


def batch_to_device(batch: FeatureBatch, device) -> FeatureBatch:
    """``batch.to(device)`` without blocking the host: from pageable memory a non-blocking copy is
    staged before it returns (the source may be reused at once) and does not wait for the GPU."""
    def move(t):
        return None if t is None else t.to(device, non_blocking=True)

    multi = tuple(JaggedField(move(m.values), move(m.offsets), move(m.weights)) for m in batch.multi)
    return FeatureBatch(move(batch.categorical), move(batch.numeric), multi)


class _EpochStats:
    """An epoch's running loss and its first non-finite step, kept on the device (no per-step sync)."""

    def __init__(self, device, num_tasks: int):
        f64 = dict(dtype=torch.float64, device=device)
        self.total = torch.zeros((), **f64)  # sum of loss * rows
        self.count = torch.zeros((), **f64)  # rows
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # 0-based step, -1: none
        self.bad_loss = torch.zeros((), **f64)
        self.bad_per_task = torch.zeros(num_tasks, **f64)

    def add(self, step: int, loss_sum, rows, finite, step_loss, per_task) -> None:
        newly = ~finite & (self.first_bad < 0)
        self.first_bad = torch.where(newly, step, self.first_bad)
        self.bad_loss = torch.where(newly, step_loss.double(), self.bad_loss)
        self.bad_per_task = torch.where(newly, per_task.detach().double(), self.bad_per_task)
        self.total += loss_sum
        self.count += rows

    def read(self) -> tuple[float, float, int, float, list[float]]:
        """(total, count, first bad step or -1, its loss, its per-task losses): one device-to-host copy."""
        v = torch.cat([torch.stack([self.total, self.count, self.first_bad.double(), self.bad_loss]),
                       self.bad_per_task]).tolist()
        return v[0], v[1], int(v[2]), v[3], v[4:]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle order of an epoch depends only on (seed, epoch): resuming reproduces it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def checkpoint_payload(model, encoder: TabularEncoder | None, config: Config) -> dict:
    payload = {"model_name": model.cfg.name, "config": config.to_dict(), "model_state": model.state_dict(),
               "encoder": encoder.state_dict() if encoder is not None else None,
               "schema": model.schema.to_dict()}
    if isinstance(model, DTN):
        payload["trim_active"] = model.active.clone()
    return payload


def model_from_checkpoint(ckpt: dict | str, device="cpu"):
    """(model, encoder, config) rebuilt from a checkpoint dict or path."""
    if isinstance(ckpt, str):
        ckpt = load_checkpoint(ckpt)
    from ..features import Schema

    config = config_from_dict(ckpt["config"])
    schema = Schema.from_dict(ckpt["schema"])
    model = build_model(ckpt["model_name"], schema, config.model, device=device)
    if isinstance(model, DTN) and ckpt.get("trim_active") is not None:
        model.apply_trim(ckpt["trim_active"])
    model.load_state_dict(ckpt["model_state"])
    encoder = TabularEncoder.from_state_dict(ckpt["encoder"]) if ckpt.get("encoder") else None
    return model, encoder, config


class Trainer:
    def __init__(self, model, config: Config, out_dir: str | None = None, encoder: TabularEncoder | None = None):
        self.model = model
        self.config = config
        self.cfg = config.train
        self.out_dir = out_dir
        self.encoder = encoder
        self.device = torch.device(self.cfg.device)
        self.model.to(self.device)
        self.rank, self.world_size = D.rank_and_world()
        self.is_main = self.rank == 0
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.train_module = self._data_parallel(model) if self.world_size > 1 else model
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.best_score = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self._best_state = None  # in-memory copy of the best weights when there is no out_dir
        if self.cfg.task_weights is not None and len(self.cfg.task_weights) != model.num_tasks:
            raise ValueError(f"train.task_weights has {len(self.cfg.task_weights)} entries for {model.num_tasks} tasks")
        # on the device once: a list would be copied host-to-device (a sync) in every step's loss
        self.task_weights = None if self.cfg.task_weights is None else \
            torch.tensor(self.cfg.task_weights, dtype=torch.float32, device=self.device)

    def _data_parallel(self, model):
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        empty = [n for n, p in model.named_parameters() if p.numel() == 0]  # e.g. no numeric features
        if empty:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, empty)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (hash seeds, trim masks) never change in training: no need to sync them every step
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, **sync)

    # ---- paths -------------------------------------------------------------------------
    def _path(self, name: str) -> str | None:
        return os.path.join(self.out_dir, name) if self.out_dir else None

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict:
        payload = checkpoint_payload(self.model, self.encoder, self.config)
        payload.update(optimizer_state=self.optimizer.state_dict(), epoch=self.epoch, history=self.history,
                       best_score=self.best_score, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs,
                       torch_rng=torch.get_rng_state(), numpy_rng=np.random.get_state(), python_rng=random.getstate())
        return payload

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.epoch = ckpt["epoch"]
        self.history = list(ckpt["history"])
        self.best_score, self.best_epoch, self.bad_epochs = ckpt["best_score"], ckpt["best_epoch"], ckpt["bad_epochs"]
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        random.setstate(ckpt["python_rng"])

    def resume(self, path: str | None = None) -> bool:
        """Load ``last.pt`` (or ``path``) if it exists; True when something was resumed."""
        path = path or self._path("last.pt")
        if not path or not os.path.exists(path):
            return False
        self.load_state(load_checkpoint(path, map_location=self.device))
        return True

    # ---- training ----------------------------------------------------------------------
    def _progress(self, total: int, desc: str):
        if not self.cfg.progress or tqdm is None or not self.is_main:
            return None
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                    disable=not sys.stderr.isatty() and not os.environ.get("DTN_FORCE_PROGRESS"))

    def check_host_batch(self, batch: FeatureBatch) -> None:
        """Validate a batch's ids on the host, before the copy to the device (where reading a check's
        result would be a sync): the same errors as the input layer's, naming feature, row and id."""
        layer = getattr(self.model, "input_layer", None)
        if layer is not None and getattr(layer, "validate", False) and hasattr(layer, "check_batch") \
                and batch.categorical.device.type == "cpu":
            layer.check_batch(batch)

    def train_step(self, batch: FeatureBatch, labels: torch.Tensor, step: int, stats: _EpochStats) -> None:
        """One optimiser step on a batch already on the device. No host sync: the loss and a
        divergence are accumulated in ``stats`` on the device and read at the next sync point."""
        logits = self.train_module(batch)
        loss, per_task = self.model.loss(logits, labels, self.task_weights)
        lossd = loss.detach()
        n = labels.shape[0]
        if self.world_size > 1:
            # one small all-reduce per step: the global loss, the global batch size, any rank's divergence
            stats_all = D.all_reduce_sum(torch.stack([lossd.double() * n, lossd.new_full((), n, dtype=torch.float64),
                                                      (~torch.isfinite(lossd)).double()]), self.device)
            loss_sum, rows, finite = stats_all[0], stats_all[1], stats_all[2] == 0
            # DDP averages gradients over ranks; weighting by this rank's share of the global batch makes the
            # step equal to the single-process step on the whole batch, whatever the piece sizes
            objective = loss * ((n * self.world_size) / rows).to(loss.dtype)
            step_loss = loss_sum / rows
        else:
            loss_sum, rows, finite, objective, step_loss = lossd.double() * n, n, torch.isfinite(lossd), loss, lossd
        stats.add(step, loss_sum, rows, finite, step_loss, per_task)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()

    def _sync_point(self, stats: _EpochStats, bar=None) -> float:
        """Raise what the device recorded since the last sync (a bad id the GPU skipped, a
        non-finite loss); returns the running mean loss."""
        raise_pending_errors(self.device)
        total, count, first_bad, bad_loss, bad_per_task = stats.read()
        if first_bad >= 0:
            if bar is not None:
                bar.close()
            last = self._path("last.pt")
            kept = f"; the last good checkpoint {last} is untouched" if last and os.path.exists(last) else ""
            per = dict(zip(self.model.tasks, bad_per_task))
            where = f" (on one of {self.world_size} ranks; this rank's per-task losses {per})" \
                if self.world_size > 1 else f" (per-task losses {per})"
            raise TrainingDivergedError(
                f"loss became {bad_loss} at epoch {self.epoch + 1}, step {first_bad + 1}"
                f"{where}; lower the learning rate or check the inputs for extreme values{kept}")
        mean = total / max(count, 1)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}")
        return mean

    def train_epoch(self, data) -> float:
        self.train_module.train()
        gen = epoch_generator(self.cfg.seed, self.epoch)
        bs, world = self.cfg.batch_size, self.world_size
        bar = self._progress(data.num_batches(bs, world), f"epoch {self.epoch + 1}")
        stats = _EpochStats(self.device, self.model.num_tasks)
        for step, (batch, labels) in enumerate(data.batches(bs, shuffle=self.cfg.shuffle, generator=gen,
                                                             rank=self.rank, world_size=world)):
            self.check_host_batch(batch)
            batch, labels = batch_to_device(batch, self.device), labels.to(self.device, non_blocking=True)
            self.train_step(batch, labels, step, stats)
            if bar is not None:
                bar.update(1)
            if (step + 1) % SYNC_EVERY == 0:
                self._sync_point(stats, bar)
        mean = self._sync_point(stats, bar)
        if bar is not None:
            bar.close()
        return mean

    @torch.no_grad()
    def predict_with_labels(self, data) -> tuple[np.ndarray, np.ndarray]:
        """(labels [N, T], probabilities [N, T]) over all of ``data``; in a distributed job every rank
        predicts its shard and the rows of all ranks are gathered (on every rank)."""
        self.model.eval()
        local = data.shard(self.rank, self.world_size) if self.world_size > 1 else data
        probs, labels = [], []
        for b, y in local.batches(self.cfg.eval_batch_size):
            self.check_host_batch(b)
            probs.append(torch.sigmoid(self.model(batch_to_device(b, self.device))).float())  # stays on the device
            labels.append(y.float().cpu())
        raise_pending_errors(self.device)
        T = self.model.num_tasks
        p = torch.cat(probs).cpu() if probs else torch.zeros(0, T)  # one copy (and sync) per evaluation
        y = torch.cat(labels) if labels else torch.zeros(0, T)
        if self.world_size > 1:
            p, y = D.gather_rows(p, self.device), D.gather_rows(y, self.device)
        return y.numpy(), p.numpy()

    def predict(self, data) -> np.ndarray:
        return self.predict_with_labels(data)[1]

    def evaluate(self, data) -> dict[str, dict[str, float]]:
        labels, probs = self.predict_with_labels(data)
        return task_metrics(labels, probs, self.model.tasks)

    def _score(self, metrics: dict) -> float:
        key = self.cfg.early_stop_metric
        if key == "mean_auc":
            return mean_auc(metrics)
        if key.startswith("auc/") and key[4:] in metrics:
            return metrics[key[4:]]["auc"]
        raise ValueError(f"train.early_stop_metric {key!r}: use 'mean_auc' or 'auc/<task>' with a task of {list(metrics)}")

    def fit(self, train, valid, resume: bool = False, log=print) -> list[dict]:
        if len(train) == 0:
            raise ValueError("the training set is empty")
        if not self.is_main:
            log = _quiet
        if resume and self.resume():
            log(f"resumed from {self._path('last.pt')} after epoch {self.epoch}")
        while self.epoch < self.cfg.epochs and self.bad_epochs < self.cfg.patience:
            t0 = time.perf_counter()
            train_loss = self.train_epoch(train)
            val = self.evaluate(valid)
            score = self._score(val)
            self.epoch += 1
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
            else:
                self.bad_epochs += 1
            row = {"epoch": self.epoch, "train_loss": train_loss, "seconds": time.perf_counter() - t0,
                   **{f"val_{m}/{t}": v for t, d in val.items() for m, v in d.items()}, "score": score}
            self.history.append(row)
            log(f"epoch {self.epoch}: loss {train_loss:.4f}  " +
                "  ".join(f"{t} auc {d['auc']:.4f}" for t, d in val.items()) +
                f"  ({row['seconds']:.1f}s){'  *' if improved else ''}")
            # without files (or on ranks other than 0, which write none) the best weights stay in memory
            if improved and (not self.out_dir or not self.is_main):
                self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.out_dir and self.is_main:
                if improved:
                    atomic_save(checkpoint_payload(self.model, self.encoder, self.config), self._path("best.pt"))
                atomic_save(self.state(), self._path("last.pt"))
                self._write_history()
        # end on the best weights, which is what evaluation and prediction should use
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        elif self.out_dir and os.path.exists(self._path("best.pt")):
            self.model.load_state_dict(load_checkpoint(self._path("best.pt"), self.device)["model_state"])
        return self.history

    def _write_history(self) -> None:
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        path = self._path("history.csv")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(buf.getvalue(), path)


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""


def write_metrics(metrics: dict, path: str) -> None:
    atomic_write_text(json.dumps(metrics, indent=2, default=float), path)


def train_model(name: str, data, config: Config, out_dir: str | None = None, resume: bool = False, log=print):
    """Build ``name`` for ``data`` (SplitData, or StreamingData for a streamed table), train, evaluate on test."""
    seed_everything(config.train.seed)
    model = build_model(name, data.schema, config.model, device=config.train.device)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=model.cfg.name))
    trainer = Trainer(model, config, out_dir, data.encoder)
    t0 = time.perf_counter()
    trainer.fit(data.train, data.valid, resume=resume, log=log)
    result = {"model": model.cfg.name, "params": model.num_parameters(), "best_epoch": trainer.best_epoch,
              "epochs_run": trainer.epoch, "train_seconds": time.perf_counter() - t0,
              "valid": trainer.evaluate(data.valid), "test": trainer.evaluate(data.test)}
    result["world_size"] = trainer.world_size  # processes that trained it (torchrun), 1 without
    if out_dir and trainer.is_main:
        write_metrics(result, os.path.join(out_dir, "metrics.json"))
    return trainer, result
