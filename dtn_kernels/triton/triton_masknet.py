"""MaskNet's MaskBlock in Triton: ReLU(LN(W3 (mask(e) * v))), mask(e) = W2 ReLU(W1 e + b1) + b2.

forward, three kernels:
  1. hid  = ReLU(e W1^T + b1)                      GEMM, bias + ReLU epilogue
  2. mask = hid W2^T + b2                          GEMM, bias epilogue
  3. out  = ReLU(LN(z)), z = (mask * v) W3^T       the product with v is fused into the GEMM's
     operand load (mask * v is never written); one program owns whole rows, so the LayerNorm
     statistics, the affine and the ReLU run in the epilogue.
  Saved for backward: hid, mask, z, mean, rstd (the reference also keeps mask*v and LN's output).
backward: one row kernel for ReLU + LayerNorm (dz, and per-block partial dgamma/dbeta summed
  afterwards, deterministically), then GEMMs with fused epilogues:
  dv, dmask = (dz W3) * mask, (dz W3) * v (one GEMM, two outputs); dW3 = dz^T (mask * v) (product
  fused again); dhid = (dmask W2) * (hid > 0); dW2, db2 = dmask^T hid; de = dhid W1; dW1, db1 = dhid^T e.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear import EPI_RELU_GRAD, EPI_SPLIT_MUL, INTERPRET, gemm, pow2, precision


def _row_blocks(N: int, K: int):
    bn = pow2(N)
    if INTERPRET:
        return 16, bn, min(32, pow2(K)), 1
    return (16 if bn >= 512 else 32), bn, min(32, pow2(K)), (8 if bn >= 512 else 4)


@triton.jit
def _masked_linear_ln_relu_fwd_kernel(m_ptr, v_ptr, w_ptr, g_ptr, bt_ptr, z_ptr, mean_ptr, rstd_ptr, out_ptr,
                                      B, DV, DO, eps, PRECISION: tl.constexpr,
                                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rm64 = rm.to(tl.int64)
    rmask = rm < B
    nmask = rn < DO
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, DV, BK):
        kk = k0 + tl.arange(0, BK)
        a_off = rm64[:, None] * DV + kk[None, :]
        a_msk = rmask[:, None] & (kk[None, :] < DV)
        m = tl.load(m_ptr + a_off, mask=a_msk, other=0.0)
        a = (m.to(tl.float32) * tl.load(v_ptr + a_off, mask=a_msk, other=0.0).to(tl.float32)).to(m.dtype)
        wt = tl.load(w_ptr + rn[None, :] * DV + kk[:, None], mask=nmask[None, :] & (kk[:, None] < DV), other=0.0)
        acc = tl.dot(a, wt.to(a.dtype), acc, input_precision=PRECISION)
    mean = tl.sum(acc, axis=1) / DO
    diff = tl.where(nmask[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(diff * diff, axis=1) / DO + eps).to(tl.float32))  # eps may arrive as fp64
    gamma = tl.load(g_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    beta = tl.load(bt_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    out = tl.maximum(diff * rstd[:, None] * gamma[None, :] + beta[None, :], 0.0)
    off = rm64[:, None] * DO + rn[None, :]
    msk = rmask[:, None] & nmask[None, :]
    tl.store(z_ptr + off, acc.to(z_ptr.dtype.element_ty), mask=msk)
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=msk)
    tl.store(mean_ptr + rm, mean, mask=rmask)
    tl.store(rstd_ptr + rm, rstd, mask=rmask)


@triton.jit
def _ln_relu_bwd_kernel(go_ptr, z_ptr, mean_ptr, rstd_ptr, g_ptr, bt_ptr, dz_ptr, dg_ptr, db_ptr, B, DO,
                        BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rm64 = rm.to(tl.int64)
    rmask = rm < B
    nmask = rn < DO
    msk = rmask[:, None] & nmask[None, :]
    off = rm64[:, None] * DO + rn[None, :]
    z = tl.load(z_ptr + off, mask=msk, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rm, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rm, mask=rmask, other=0.0)
    gamma = tl.load(g_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    beta = tl.load(bt_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    zhat = tl.where(msk, (z - mean[:, None]) * rstd[:, None], 0.0)
    o = zhat * gamma[None, :] + beta[None, :]
    go = tl.load(go_ptr + off, mask=msk, other=0.0).to(tl.float32)
    gr = tl.where(msk & (o > 0), go, 0.0)  # ReLU backward
    tl.store(dg_ptr + pid * DO + rn, tl.sum(gr * zhat, axis=0), mask=nmask)
    tl.store(db_ptr + pid * DO + rn, tl.sum(gr, axis=0), mask=nmask)
    dzhat = gr * gamma[None, :]
    c1 = tl.sum(dzhat * zhat, axis=1) / DO
    c2 = tl.sum(dzhat, axis=1) / DO
    dz = rstd[:, None] * (dzhat - c2[:, None] - zhat * c1[:, None])
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=msk)


def mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5, allow_tf32: bool = False):
    """Returns (out, hid, mask, z, mean, rstd); all but ``out`` are saved for the backward."""
    e, v = e.contiguous(), v.contiguous()
    B, DV = v.shape
    DO = w3.shape[0]
    hid = gemm(e, w1.t(), bias=b1, relu=True, allow_tf32=allow_tf32)
    mask = gemm(hid, w2.t(), bias=b2, allow_tf32=allow_tf32)
    z = torch.empty((B, DO), device=v.device, dtype=v.dtype)
    out = torch.empty_like(z)
    mean = torch.empty((B,), device=v.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B > 0:
        BM, BN, BK, warps = _row_blocks(DO, DV)
        _masked_linear_ln_relu_fwd_kernel[(triton.cdiv(B, BM),)](
            mask, v, w3.contiguous(), gamma.contiguous(), beta.contiguous(), z, mean, rstd, out, B, DV, DO,
            float(eps), PRECISION=precision(allow_tf32), BM=BM, BN=BN, BK=BK, num_warps=warps)
    return out, hid, mask, z, mean, rstd


def mask_block_backward(grad_out, e, v, w1, w2, w3, gamma, beta, hid, mask, z, mean, rstd,
                        allow_tf32: bool = False):
    """Returns (de, dv, dW1, db1, dW2, db2, dW3, dgamma, dbeta)."""
    e, v, mask, hid, z = e.contiguous(), v.contiguous(), mask.contiguous(), hid.contiguous(), z.contiguous()
    B, DO = z.shape
    BM, BN, _, warps = _row_blocks(DO, 16)
    nblk = triton.cdiv(B, BM)
    dz = torch.empty_like(z)
    dg = torch.zeros((max(nblk, 1), DO), device=z.device, dtype=torch.float32)
    db = torch.zeros_like(dg)
    if B > 0:
        _ln_relu_bwd_kernel[(nblk,)](grad_out.contiguous(), z, mean, rstd, gamma.contiguous(), beta.contiguous(),
                                     dz, dg, db, B, DO, BM=BM, BN=BN, num_warps=warps)
    dgamma, dbeta = dg.sum(0).to(gamma.dtype), db.sum(0).to(beta.dtype)
    w3 = w3.contiguous()
    dv, dmask = gemm(dz, w3, aux=mask, aux2=v, epilogue=EPI_SPLIT_MUL, allow_tf32=allow_tf32)
    dW3 = gemm(dz.t(), mask, b2=v, out_dtype=w3.dtype, allow_tf32=allow_tf32)
    dhid = gemm(dmask, w2.contiguous(), aux=hid, epilogue=EPI_RELU_GRAD, allow_tf32=allow_tf32)
    dW2, db2 = gemm(dmask.t(), hid, rowsum=True, out_dtype=w2.dtype, allow_tf32=allow_tf32)
    de = gemm(dhid, w1.contiguous(), allow_tf32=allow_tf32)
    dW1, db1 = gemm(dhid.t(), e, rowsum=True, out_dtype=w1.dtype, allow_tf32=allow_tf32)
    return de, dv, dW1, db1.to(w1.dtype), dW2, db2.to(w2.dtype), dW3, dgamma, dbeta
