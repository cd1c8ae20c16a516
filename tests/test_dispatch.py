"""Precision policy and GEMM routing of the fused ops (dtn_kernels/precision.py)."""
import pytest
import torch

from dtn_kernels import precision as D


@pytest.fixture
def restore_policy():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("policy,tf32", [("highest", False), ("high", True), ("medium", True)])
def test_tf32_follows_torch_policy(policy, tf32, restore_policy):
    torch.set_float32_matmul_precision(policy)
    assert D.tf32_enabled() is tf32


def test_allow_tf32_argument(monkeypatch, restore_policy):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_float32_matmul_precision("high")
    assert D.resolve_tf32(None) is True       # None follows the policy
    assert D.resolve_tf32(False) is False     # a bool wins
    torch.set_float32_matmul_precision("highest")
    assert D.resolve_tf32(None) is False and D.resolve_tf32(True) is True
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter computes IEEE fp32 only
    assert D.resolve_tf32(True) is False


@pytest.mark.parametrize("dtype,tf32,triton", [
    (torch.bfloat16, False, True), (torch.float16, False, True),   # tensor cores: fused Triton GEMM
    (torch.float32, True, True),                                     # TF32 tensor cores
    (torch.float32, False, False),                                   # IEEE fp32: cuBLAS SGEMM
])
def test_fused_gemm_route(dtype, tf32, triton, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("DTN_FUSED_GEMM", raising=False)
    assert D.fused_gemm_in_triton(dtype, tf32) is triton
    monkeypatch.setenv("DTN_FUSED_GEMM", "torch")
    assert D.fused_gemm_in_triton(dtype, tf32) is False
    monkeypatch.setenv("DTN_FUSED_GEMM", "triton")
    assert D.fused_gemm_in_triton(dtype, tf32) is True
    monkeypatch.setenv("DTN_FUSED_GEMM", "cublas")
    with pytest.raises(ValueError, match="DTN_FUSED_GEMM"):
        D.fused_gemm_in_triton(dtype, tf32)
