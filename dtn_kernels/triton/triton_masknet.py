"""MaskNet's MaskBlock in Triton: ReLU(LN(W3 (mask(e) * v))), mask(e) = W2 ReLU(W1 e + b1) + b2.

forward:
  1. hid  = ReLU(e W1^T + b1)       GEMM with a bias + ReLU epilogue
  2. mask = hid W2^T + b2           plain GEMM: cuBLAS addmm
  3. z    = (mask * v) W3^T         GEMM with the product fused into the operand load (mask * v
                                    is never written); output tiles of any width
  4. out  = ReLU(LN(z))             row kernel: per block of rows, one pass over the width in
                                    chunks for the statistics (chunk means and M2 merged with
                                    Chan's formula), one pass to normalise -- any width, bounded
                                    registers and no shared-memory tile of the whole row
  Saved for backward: hid, mask, z, mean, rstd.
backward: a row kernel for ReLU + LayerNorm (dz, and per-block partial dgamma/dbeta summed
  afterwards in a fixed order); dv, dmask = (dz W3) * mask, (dz W3) * v with y = mask * v written
  by the same epilogue; dhid = (dmask W2) * (hid > 0); the plain GEMMs (dW3 = dz^T y, dW2 = dmask^T
  hid, dW1 = dhid^T e, de = dhid W1) and the bias sums go to cuBLAS / torch.
GEMMs 1, 3 and the two epilogue GEMMs of the backward run in Triton with tensor cores, or on
cuBLAS + torch element-wise ops in IEEE fp32 (``triton_linear.gemm``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import interpreting, resolve_tf32
from ._launch import cdiv, launch, pow2, row_block
from .triton_linear import EPI_BIAS_RELU, EPI_NONE, EPI_RELU_GRAD, EPI_SPLIT_MUL, gemm, rows_contiguous


def _row_chunk(DO: int, bm: int) -> int:
    """Columns per chunk of the row kernels: [bm, chunk] tiles of at most 4096 elements (32 fp32
    registers per thread and tensor at 4 warps), whatever the width; fewer under the interpreter,
    so the tests cover the chunk loop."""
    return min(16 if interpreting() else max(16, 4096 // bm), pow2(DO))


@triton.jit
def _ln_member_rows(z_ptr, g_ptr, bt_ptr, mean_ptr, rstd_ptr, B, DO, BM: tl.constexpr):
    """Both row kernels' layout: member g = program_id(1) of a group (rows [G, B, DO], gamma / beta
    [G, DO], statistics [G, B]). Returns g, the tensors they share shifted to member g, and this
    program's block of rows (rm, rm as int64, in-range mask)."""
    grp = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    return (grp, z_ptr + grp * B * DO, g_ptr + grp * DO, bt_ptr + grp * DO, mean_ptr + grp * B, rstd_ptr + grp * B,
            rm, rm.to(tl.int64), rm < B)


@triton.jit
def _ln_relu_fwd_kernel(z_ptr, g_ptr, bt_ptr, out_ptr, mean_ptr, rstd_ptr, B, DO, eps,
                        BM: tl.constexpr, BN: tl.constexpr):
    """Rows of member g = program_id(1) (z, out: [G, B, DO]; gamma, beta: [G, DO]; stats: [G, B])."""
    grp, z_ptr, g_ptr, bt_ptr, mean_ptr, rstd_ptr, rm, rm64, rmask = _ln_member_rows(z_ptr, g_ptr, bt_ptr, mean_ptr,
                                                                                     rstd_ptr, B, DO, BM)
    out_ptr += grp * B * DO
    # pass 1: per-chunk mean and M2, merged into the running ones (Chan et al.): no cancellation
    n = tl.zeros((BM,), dtype=tl.float32)
    mean = tl.zeros((BM,), dtype=tl.float32)
    m2 = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, DO, BN):
        rn = n0 + tl.arange(0, BN)
        msk = rmask[:, None] & (rn[None, :] < DO)
        z = tl.load(z_ptr + rm64[:, None] * DO + rn[None, :], mask=msk, other=0.0).to(tl.float32)
        cnt = tl.minimum(DO - n0, BN).to(tl.float32)
        cmean = tl.sum(z, axis=1) / cnt
        d = tl.where(msk, z - cmean[:, None], 0.0)
        cm2 = tl.sum(d * d, axis=1)
        tot = n + cnt
        delta = cmean - mean
        mean = mean + delta * (cnt / tot)
        m2 = m2 + cm2 + delta * delta * (n * cnt / tot)
        n = tot
    rstd = 1.0 / tl.sqrt((m2 / DO + eps).to(tl.float32))  # eps may arrive as fp64 under torch.compile
    tl.store(mean_ptr + rm, mean, mask=rmask)
    tl.store(rstd_ptr + rm, rstd, mask=rmask)
    # pass 2: normalise, affine, ReLU (the rows are still in L1/L2)
    for n0 in range(0, DO, BN):
        rn = n0 + tl.arange(0, BN)
        nmask = rn < DO
        msk = rmask[:, None] & nmask[None, :]
        off = rm64[:, None] * DO + rn[None, :]
        z = tl.load(z_ptr + off, mask=msk, other=0.0).to(tl.float32)
        gamma = tl.load(g_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        beta = tl.load(bt_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        out = tl.maximum((z - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :], 0.0)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _ln_relu_grad_chunk(go_ptr, z_ptr, g_ptr, bt_ptr, mean, rstd, rmask, rm64, n0, DO, BN: tl.constexpr):
    """Columns n0 .. n0 + BN of the rows: the normalised zhat, gamma, and the gradient through the ReLU
    (recomputed from z and the saved statistics, in each of the backward's two passes)."""
    rn = n0 + tl.arange(0, BN)
    nmask = rn < DO
    msk = rmask[:, None] & nmask[None, :]
    off = rm64[:, None] * DO + rn[None, :]
    zhat = tl.where(msk, (tl.load(z_ptr + off, mask=msk, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None],
                    0.0)
    gamma = tl.load(g_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    beta = tl.load(bt_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + off, mask=msk, other=0.0).to(tl.float32)
    gr = tl.where(msk & (zhat * gamma[None, :] + beta[None, :] > 0), go, 0.0)  # ReLU backward
    return rn, nmask, msk, off, zhat, gamma, gr


@triton.jit
def _ln_relu_bwd_kernel(go_ptr, z_ptr, mean_ptr, rstd_ptr, g_ptr, bt_ptr, dz_ptr, dg_ptr, db_ptr, B, DO,
                        BM: tl.constexpr, BN: tl.constexpr):
    """Rows of member g = program_id(1); dgamma / dbeta partials [G, blocks, DO]."""
    grp, z_ptr, g_ptr, bt_ptr, mean_ptr, rstd_ptr, rm, rm64, rmask = _ln_member_rows(z_ptr, g_ptr, bt_ptr, mean_ptr,
                                                                                     rstd_ptr, B, DO, BM)
    pid = tl.program_id(0)
    go_ptr += grp * B * DO
    dz_ptr += grp * B * DO
    dg_ptr += grp * tl.num_programs(0) * DO
    db_ptr += grp * tl.num_programs(0) * DO
    mean = tl.load(mean_ptr + rm, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rm, mask=rmask, other=0.0)
    c1 = tl.zeros((BM,), dtype=tl.float32)
    c2 = tl.zeros((BM,), dtype=tl.float32)
    # pass 1: the row sums of the LayerNorm backward, and this block's dgamma / dbeta partials
    for n0 in range(0, DO, BN):
        rn, nmask, msk, off, zhat, gamma, gr = _ln_relu_grad_chunk(go_ptr, z_ptr, g_ptr, bt_ptr, mean, rstd, rmask,
                                                                    rm64, n0, DO, BN)
        tl.store(dg_ptr + pid * DO + rn, tl.sum(gr * zhat, axis=0), mask=nmask)
        tl.store(db_ptr + pid * DO + rn, tl.sum(gr, axis=0), mask=nmask)
        dzhat = gr * gamma[None, :]
        c1 += tl.sum(dzhat * zhat, axis=1)
        c2 += tl.sum(dzhat, axis=1)
    c1 = c1 / DO
    c2 = c2 / DO
    # pass 2: dz = rstd * (dzhat - mean(dzhat) - zhat * mean(dzhat * zhat))
    for n0 in range(0, DO, BN):
        rn, nmask, msk, off, zhat, gamma, gr = _ln_relu_grad_chunk(go_ptr, z_ptr, g_ptr, bt_ptr, mean, rstd, rmask,
                                                                    rm64, n0, DO, BN)
        dz = rstd[:, None] * (gr * gamma[None, :] - c2[:, None] - zhat * c1[:, None])
        tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=msk)


def _grouped(e, v, w1, b1, w2, b2, w3, gamma, beta):
    """Group form: weights [G, ...]; e / v [G, B, .] (a [B, .] input is shared by every member)."""
    grouped = w3.dim() == 3
    if not grouped:
        w1, b1, w2, b2, w3, gamma, beta = (t[None] for t in (w1, b1, w2, b2, w3, gamma, beta))
    G = w3.shape[0]
    B = v.shape[-2]
    e = rows_contiguous(e.expand(G, B, e.shape[-1]))
    v = rows_contiguous(v.expand(G, B, v.shape[-1]))
    return e, v, w1, b1, w2, b2, w3, gamma.contiguous(), beta.contiguous(), grouped


def mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, eps: float = 1e-5, allow_tf32=None):
    """Returns (out, hid, mask, z, mean, rstd); all but ``out`` are saved for the backward. One block
    (w3 [DO, DV]: out [B, DO]) or a group (w3 [G, DO, DV]: every output with a leading G)."""
    e, v, w1, b1, w2, b2, w3, gamma, beta, grouped = _grouped(e, v, w1, b1, w2, b2, w3, gamma, beta)
    tf32 = resolve_tf32(allow_tf32)
    G, B, DV = v.shape
    DO = w3.shape[1]
    hid = gemm(e, w1.transpose(1, 2), bias=b1, epilogue=EPI_BIAS_RELU, tf32=tf32)
    mask = torch.baddbmm(b2.to(hid.dtype)[:, None, :], hid, w2.transpose(1, 2).to(hid.dtype))  # plain GEMM: cuBLAS
    z = gemm(mask, w3.transpose(1, 2), a2=v, epilogue=EPI_NONE, tf32=tf32)
    out = torch.empty_like(z)
    mean = torch.empty((G, B), device=v.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B > 0 and DO > 0 and G > 0:
        bm = row_block(B, v.device, groups=G)
        launch(_ln_relu_fwd_kernel, (cdiv(B, bm), G), z, gamma, beta, out, mean, rstd, B, DO, float(eps),
               BM=bm, BN=_row_chunk(DO, bm), num_warps=4)
    elif DO == 0:  # an output width of 0: the statistics of an empty row, as the twin defines them
        mean.zero_()
        rstd.fill_(float(eps) ** -0.5)
    outs = (out, hid, mask, z, mean, rstd)
    return outs if grouped else tuple(t[0] for t in outs)


def mask_block_backward(grad_out, e, v, w1, w2, w3, gamma, beta, hid, mask, z, mean, rstd, allow_tf32=None):
    """Returns (de, dv, dW1, db1, dW2, db2, dW3, dgamma, dbeta) in the inputs' shapes (a shared e / v
    gets the sum over the group)."""
    e_shape, v_shape = e.shape, v.shape
    grouped = w3.dim() == 3
    b_dummy = gamma  # the biases are not needed by the backward
    e, v, w1, _, w2, _, w3, gamma, beta, _ = _grouped(e, v, w1, b_dummy, w2, b_dummy, w3, gamma, beta)
    if not grouped:
        hid, mask, z, mean, rstd, grad_out = (t[None] for t in (hid, mask, z, mean, rstd, grad_out))
    hid, mask, z = hid.contiguous(), mask.contiguous(), z.contiguous()  # the row kernels read members packed
    tf32 = resolve_tf32(allow_tf32)
    G, B, DO = z.shape
    bm = row_block(B, z.device, groups=G)
    nblk = cdiv(B, bm)
    dz = torch.empty_like(z)
    dg = torch.empty((G, max(nblk, 1), DO), device=z.device, dtype=torch.float32)  # every partial is written
    db = torch.empty_like(dg)
    if B == 0 or G == 0:
        dg.zero_()
        db.zero_()
    elif DO > 0:
        launch(_ln_relu_bwd_kernel, (nblk, G), grad_out.contiguous(), z, mean.contiguous(), rstd.contiguous(), gamma,
               beta, dz, dg, db, B, DO, BM=bm, BN=_row_chunk(DO, bm), num_warps=4)
    dgamma, dbeta = dg.sum(1).to(gamma.dtype), db.sum(1).to(beta.dtype)
    dv, dmask, y = gemm(dz, w3, aux=mask, aux2=v, epilogue=EPI_SPLIT_MUL, tf32=tf32)
    dhid = gemm(dmask, w2, aux=hid, epilogue=EPI_RELU_GRAD, tf32=tf32)
    # plain GEMMs and bias sums: cuBLAS / torch
    dW3 = torch.bmm(dz.transpose(1, 2), y).to(w3.dtype)
    dW2 = torch.bmm(dmask.transpose(1, 2), hid).to(w2.dtype)
    de = torch.bmm(dhid, w1.to(dhid.dtype))
    dW1 = torch.bmm(dhid.transpose(1, 2), e).to(w1.dtype)
    grads = [de, dv, dW1, dhid.sum(1).to(w1.dtype), dW2, dmask.sum(1).to(w2.dtype), dW3, dgamma, dbeta]
    if not grouped:
        return tuple(t[0] for t in grads)
    if len(e_shape) == 2:
        grads[0] = de.sum(0)
    if len(v_shape) == 2:
        grads[1] = dv.sum(0)
    return tuple(grads)
