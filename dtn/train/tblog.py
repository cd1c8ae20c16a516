"""TensorBoard event files of a training run (``train.log: tensorboard``).

Written by rank 0 to ``<out>/tensorboard`` with ``torch.utils.tensorboard`` (which needs the
optional ``tensorboard`` package: ``pip install tensorboard``). Every scalar's step is the
optimiser step count of the run, so curves of a resumed run continue where the checkpoint was
taken (events that an interrupted run wrote after its last checkpoint are purged on resume):

    train/loss_running      the running mean loss of the epoch, at every sync point (no extra sync)
    train/loss              the epoch's mean training loss
    train/lr                the lr of the epoch's last step
    train/step_ms           mean wall time of the epoch's steps
    valid/auc/<task>, valid/logloss/<task>
    task_weight/<task>      the learned task weights (train.task_weighting: uncertainty)
"""
from __future__ import annotations

import os

MISSING = ("train.log = 'tensorboard' needs the tensorboard package, which is not installed here: pip install "
           "tensorboard (or pip install 'dtn-kernels[tensorboard]'); or set train.log=none")


def require_tensorboard():
    """torch.utils.tensorboard's SummaryWriter; an ImportError saying what to install when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(MISSING) from None
    return SummaryWriter


class EventLog:
    """Scalars to TensorBoard event files in ``folder``; ``purge_step``: drop events at or after it
    that an earlier, interrupted writer left (a resume)."""

    def __init__(self, folder: str, purge_step: int | None = None):
        writer = require_tensorboard()
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.writer = writer(log_dir=folder, purge_step=purge_step)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if value is not None and value == value:  # an undefined AUC (NaN) is left out
                self.writer.add_scalar(key, float(value), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
