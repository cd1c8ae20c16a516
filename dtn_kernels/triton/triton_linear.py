"""A general Triton GEMM with the epilogues and prologues the fused ops share.

C[M, N] = (A [* A2])[M, K] @ (B [* B2])[K, N]   (any strides: transposes are free)
epilogue: + bias[N], ReLU, + aux, * (aux > 0), or the split product (C = acc*aux, C2 = acc*aux2);
optionally the row sums of A (a bias gradient when A = dY^T).

Accumulation is fp32 whatever the input dtype. Used by the backward passes of every op
and by the MaskNet forward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

EPI_NONE, EPI_ADD, EPI_RELU_GRAD, EPI_SPLIT_MUL = 0, 1, 2, 3


def precision(allow_tf32: bool) -> str:
    """tl.dot input precision for fp32 operands: IEEE unless TF32 is allowed (GPU only)."""
    return "tf32" if (allow_tf32 and not INTERPRET) else "ieee"


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo); tl.dot needs every block dimension >= 16."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def gemm_blocks(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    """Fixed (BM, BN, BK, num_warps): small under the interpreter, no autotuning anywhere."""
    if INTERPRET:
        return 16, min(32, pow2(N)), min(32, pow2(K)), 1
    return min(64, pow2(M)), min(64, pow2(N)), min(32, pow2(K)), 4


@triton.jit
def _gemm_kernel(a_ptr, a2_ptr, b_ptr, b2_ptr, c_ptr, c2_ptr, bias_ptr, aux_ptr, aux2_ptr, rowsum_ptr,
                 M, N, K,
                 s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_xm, s_xn,
                 HAS_A2: tl.constexpr, HAS_B2: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                 EPI: tl.constexpr, ROWSUM: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rsum = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = (k0 + rk).to(tl.int64)
        a_off = rm64[:, None] * s_am + kk[None, :] * s_ak
        a_msk = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + a_off, mask=a_msk, other=0.0)
        if HAS_A2:  # elementwise product fused into the operand load
            a = (a.to(tl.float32) * tl.load(a2_ptr + a_off, mask=a_msk, other=0.0).to(tl.float32)).to(a.dtype)
        b_off = kk[:, None] * s_bk + rn64[None, :] * s_bn
        b_msk = (kk[:, None] < K) & (rn[None, :] < N)
        b = tl.load(b_ptr + b_off, mask=b_msk, other=0.0)
        if HAS_B2:
            b = (b.to(tl.float32) * tl.load(b2_ptr + b_off, mask=b_msk, other=0.0).to(tl.float32)).to(b.dtype)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        if ROWSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    c_msk = (rm[:, None] < M) & (rn[None, :] < N)
    x_off = rm64[:, None] * s_xm + rn64[None, :] * s_xn
    if EPI == 1:  # + aux (a residual)
        acc += tl.load(aux_ptr + x_off, mask=c_msk, other=0.0).to(tl.float32)
    if EPI == 2:  # * (aux > 0): the ReLU gradient through a stored ReLU output
        acc = tl.where(tl.load(aux_ptr + x_off, mask=c_msk, other=0.0) > 0, acc, 0.0)
    c_off = rm64[:, None] * s_cm + rn64[None, :] * s_cn
    if EPI == 3:  # C = acc * aux, C2 = acc * aux2 (the two gradients of a product)
        x1 = tl.load(aux_ptr + x_off, mask=c_msk, other=0.0).to(tl.float32)
        x2 = tl.load(aux2_ptr + x_off, mask=c_msk, other=0.0).to(tl.float32)
        tl.store(c2_ptr + c_off, (acc * x2).to(c2_ptr.dtype.element_ty), mask=c_msk)
        acc = acc * x1
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_msk)
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + rm, rsum, mask=rm < M)


def gemm(a: torch.Tensor, b: torch.Tensor, *, a2=None, b2=None, bias=None, relu=False, aux=None, aux2=None,
         epilogue: int = EPI_NONE, rowsum: bool = False, out_dtype=None, allow_tf32: bool = False):
    """C = (a [* a2]) @ (b [* b2]) with the chosen epilogue; returns C, or (C, C2) / (C, rowsum).

    ``a`` [M, K] and ``b`` [K, N] may be any strided views (a transpose costs nothing);
    ``aux``/``aux2`` are [M, N] and must share one layout; ``a2``/``b2`` share a's/b's strides.
    """
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    if a2 is not None:
        assert a2.shape == a.shape and a2.stride() == a.stride()
    if b2 is not None:
        assert b2.shape == b.shape and b2.stride() == b.stride()
    out_dtype = out_dtype or a.dtype
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    c2 = torch.empty((M, N), device=a.device, dtype=out_dtype) if epilogue == EPI_SPLIT_MUL else c
    rs = torch.empty((M,), device=a.device, dtype=torch.float32) if rowsum else c
    if aux is not None and aux2 is not None:
        assert aux.stride() == aux2.stride()
    x = aux if aux is not None else c
    if M == 0 or N == 0:
        return _gemm_result(c, c2, rs, epilogue, rowsum, zero_rowsum=True)
    if K == 0:
        c.zero_()
    BM, BN, BK, warps = gemm_blocks(M, N, K)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _gemm_kernel[grid](
        a, a2 if a2 is not None else a, b, b2 if b2 is not None else b, c, c2,
        bias if bias is not None else c, x, aux2 if aux2 is not None else x, rs,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        x.stride(0), x.stride(1),
        HAS_A2=a2 is not None, HAS_B2=b2 is not None, HAS_BIAS=bias is not None, RELU=relu,
        EPI=epilogue, ROWSUM=rowsum, PRECISION=precision(allow_tf32), BM=BM, BN=BN, BK=BK, num_warps=warps,
    )
    return _gemm_result(c, c2, rs, epilogue, rowsum)


def _gemm_result(c, c2, rs, epilogue, rowsum, zero_rowsum=False):
    if rowsum and zero_rowsum:
        rs.zero_()
    if epilogue == EPI_SPLIT_MUL:
        return (c, c2, rs) if rowsum else (c, c2)
    return (c, rs) if rowsum else c
