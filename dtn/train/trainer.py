"""The trainer: Adam, weighted per-task BCE, early stopping on validation AUC, atomic checkpoints
with exact resume. A whole run (build, train, evaluate, ``metrics.json``) is :func:`dtn.train.run.train_model`.

Model selection: the best epoch is the one with the highest validation AUC (``train.early_stop_metric``:
the mean over tasks, or one task's). When a task's validation AUC is undefined (its validation rows
hold one class only) the trainer warns once, naming the task, and selects on the validation LogLoss
instead (the mean over tasks, or that task's), so every run writes ``best.pt`` after its first epoch.

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
before they are copied (``InputLayer.check_batch``) and copied without blocking (:mod:`dtn.train.host_sync`).

Options (``train.*``, all off by default): mixed precision ``amp`` (:mod:`dtn.train.precision`), the lr
``lr_schedule`` and ``warmup_steps`` (:mod:`dtn.train.schedule`), learned ``task_weighting``
(:mod:`dtn.train.task_weighting`), TensorBoard event files ``log`` (:mod:`dtn.train.tblog`) and a fused
sparse ``embedding_optimizer`` (:mod:`dtn.train.embedding_optim`); their state (scheduler step, GradScaler
scale, task log-variances, the embedding optimizer's state) is part of ``last.pt``.

Files in ``out_dir`` (written by :mod:`dtn.train.run_files`; a model is rebuilt from one by
:func:`dtn.train.model_file.model_from_checkpoint`):
  last.pt       the resume point (model, optimizer, RNG, history), written after every epoch
  best.pt       the best model so far by the early-stopping metric (what ``dtn evaluate`` loads)
  history.csv   one row per epoch; metrics.json the final metrics (:func:`dtn.train.run.train_model`)
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch

from dtn_kernels.ops.embedding_bag import raise_pending_errors

from .. import distributed as D
from ..config import Config, ConfigError
from ..data.encoders import DataError, TabularEncoder
from ..features import FeatureBatch
from ..features.fused_embedding import without_optimizer_state
from .embedding_optim import EmbeddingOptim
from .checkpoint import check_resume, clean_stale_temps, encoder_fingerprint, ensure_writable, load_checkpoint
from .host_sync import EpochStats, batch_to_device
from .model_file import checkpoint_payload
from .run_files import load_training_state, save_epoch, save_sharded, training_state
from .host_sync import EpochStats as _EpochStats  # noqa: F401  (its old name, imported by scripts and tests)
from . import precision
from . import sharded as S
from .metrics import task_metrics
from .schedule import LRSchedule
from .task_weighting import UncertaintyWeighting

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# Steps between the trainer's host syncs (reading the running loss, a divergence, a bad id the
# GPU skipped). A divergence is still reported with its exact step; the steps queued after it
# run on (their weights are discarded with the error), at most SYNC_EVERY - 1 of them.
SYNC_EVERY = 50


def _use_caching_cpu_allocator() -> None:
    """train.cpu_allocator = caching: dtn_kernels.cpu_allocator serves torch's CPU tensors (process-wide)."""
    from dtn_kernels import cpu_allocator

    if cpu_allocator.available():
        cpu_allocator.enable()
    else:  # (the default warning filter shows it once)
        warnings.warn("train.cpu_allocator = 'caching' needs dtn_kernels' compiled extension, which is not loaded: "
                      "training with torch's CPU allocator (set train.cpu_allocator=system to silence this)",
                      RuntimeWarning, stacklevel=3)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was (the weights in
    memory are not: the steps up to the next sync point ran on)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle order of an epoch depends only on (seed, epoch): resuming reproduces it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Trainer:
    def __init__(self, model, config: Config, out_dir: str | None = None, encoder: TabularEncoder | None = None,
                 data_fingerprint: dict | None = None, warn=None, sharded: bool = False, log=print):
        self.model = model
        self.config = config
        self.cfg = config.train
        self.out_dir = out_dir
        self.encoder = encoder
        self.data_fingerprint = data_fingerprint  # where the training data came from, recorded in checkpoints
        self._encoder_fp = encoder_fingerprint(encoder)
        self.device = torch.device(self.cfg.device)
        if not sharded:  # (sharded: DMP places the model; its deferred tables are on the meta device)
            self.model.to(self.device)
        self.rank, self.world_size = D.rank_and_world()
        self.is_main = self.rank == 0
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        if self.device.type == "cpu" and self.cfg.cpu_allocator == "caching":
            _use_caching_cpu_allocator()
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # sharded TorchRec tables (dtn.train.sharded; train_model decides): DMP wraps the model, the tables'
        # optimizer is fused into FBGEMM's backward
        self.sharded = S.ShardedEmbeddings(model, config, self.device, log if self.is_main else _quiet) \
            if sharded else None
        # unsharded tables: in the dense Adam, or a fused sparse optimizer of the input layer
        self.embedding = EmbeddingOptim(model, self.cfg, self.world_size, self.device, fp16=self.cfg.amp == "fp16",
                                        sharded=bool(sharded))
        groups = [{"params": list(self.sharded.dense_parameters())}] if self.sharded else \
            self.embedding.param_groups(model)
        self.optimizer = torch.optim.Adam(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                          **precision.optimizer_options(self.cfg.amp))
        self.scaler = precision.grad_scaler(self.cfg.amp, self.device)  # fp16 only
        self.schedule = LRSchedule(self.cfg)
        self.task_weighting = None
        if self.cfg.task_weighting == "uncertainty":  # its log-variances: a parameter group of their own, no decay
            self.task_weighting = UncertaintyWeighting(model.num_tasks, device=self.device)
            self.optimizer.add_param_group({"params": list(self.task_weighting.parameters()), "weight_decay": 0.0})
        self.events = None  # the TensorBoard event log while fit runs (train.log)
        self.train_module = self.sharded.module if self.sharded else \
            self._data_parallel(model) if self.world_size > 1 else model
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.best_score = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.selection = None  # "auc" or "logloss" once the first validation has shown which is defined
        self.resumed: list[dict] = []  # settings changed on resume: {"epoch", "key", "old", "new"}
        self._warn = warn if warn is not None else _warn_stderr
        self._best_state = None  # in-memory copy of the best weights when there is no out_dir
        if self.cfg.task_weights is not None and len(self.cfg.task_weights) != model.num_tasks:
            raise ConfigError(f"train.task_weights = {self.cfg.task_weights}: {len(self.cfg.task_weights)} weights for the "
                              f"{model.num_tasks} tasks {model.tasks}; allowed: one weight >= 0 per task")
        key = self.cfg.early_stop_metric
        if key != "mean_auc" and key[4:] not in model.tasks:
            raise ConfigError(f"train.early_stop_metric = {key!r}: allowed: 'mean_auc' or one of "
                              f"{['auc/' + t for t in model.tasks]}")
        # on the device once: a list would be copied host-to-device (a sync) in every step's loss
        self.task_weights = None if self.cfg.task_weights is None else \
            torch.tensor(self.cfg.task_weights, dtype=torch.float32, device=self.device)

    def _data_parallel(self, model):
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        empty = [n for n, p in model.named_parameters() if p.numel() == 0]  # e.g. no numeric features
        ignored = empty + self.embedding.ddp_ignored(model)  # a fused table: gathered rows, not an all-reduce
        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        self.embedding.broadcast_from_rank0()
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (hash seeds, trim masks) never change in training: no need to sync them every step
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, **sync)

    # ---- paths -------------------------------------------------------------------------
    def _path(self, name: str) -> str | None:
        return os.path.join(self.out_dir, name) if self.out_dir else None

    # ---- state -------------------------------------------------------------------------
    def payload(self) -> dict:
        """The best.pt payload of the current weights."""
        return checkpoint_payload(self.model, self.encoder, self.config, self.data_fingerprint, self._encoder_fp)

    def state(self) -> dict:
        """The last.pt payload: the model file and the training state (:mod:`dtn.train.run_files`)."""
        return training_state(self)

    def load_state(self, ckpt: dict) -> None:
        load_training_state(self, ckpt)

    def resume(self, path: str | dict | None = None, log=print) -> bool:
        """Load ``last.pt`` (or ``path``, or an already loaded checkpoint) if it exists, after checking that
        it is a run of this model, config and data (:func:`dtn.train.checkpoint.check_resume`); settings
        that may change (lr, epochs, patience, ...) take this run's values and are recorded. True when
        something was resumed."""
        if isinstance(path, dict):
            ckpt = path
        else:
            path = path or self._path("last.pt")
            if not path or not os.path.exists(path):
                return False
            ckpt = load_checkpoint(path, map_location=self.device)
        changes = check_resume(ckpt, self.model.cfg.name, self.config.to_dict(), self.data_fingerprint, self._encoder_fp)
        self.load_state(ckpt)
        for key, old, new in changes:
            self.resumed.append({"epoch": self.epoch, "key": key, "old": old, "new": new})
        if changes:
            log("resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes) +
                f" (from epoch {self.epoch + 1}; recorded in last.pt)")
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

    def train_step(self, batch: FeatureBatch, labels: torch.Tensor, step: int, stats: EpochStats) -> None:
        """One optimiser step on a batch already on the device. No host sync: the loss and a
        divergence are accumulated in ``stats`` on the device and read at the next sync point."""
        with precision.autocast(self.cfg.amp, self.device):
            logits = self.train_module(batch)
        loss, per_task = self.model.loss(logits.float(), labels, self.task_weights)  # the loss in float32
        if self.task_weighting is not None:
            loss = self.task_weighting(per_task)
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
        self.embedding.before_backward(self.schedule)  # the fused update's lr (it may run inside the backward)
        (objective if self.scaler is None else self.scaler.scale(objective)).backward()
        self.embedding.after_backward(self.optimizer, self.scaler is not None)  # DDP / fp16: gather, mark infs
        if self.task_weighting is not None and self.world_size > 1:
            # outside DDP: average the log-variances' gradients over the ranks (one small all-reduce)
            g = self.task_weighting.log_var.grad
            g.copy_(D.all_reduce_sum(g, self.device) / self.world_size)
        if self.cfg.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            # the dense parameters' gradients (a fused embedding weight has none: its rows are not clipped)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.schedule.before_step(self.optimizer)
        # the scaler skips the step on the device when a gradient is inf / NaN (fused Adam: no host sync);
        # a deferred embedding update follows the dense step (skipped with it)
        self.embedding.optimizer_step(self.optimizer, self.scaler)

    def _sync_point(self, stats: EpochStats, bar=None) -> float:
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
        stats = EpochStats(self.device, self.model.num_tasks)
        for step, (batch, labels) in enumerate(data.batches(bs, shuffle=self.cfg.shuffle, generator=gen,
                                                             rank=self.rank, world_size=world)):
            self.check_host_batch(batch)
            batch, labels = batch_to_device(batch, self.device), labels.to(self.device, non_blocking=True)
            self.train_step(batch, labels, step, stats)
            if bar is not None:
                bar.update(1)
            if (step + 1) % SYNC_EVERY == 0:
                running = self._sync_point(stats, bar)
                if self.events is not None:  # flushed: a crash leaves them on disk for the resume to purge
                    self.events.scalars(self.schedule.step, {"train/loss_running": running})
                    self.events.flush()
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
        for b, y in local.batches(self.cfg.eval_batch_size):  # (sharded tables: every forward is collective)
            self.check_host_batch(b)
            with precision.autocast(self.cfg.amp, self.device):
                logits = self.model(batch_to_device(b, self.device))
            probs.append(torch.sigmoid(logits.float()))  # stays on the device
            labels.append(y.float().cpu())
        if self.sharded:
            self.sharded.equalize_forwards(len(probs))
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

    def _score(self, metrics: dict, rows: int) -> float:
        """The model-selection score of a validation result (higher is better): the mean (or one task's)
        AUC, or, where an AUC is undefined, minus the mean (or that task's) LogLoss."""
        key = self.cfg.early_stop_metric
        if key == "mean_auc":
            tasks = list(metrics)
        elif key.startswith("auc/") and key[4:] in metrics:
            tasks = [key[4:]]
        else:
            raise ConfigError(f"train.early_stop_metric = {key!r}: allowed: 'mean_auc' or 'auc/<task>' with a task of "
                              f"{list(metrics)}")
        if self.selection is None:
            undefined = [t for t in tasks if not math.isfinite(metrics[t]["auc"])]
            self.selection = "logloss" if undefined else "auc"
            if undefined:
                self._warn(f"the validation AUC of task(s) {undefined} is undefined (a single class among the {rows} "
                           "validation rows); selecting the best epoch by the validation LogLoss instead")
        m = "auc" if self.selection == "auc" else "logloss"
        value = float(np.mean([metrics[t][m] for t in tasks]))
        return value if m == "auc" else -value

    def fit(self, train, valid, resume: bool | dict = False, log=print, on_epoch=None) -> list[dict]:
        """Train until ``train.epochs`` or early stopping; ``resume``: continue from ``out_dir/last.pt`` (True)
        or from a loaded last.pt (a dict). ``on_epoch(epoch, row)``, if given, is called after each epoch
        has been validated and saved (``row``: its history row, with the selection ``score``); an exception
        it raises stops training there (``dtn tune``'s pruner), with this epoch's files complete."""
        if len(train) == 0:
            raise DataError("the training split is empty: no rows to train on")
        if len(valid) == 0:
            raise DataError("the validation split is empty: model selection needs validation rows (a valid file, "
                            "or a split.valid fraction that leaves some rows)")
        if not self.is_main:
            log = _quiet
            self._warn = _quiet
        if self.out_dir and self.is_main:
            ensure_writable(self.out_dir)
            clean_stale_temps(self.out_dir, ("last.pt", "best.pt", "history.csv", "metrics.json"))
            if self.sharded:
                self.sharded.write_plan(self.out_dir)
        if resume and self.resume(resume if isinstance(resume, dict) else None, log=log):
            log(f"resumed from {self._path('last.pt')} after epoch {self.epoch}")
        self.schedule.set_total_steps(self.cfg.epochs * train.num_batches(self.cfg.batch_size, self.world_size))
        self._open_events()
        try:
            while self.epoch < self.cfg.epochs and self.bad_epochs < self.cfg.patience:
                t0 = time.perf_counter()
                step0 = self.schedule.step
                train_loss = self.train_epoch(train)
                train_s, steps = time.perf_counter() - t0, self.schedule.step - step0
                val = self.evaluate(valid)
                score = self._score(val, len(valid))
                self.epoch += 1
                # the first epoch is always the best so far: a run never ends without best.pt
                improved = self.best_epoch == 0 or score > self.best_score
                if improved:
                    self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
                else:
                    self.bad_epochs += 1
                row = {"epoch": self.epoch, "train_loss": train_loss, "seconds": time.perf_counter() - t0,
                       **{f"val_{m}/{t}": v for t, d in val.items() for m, v in d.items()}, "score": score,
                       "selection": self.selection, **self._epoch_extras(train_s, steps)}
                self.history.append(row)
                self._log_events(row)
                log(f"epoch {self.epoch}: loss {train_loss:.4f}  " +
                    "  ".join(f"{t} auc {d['auc']:.4f}" for t, d in val.items()) +
                    f"  ({row['seconds']:.1f}s){'  *' if improved else ''}")
                if self.task_weighting is not None:
                    log(f"epoch {self.epoch}: task weights " +
                        "  ".join(f"{t} {row['task_weight/' + t]:.4f}" for t in self.model.tasks))
                cut = self.schedule.epoch_end(self.bad_epochs)  # plateau: after the row, which has this epoch's lr
                if cut:
                    log(f"epoch {self.epoch}: {cut}")
                # without files (or on ranks other than 0, which write none) the best weights stay in memory
                if self.sharded:  # every rank writes its shards
                    if improved and not self.out_dir:
                        self._best_state = self.sharded.snapshot()
                    if self.out_dir:
                        save_sharded(self, improved)
                elif improved and (not self.out_dir or not self.is_main):
                    self._best_state = {k: v.detach().clone()
                                        for k, v in without_optimizer_state(self.model.state_dict()).items()}
                if self.out_dir and self.is_main and not self.sharded:
                    save_epoch(self, improved)
                if on_epoch is not None:
                    on_epoch(self.epoch, row)
        finally:  # an on_epoch that stops training (a pruned trial) still closes the event file
            if self.events is not None:
                self.events.close()
                self.events = None
        # end on the best weights, which is what evaluation and prediction should use
        if self.sharded:
            if self._best_state is not None:
                self.sharded.restore(self._best_state)
            elif self.out_dir:
                self.sharded.load(load_checkpoint(self._path("best.pt"), self.device), optimizer=False)
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        elif self.out_dir and os.path.exists(self._path("best.pt")):
            self.model.load_state_dict(load_checkpoint(self._path("best.pt"), self.device)["model_state"])
        return self.history

    def _epoch_extras(self, train_seconds: float, steps: int) -> dict:
        """The history columns of the trainer's options: mean step time, the lr of the epoch's last
        step, the learned task weights."""
        extras = {"step_ms": 1000.0 * train_seconds / max(steps, 1), "lr": self.optimizer.param_groups[0]["lr"]}
        if self.embedding.fused:
            extras["embedding_lr"] = self.embedding.opt.lr
        if self.task_weighting is not None:
            extras.update({f"task_weight/{t}": w for t, w in zip(self.model.tasks, self.task_weighting.weights())})
        return extras

    def _log_events(self, row: dict) -> None:
        """An epoch's history row to the TensorBoard log (train.log), at the run's step count."""
        if self.events is None:
            return
        self.events.scalars(self.schedule.step, {
            "train/loss": row["train_loss"], "train/lr": row["lr"], "train/step_ms": row["step_ms"],
            **{f"valid/{k[4:]}": v for k, v in row.items() if k.startswith("val_")},
            **{k: v for k, v in row.items() if k.startswith("task_weight/")}})
        self.events.flush()

    def _open_events(self) -> None:
        """The TensorBoard event log (train.log: tensorboard), on rank 0 of a run with an output folder."""
        if self.cfg.log != "tensorboard" or not self.is_main:
            return
        if not self.out_dir:
            self._warn("train.log = 'tensorboard' writes to the output folder; this run has none, so no events")
            return
        from .tblog import EventLog

        # a resumed run drops the events an interrupted one wrote after its checkpoint (the epoch's own
        # points sit at the checkpoint's step and are kept)
        step = self.schedule.step
        self.events = EventLog(self._path("tensorboard"), purge_step=step + 1 if step else None)

def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


