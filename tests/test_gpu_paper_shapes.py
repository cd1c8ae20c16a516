"""The fused ops on a GPU at the paper's shapes -- the shapes the benchmarks time, so the tiles that
are timed are the tiles that are tested (B = 2048 and 4096, D = 624, MaskNet 624 -> 640 -> 512,
HCNet over 32 fields with H = 2, d_c = 16 and 100,000 buckets, gates over 4-6 experts; grouped mode
with the paper DTN's 3 MFI modules / 6 HCNets). The shape lists are ``dtn_kernels.sm90_check``'s,
which compiles the same launches offline.

Each op's forward and every gradient, in bf16 (HCNet's codebook in fp32, as the wrapper passes the
parameter) and in fp32 under torch's TF32 policy ("high", which the benchmarks use), against the twin
in higher precision with eager PyTorch in the same precision as the 2x baseline (tests/triton_env.py).
Run with ``TRITON_INTERPRET=0 pytest -m requires_cuda`` (benchmarks/gpu_suite.sh selects them).
"""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import TF32_TOLERANCES, compare_fwd_bwd, needs_cuda, requires_cuda

import contextlib

import pytest
import torch

import dtn_kernels  # noqa: F401  (registers the ops)
from dtn_kernels.reference.pt_gated_cross import pt_gated_cross
from dtn_kernels.reference.pt_hcnet import pt_hcnet
from dtn_kernels.reference.pt_masknet import pt_mask_block
from dtn_kernels.reference.pt_softmax_gate import pt_softmax_gate
from dtn_kernels.sm90_check import GATE_PAPER, GATED_CROSS_PAPER, GROUPED_PAPER, HCNET_PAPER, MASK_BLOCK_PAPER
from dtn_kernels import precision as kernel_precision

import test_triton_gated_cross as tgc
import test_triton_hcnet as thc
import test_triton_masknet as tmb
import test_triton_softmax_gate as tsg

pytestmark = [requires_cuda, needs_cuda]
PRECISIONS = ("bf16", "tf32")


@contextlib.contextmanager
def policy(precision):
    """(dtype, tolerances) of the precision, with torch's fp32 matmul policy set for it."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        if precision == "tf32":
            assert kernel_precision.tf32_enabled(), "the TF32 policy did not take: the test would check IEEE fp32"
            yield torch.float32, TF32_TOLERANCES
        else:
            yield torch.bfloat16, None
    finally:
        torch.set_float32_matmul_precision(prev)


def _stack(members, idx):
    return [torch.stack([m[i] for m in members]) for i in idx]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,D,gated", GATED_CROSS_PAPER)
def test_gated_cross(B, D, gated, precision):
    args = tgc.make_args(B, D, gated, device="cuda")
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(lambda *a: torch.ops.dtn.gated_cross(*a, None)[0], pt_gated_cross, args,
                        [0, 1, 2, 3] + ([4] if gated else []), names=tgc.NAMES, dtype=dtype, tolerances=tol)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("G,shape", GROUPED_PAPER["gated_cross"])
@pytest.mark.parametrize("shared", [True, False])
def test_gated_cross_grouped(G, shape, shared, precision):
    """DTN's first layer (x0 = xl = e shared by the group) and a later one (per-member xl)."""
    B, D, gated = shape
    members = [tgc.make_args(B, D, gated, device="cuda", seed=s) for s in range(G)]
    x0 = members[0][0]
    xl = members[0][0] if shared else torch.stack([m[1] for m in members])
    args = [x0, xl, *_stack(members, (2, 3)), torch.stack([m[4] for m in members]) if gated else None]
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(lambda *a: torch.ops.dtn.gated_cross(*a, None)[0], pt_gated_cross, args,
                        [0, 1, 2, 3] + ([4] if gated else []), names=tgc.NAMES, dtype=dtype, tolerances=tol)


def _mask_op(*a):
    return torch.ops.dtn.mask_block(*a, 1e-5, None)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,din,hm,dv,do", MASK_BLOCK_PAPER)
def test_mask_block(B, din, hm, dv, do, precision):
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(_mask_op, pt_mask_block, tmb.make_args(B, din, dv, hm, do, device="cuda"), tmb.DIFF,
                        names=tmb.NAMES, dtype=dtype, tolerances=tol)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("G,shape", GROUPED_PAPER["mask_block"])
def test_mask_block_grouped(G, shape, precision):
    B, din, hm, dv, do = shape
    members = [tmb.make_args(B, din, dv, hm, do, device="cuda", seed=s) for s in range(G)]
    args = [members[0][0], *_stack(members, range(1, 9))]  # e shared (the MFI modules' embeddings)
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(lambda *a: _mask_op(*a)[0], lambda *a: pt_mask_block(*a)[0], args, tmb.DIFF,
                        names=tmb.NAMES, dtype=dtype, tolerances=tol)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,S,H,books,N,dc,d,deterministic", HCNET_PAPER)
def test_hcnet(B, S, H, books, N, dc, d, deterministic, precision):
    args = thc.make_args(B, S, H, books, N, dc, d, device="cuda")
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(lambda *a: torch.ops.dtn.hcnet(*a, deterministic, None), pt_hcnet, args, thc.DIFF,
                        names=thc.NAMES, dtype=dtype, tolerances=tol, keep=(3,))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("G,shape", GROUPED_PAPER["hcnet"])
def test_hcnet_grouped(G, shape, precision):
    B, S, H, books, N, dc, d, deterministic = shape
    members = [thc.make_args(B, S, H, books, N, dc, d, device="cuda", seed=s) for s in range(G)]
    args = [members[0][0], members[0][1], *_stack(members, (2, 3, 4, 5))]
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(lambda *a: torch.ops.dtn.hcnet(*a, deterministic, None), pt_hcnet, args, thc.DIFF,
                        names=thc.NAMES, dtype=dtype, tolerances=tol, keep=(3,))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,din,K,h,masked", GATE_PAPER)
def test_softmax_gate(B, din, K, h, masked, precision):
    args = tsg.make_args(B, din, K, h, "1d" if masked else None, device="cuda")
    with policy(precision) as (dtype, tol):
        compare_fwd_bwd(lambda *a: torch.ops.dtn.softmax_gate(*a, None), pt_softmax_gate, args, [0, 1, 2, 3],
                        n_outputs=2, names=tsg.NAMES, dtype=dtype, tolerances=tol)
