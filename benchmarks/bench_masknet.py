"""MaskNet mask block (instance mask 624 -> 640 -> 624, hidden 512, LayerNorm + ReLU):
reference vs fused vs compile.

    .venv/bin/python -m pytest benchmarks/bench_masknet.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import (EMBED_DIM, HIDDEN, NUM_FIELDS, bench_device, module_case, provider_list, run_case,
                     shape_grid, skip_unless_available)
from dtn.layers.masknet import MaskBlock

DEVICE = bench_device()
DTYPE = torch.float32
DIM = NUM_FIELDS * EMBED_DIM
MASK_HIDDEN = 640  # the paper configuration's mask_hidden


def build():
    return MaskBlock(DIM, DIM, MASK_HIDDEN, HIDDEN).to(DEVICE)


def make_inputs(batch):
    e = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
    v = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
    return e, v


@pytest.mark.parametrize("batch,mode", shape_grid(), ids=lambda v: str(v))
@pytest.mark.parametrize("provider", provider_list())
def test_mask_block(benchmark, provider, batch, mode, request):
    skip_unless_available(provider, DEVICE)
    benchmark.group = f"mask_block {mode} B={batch}"
    case = module_case("mask_block", provider, mode, batch, build, make_inputs,
                       shape=f"B={batch} in={DIM} mask_hidden={MASK_HIDDEN} out={HIDDEN}")
    run_case(benchmark, case, DEVICE, DTYPE, request)
