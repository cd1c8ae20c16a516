"""GDCN gated cross network (2 layers, 624 inputs = 39 fields x d 16): reference vs fused vs compile.

    .venv/bin/python -m pytest benchmarks/bench_gated_cross.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import (EMBED_DIM, NUM_FIELDS, bench_device, module_case, provider_list, run_case, shape_grid,
                     skip_unless_available)
from dtn.layers.gdcn import CrossNetwork

DEVICE = bench_device()
DTYPE = torch.float32
DIM = NUM_FIELDS * EMBED_DIM
LAYERS = 2


def build():
    return CrossNetwork(DIM, num_layers=LAYERS, gated=True).to(DEVICE)


def make_inputs(batch):
    return (torch.randn(batch, DIM, device=DEVICE, requires_grad=True),)


@pytest.mark.parametrize("batch,mode", shape_grid(), ids=lambda v: str(v))
@pytest.mark.parametrize("provider", provider_list())
def test_gated_cross(benchmark, provider, batch, mode, request):
    skip_unless_available(provider, DEVICE)
    benchmark.group = f"gated_cross {mode} B={batch}"
    case = module_case("gated_cross", provider, mode, batch, build, make_inputs,
                       shape=f"B={batch} dim={DIM} layers={LAYERS}")
    run_case(benchmark, case, DEVICE, DTYPE, request)
