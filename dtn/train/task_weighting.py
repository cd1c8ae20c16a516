"""Learned task weights (``train.task_weighting: uncertainty``).

Kendall, Gal and Cipolla (CVPR 2018) weight each task's loss by a learned homoscedastic
uncertainty. With ``s_t = log sigma_t^2`` a free parameter per task (initialised to 0, i.e.
weight 1), the objective for classification tasks is

    L = sum_t exp(-s_t) * L_t + s_t / 2

A task whose loss stays high gets a larger sigma_t (a smaller weight exp(-s_t)); the s_t / 2
term keeps the weights from going to zero. At the optimum for a fixed L_t, exp(-s_t) = 1 / (2 L_t).

The parameters live outside the model (the model's state, export and predictions do not change):
the trainer adds them to the optimiser as a group of their own, without weight decay, saves them
in ``last.pt`` and logs ``exp(-s_t)`` per epoch (history.csv ``task_weight/<task>``, TensorBoard).
"""
from __future__ import annotations

import torch
from torch import nn


class UncertaintyWeighting(nn.Module):
    def __init__(self, num_tasks: int, device=None):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_tasks, device=device))

    def forward(self, per_task: torch.Tensor) -> torch.Tensor:
        """The weighted objective from the per-task losses [T]."""
        s = self.log_var
        return (torch.exp(-s) * per_task.float() + 0.5 * s).sum()

    @torch.no_grad()
    def weights(self) -> list[float]:
        """The current task weights exp(-s_t) (one host copy)."""
        return torch.exp(-self.log_var).tolist()
