"""What keeps a training step free of host syncs: batches copied to the device without blocking
(:func:`batch_to_device`) and an epoch's running loss and first non-finite step kept on the device
(:class:`EpochStats`), read by the trainer only at its sync points (every ``SYNC_EVERY`` steps and at
the end of an epoch, :mod:`dtn.train.trainer`).
"""
from __future__ import annotations

import torch

from ..features import FeatureBatch, JaggedField


def batch_to_device(batch: FeatureBatch, device) -> FeatureBatch:
    """``batch.to(device)`` without blocking the host: from pageable memory a non-blocking copy is
    staged before it returns (the source may be reused at once) and does not wait for the GPU."""
    def move(t):
        return None if t is None else t.to(device, non_blocking=True)

    multi = tuple(JaggedField(move(m.values), move(m.offsets), move(m.weights)) for m in batch.multi)
    return FeatureBatch(move(batch.categorical), move(batch.numeric), multi)


class EpochStats:
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
