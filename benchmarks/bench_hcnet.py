"""MemoNet HCNet (32 categorical fields crossed pairwise = 496 crosses, 2 hashes, 100,000
buckets, codebook d_c 16, linear restoring + attentive shrinking): reference vs fused vs compile,
fp32 and bf16 autocast, interleaved (benchmarks/harness.py).

    .venv/bin/python -m pytest benchmarks/bench_hcnet.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from harness import EMBED_DIM, NUM_FIELDS, bench_device, group_grid, run_module_group
from dtn.layers.memonet import HCNet

DEVICE = bench_device()
NUM_CATEGORICAL = 32  # Census-Income's categorical fields; the other 7 of the 39 are numeric
HASHES, BUCKETS, CODEBOOK_DIM = 2, 100_000, 16


def build():
    return HCNet(list(range(NUM_CATEGORICAL)), NUM_FIELDS, EMBED_DIM, num_hashes=HASHES, num_buckets=BUCKETS,
                 codebook_dim=CODEBOOK_DIM).to(DEVICE)


def make_inputs(batch):
    E = torch.randn(batch, NUM_FIELDS, EMBED_DIM, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 50, (batch, NUM_CATEGORICAL), device=DEVICE)
    return E, ids


@pytest.mark.parametrize("batch,mode,precision", group_grid(), ids=lambda v: str(v))
def test_hcnet(benchmark, batch, mode, precision, request):
    run_module_group(benchmark, "hcnet", mode, batch, precision, build, make_inputs,
                     f"B={batch} fields={NUM_CATEGORICAL} H={HASHES} N={BUCKETS} d_c={CODEBOOK_DIM}", DEVICE, request)
