"""GDCN gated cross network (2 layers, 624 inputs = 39 fields x d 16): reference vs fused vs
compile, fp32 and bf16 autocast, interleaved (benchmarks/harness.py).

    .venv/bin/python -m pytest benchmarks/bench_gated_cross.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import EMBED_DIM, NUM_FIELDS, bench_device, group_grid, run_module_group
from dtn.layers.gdcn import CrossNetwork

DEVICE = bench_device()
DIM = NUM_FIELDS * EMBED_DIM
LAYERS = 2


def build():
    return CrossNetwork(DIM, num_layers=LAYERS, gated=True).to(DEVICE)


def make_inputs(batch):
    return (torch.randn(batch, DIM, device=DEVICE, requires_grad=True),)


@pytest.mark.parametrize("batch,mode,precision", group_grid(), ids=lambda v: str(v))
def test_gated_cross(benchmark, batch, mode, precision, request):
    run_module_group(benchmark, "gated_cross", mode, batch, precision, build, make_inputs,
                     f"B={batch} dim={DIM} layers={LAYERS}", DEVICE, request, extra=("fused_cublas",))
