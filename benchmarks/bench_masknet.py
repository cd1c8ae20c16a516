"""MaskNet mask block (instance mask 624 -> 640 -> 624, hidden 512, LayerNorm + ReLU):
reference vs fused vs compile, fp32 and bf16 autocast, interleaved (benchmarks/harness.py).

    .venv/bin/python -m pytest benchmarks/bench_masknet.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import EMBED_DIM, HIDDEN, NUM_FIELDS, bench_device, group_grid, run_module_group
from dtn.layers.masknet import MaskBlock

DEVICE = bench_device()
DIM = NUM_FIELDS * EMBED_DIM
MASK_HIDDEN = 640  # the paper configuration's mask_hidden


def build():
    return MaskBlock(DIM, DIM, MASK_HIDDEN, HIDDEN).to(DEVICE)


def make_inputs(batch):
    e = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
    v = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
    return e, v


@pytest.mark.parametrize("batch,mode,precision", group_grid(), ids=lambda v: str(v))
def test_mask_block(benchmark, batch, mode, precision, request):
    run_module_group(benchmark, "mask_block", mode, batch, precision, build, make_inputs,
                     f"B={batch} in={DIM} mask_hidden={MASK_HIDDEN} out={HIDDEN}", DEVICE, request,
                     extra=("fused_cublas",))
