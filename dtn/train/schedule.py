"""The learning rate of every optimiser step (``train.lr_schedule``, ``train.warmup_steps``).

The lr of step ``s`` (0-based, counted over the whole run) is a function of ``s`` and of how many
times a plateau cut it, never of wall time or of what the GPU computed, so a resumed run takes
exactly the steps of an uninterrupted one and setting it costs no host sync::

    lr(s) = base(s) * warm(s)
    warm(s) = (s + 1) / warmup_steps  while s < warmup_steps, else 1     (any schedule)
    constant: base = lr
    cosine:   base = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
              p = (s - warmup_steps) / (total - warmup_steps), total = epochs * batches per epoch
    plateau:  base = max(min_lr, lr * plateau_factor ** cuts)

``plateau`` cuts at the end of an epoch, on the validation score that selects the best epoch
(``train.early_stop_metric``), whenever ``plateau_patience`` epochs in a row brought no better
score (the trainer's early-stopping count, so ``plateau_patience`` < ``patience`` leaves room for
a cut before the run stops).

A parameter group with ``lr_scale`` (the dense Adam's embedding group) gets ``lr(s) * lr_scale``,
and the fused embedding optimizer ``train.embedding_lr * factor()``.

On resume the schedule's kind and warm-up must be those of the checkpoint; ``lr``, ``min_lr``,
``plateau_factor``, ``plateau_patience`` and ``epochs`` may change and apply from the next step
(the cosine then follows the curve of the new ``epochs`` from the step it is at).
"""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, cfg):
        self.cfg = cfg  # a TrainConfig
        self.step = 0  # optimiser steps taken
        self.cuts = 0  # plateau: times the lr was cut
        self.total = None  # cosine: steps of the whole run, set by the trainer once it knows the batches per epoch

    @property
    def varies(self) -> bool:
        """False for a constant lr without warm-up: the optimiser's lr is never touched."""
        return self.cfg.lr_schedule != "constant" or self.cfg.warmup_steps > 0

    def set_total_steps(self, total: int) -> None:
        self.total = max(int(total), 1)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        w = c.warmup_steps
        warm = (step + 1) / w if step < w else 1.0
        if c.lr_schedule == "cosine":
            if self.total is None:
                raise RuntimeError("LRSchedule: the cosine schedule needs set_total_steps() first")
            p = min(max(step - w, 0) / max(self.total - w, 1), 1.0)
            base = c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        elif c.lr_schedule == "plateau":
            base = max(c.min_lr, c.lr * c.plateau_factor ** self.cuts)
        else:
            base = c.lr
        return base * warm

    def before_step(self, optimizer) -> None:
        """Set the lr of the step about to be taken (host arithmetic only) and count it."""
        if self.varies:
            lr = self.lr_at(self.step)
            for group in optimizer.param_groups:  # a group with its own base lr (lr_scale = its lr / train.lr)
                scale = group.get("lr_scale", 1.0)
                group["lr"] = lr if scale == 1.0 else lr * scale
        self.step += 1

    def factor(self) -> float:
        """``lr(step) / train.lr`` of the step about to be taken: what the schedule does to any base
        lr (the embedding optimizer's, ``dtn.train.embedding_optim``)."""
        return self.lr_at(self.step) / self.cfg.lr if self.varies else 1.0

    def epoch_end(self, bad_epochs: int) -> str | None:
        """After an epoch's validation; ``bad_epochs``: epochs in a row without a better score. Returns
        a line for the log when the lr was cut."""
        c = self.cfg
        if c.lr_schedule != "plateau" or bad_epochs == 0 or bad_epochs % c.plateau_patience:
            return None
        old = self.lr_at(self.step)
        self.cuts += 1
        return f"lr {old:.3g} -> {self.lr_at(self.step):.3g} (no better validation score for {bad_epochs} epoch(s))"

    def state_dict(self) -> dict:
        return {"step": self.step, "cuts": self.cuts}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.cuts = int(state["step"]), int(state["cuts"])
