"""DTN's per-task softmax gate (624 inputs, 6 candidate FIM outputs of width 512):
reference vs fused vs compile.

    .venv/bin/python -m pytest benchmarks/bench_softmax_gate.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import (EMBED_DIM, HIDDEN, NUM_FIELDS, bench_device, module_case, provider_list, run_case,
                     shape_grid, skip_unless_available)
from dtn.layers.gating import SoftmaxGate

DEVICE = bench_device()
DTYPE = torch.float32
DIM = NUM_FIELDS * EMBED_DIM
CANDIDATES = 6  # 3 task-specific + 3 shared FIMs (the first task of DTN)


def build():
    return SoftmaxGate(DIM, CANDIDATES).to(DEVICE)


def make_inputs(batch):
    x = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
    experts = torch.randn(batch, CANDIDATES, HIDDEN, device=DEVICE, requires_grad=True)
    return x, experts


@pytest.mark.parametrize("batch,mode", shape_grid(), ids=lambda v: str(v))
@pytest.mark.parametrize("provider", provider_list())
def test_softmax_gate(benchmark, provider, batch, mode, request):
    skip_unless_available(provider, DEVICE)
    benchmark.group = f"softmax_gate {mode} B={batch}"
    case = module_case("softmax_gate", provider, mode, batch, build, make_inputs,
                       shape=f"B={batch} in={DIM} K={CANDIDATES} h={HIDDEN}")
    run_case(benchmark, case, DEVICE, DTYPE, request)
