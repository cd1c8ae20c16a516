"""The GEMM with a fused prologue or epilogue that the MaskNet kernels share, for one GEMM or a
group of G of the same shape in one launch.

    C[g] = (A[g] [* A2[g]])[M, K] @ B[g][K, N]    (any strides: transposes are free; a group stride
                                                    of 0 shares an operand, e.g. the input e)
    epilogue: + bias[g][N] [then ReLU] | * (aux > 0) | split: C = acc * aux, C2 = acc * aux2, C3 = aux * aux2

Accumulation is fp32 whatever the input dtype. :func:`gemm` runs it in Triton when tensor cores
apply (bf16/fp16, or fp32 under a TF32 policy) and as cuBLAS + torch element-wise ops otherwise
(``dtn_kernels.precision.fused_gemm_in_triton``); plain GEMMs never come here (the ops call ``torch.mm`` /
``bmm``). Tiles: ``_launch.gemm_tiles``; 1-D grid (members x tiles), each member's tiles in
groups of ``GROUP_M`` row tiles, so consecutive programs reuse the same B columns from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import fused_gemm_in_triton
from ._launch import cdiv, gemm_tiles, grid_1d, launch

EPI_NONE, EPI_BIAS, EPI_BIAS_RELU, EPI_RELU_GRAD, EPI_SPLIT_MUL = 0, 1, 2, 3, 4
GROUP_M = 8


@triton.jit
def _tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in a grouped ordering: GROUP row tiles share columns."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    return pid_m, pid_n


@triton.jit
def _gemm_kernel(a_ptr, a2_ptr, b_ptr, c_ptr, c2_ptr, c3_ptr, bias_ptr, aux_ptr, aux2_ptr,
                 M, N, K,
                 s_ag, s_am, s_ak, s_bg, s_bk, s_bn, s_xg, s_xm, s_xn,
                 HAS_A2: tl.constexpr, EPI: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    pid = tl.program_id(0)
    g = (pid // tiles).to(tl.int64)
    pid_m, pid_n = _tile_of(pid % tiles, M, N, BM, BN, GROUP)
    a_ptr += g * s_ag
    a2_ptr += g * s_ag
    b_ptr += g * s_bg
    bias_ptr += g * N
    aux_ptr += g * s_xg
    aux2_ptr += g * s_xg
    c_off0 = g * M * N  # the outputs are contiguous [G, M, N]
    c_ptr += c_off0
    c2_ptr += c_off0
    c3_ptr += c_off0
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = (k0 + rk).to(tl.int64)
        a_off = rm64[:, None] * s_am + kk[None, :] * s_ak
        a_msk = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + a_off, mask=a_msk, other=0.0)
        if HAS_A2:  # element-wise product fused into the operand load: A * A2 is never written
            a = (a.to(tl.float32) * tl.load(a2_ptr + a_off, mask=a_msk, other=0.0).to(tl.float32)).to(a.dtype)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn64[None, :] * s_bn, mask=(kk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    c_msk = (rm[:, None] < M) & (rn[None, :] < N)
    c_off = rm64[:, None] * N + rn64[None, :]
    x_off = rm64[:, None] * s_xm + rn64[None, :] * s_xn
    if EPI == 1 or EPI == 2:  # + bias (then ReLU)
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if EPI == 2:
            acc = tl.maximum(acc, 0.0)
    if EPI == 3:  # * (aux > 0): the ReLU gradient through a stored ReLU output
        acc = tl.where(tl.load(aux_ptr + x_off, mask=c_msk, other=0.0) > 0, acc, 0.0)
    if EPI == 4:  # the two gradients of a product, and the product itself
        x1 = tl.load(aux_ptr + x_off, mask=c_msk, other=0.0).to(tl.float32)
        x2 = tl.load(aux2_ptr + x_off, mask=c_msk, other=0.0).to(tl.float32)
        tl.store(c2_ptr + c_off, (acc * x2).to(c2_ptr.dtype.element_ty), mask=c_msk)
        tl.store(c3_ptr + c_off, (x1 * x2).to(c3_ptr.dtype.element_ty), mask=c_msk)
        acc = acc * x1
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_msk)


def precision(tf32: bool) -> str:
    """tl.dot input precision for fp32 operands."""
    return "tf32" if tf32 else "ieee"


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last two dims are row-major (any stride before them, e.g. a shared
    operand expanded over a group with stride 0), else a contiguous copy."""
    if t.dim() >= 2 and t.stride(-1) == 1 and (t.stride(-2) == t.shape[-1] or t.shape[-2] <= 1):
        return t
    return t.contiguous()


def gemm(a: torch.Tensor, b: torch.Tensor, *, a2=None, bias=None, epilogue: int = EPI_NONE, aux=None, aux2=None,
         tf32: bool = False):
    """C = (a [* a2]) @ b with the chosen epilogue; returns C, or (C, C2, C3) for ``EPI_SPLIT_MUL``.

    One GEMM: ``a`` [M, K], ``b`` [K, N], ``bias`` [N], ``aux`` [M, N]. A group: ``a`` [G, M, K] and /
    or ``b`` [G, K, N] (a 2-D operand is shared by every member), ``bias`` [G, N], ``aux`` [G, M, N];
    the result is [G, M, N]. Any strides; ``a2`` has a's strides and ``aux2`` aux's. Output dtype =
    a's dtype.
    """
    grouped = a.dim() == 3 or b.dim() == 3
    G = a.shape[0] if a.dim() == 3 else (b.shape[0] if b.dim() == 3 else 1)
    M, K = a.shape[-2:]
    K2, N = b.shape[-2:]
    if K != K2:
        raise ValueError(f"gemm: inner dimensions differ, {tuple(a.shape)} @ {tuple(b.shape)}")
    a3, b3 = a.expand(G, M, K), b.expand(G, K, N)
    a23 = a2.expand(G, M, K) if a2 is not None else None
    aux3 = aux.expand(G, M, N) if aux is not None else None
    aux23 = aux2.expand(G, M, N) if aux2 is not None else None
    bias2 = bias.expand(G, N) if bias is not None else None
    split = epilogue == EPI_SPLIT_MUL
    if not fused_gemm_in_triton(a.dtype, tf32):
        out = _gemm_torch(a3, b3, a23, bias2, epilogue, aux3, aux23)
    else:
        out = _gemm_triton(a3, b3, a23, bias2, epilogue, aux3, aux23, tf32)
    if not grouped:
        out = tuple(o[0] for o in out) if split else out[0]
    return out


def _gemm_triton(a, b, a2, bias, epilogue, aux, aux2, tf32):
    G, M, K = a.shape
    N = b.shape[-1]
    if a2 is not None and a2.stride() != a.stride():
        a2 = a2.contiguous()
        a = a.contiguous()
    if aux is not None and aux2 is not None and aux.stride() != aux2.stride():
        aux, aux2 = aux.contiguous(), aux2.contiguous()
    split = epilogue == EPI_SPLIT_MUL
    c = torch.empty((G, M, N), device=a.device, dtype=a.dtype)
    c2 = torch.empty_like(c) if split else c
    c3 = torch.empty_like(c) if split else c
    if M == 0 or N == 0 or G == 0:
        return (c, c2, c3) if split else c
    x = aux if aux is not None else c
    bias = bias.contiguous() if bias is not None else None
    t = gemm_tiles(M, N, K, a.dtype, a.device, max_tile=128 * 64 if split else 128 * 128, groups=G)
    grid = grid_1d(G * cdiv(M, t.BM) * cdiv(N, t.BN))
    launch(_gemm_kernel, grid,
           a, a2 if a2 is not None else a, b, c, c2, c3, bias if bias is not None else c, x,
           aux2 if aux2 is not None else x,
           M, N, K, a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
           x.stride(0), x.stride(1), x.stride(2),
           HAS_A2=a2 is not None, EPI=epilogue, PRECISION=precision(tf32),
           BM=t.BM, BN=t.BN, BK=t.BK, GROUP=GROUP_M, num_warps=t.warps, num_stages=t.stages, dot_m=t.BM)
    return (c, c2, c3) if split else c


def _gemm_torch(a, b, a2, bias, epilogue, aux, aux2):
    """The same contract on cuBLAS (or CPU BLAS) with torch element-wise ops (IEEE fp32 route)."""
    lhs = a * a2 if a2 is not None else a
    rhs = b.to(a.dtype)
    if epilogue in (EPI_BIAS, EPI_BIAS_RELU):
        out = torch.baddbmm(bias.to(a.dtype)[:, None, :], lhs, rhs)
        return out.relu_() if epilogue == EPI_BIAS_RELU else out
    acc = torch.bmm(lhs, rhs)
    if epilogue == EPI_RELU_GRAD:
        return torch.where(aux > 0, acc, acc.new_zeros(()))
    if epilogue == EPI_SPLIT_MUL:
        return acc * aux, acc * aux2, aux * aux2
    return acc
