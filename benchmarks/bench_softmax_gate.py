"""DTN's per-task softmax gate (624 inputs, 6 candidate FIM outputs of width 512):
reference vs fused vs compile, fp32 and bf16 autocast, interleaved (benchmarks/harness.py).

    .venv/bin/python -m pytest benchmarks/bench_softmax_gate.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import EMBED_DIM, HIDDEN, NUM_FIELDS, bench_device, group_grid, run_module_group
from dtn.layers.gating import SoftmaxGate

DEVICE = bench_device()
DIM = NUM_FIELDS * EMBED_DIM
CANDIDATES = 6  # 3 task-specific + 3 shared FIMs (the first task of DTN)


def build():
    return SoftmaxGate(DIM, CANDIDATES).to(DEVICE)


def make_inputs(batch):
    x = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
    experts = torch.randn(batch, CANDIDATES, HIDDEN, device=DEVICE, requires_grad=True)
    return x, experts


@pytest.mark.parametrize("batch,mode,precision", group_grid(), ids=lambda v: str(v))
def test_softmax_gate(benchmark, batch, mode, precision, request):
    run_module_group(benchmark, "softmax_gate", mode, batch, precision, build, make_inputs,
                     f"B={batch} in={DIM} K={CANDIDATES} h={HIDDEN}", DEVICE, request)
