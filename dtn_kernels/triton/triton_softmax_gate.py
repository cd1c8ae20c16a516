"""Softmax gating in Triton: logits = x W^T + b, optional expert mask, softmax over the K
experts, and the weighted sum of the expert outputs, in one kernel per block of rows.

The op is bound by memory traffic (it reads the [B, K, h] expert outputs once) and the gate has
few experts (K = 4-6 in DTN): the logits are K dot products per row, done with FMAs over chunks
of the input (a tensor-core tile would be padded to 16 experts and needs 16+ rows per program).
A few rows per program keep the grid larger than the card's SM count at the paper's batch sizes.

forward writes only ``out`` [B, h] and ``weights`` [B, K].
backward: one kernel per block of rows computes d experts = w * d out, the weight gradient (the
incoming one plus <d out, expert_k>), the softmax backward to d logits (kept in fp32), and
d x = d logits @ W; cuBLAS then gives dW = d logits^T x and torch db as its column sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import interpreting
from ._launch import cdiv, grid_1d, launch, pow2, row_block


def _blocks(B, din, K, h, device):
    """(BB, BK, BD, BH, warps): BB rows per program; BD input columns per logits chunk and BH output
    columns per expert chunk so that the [BB, BK, BD] / [BB, BK, BH] tiles stay ~4096 elements (32
    fp32 registers per thread at 4 warps)."""
    bk = pow2(K, 1)
    if interpreting():
        return 4, bk, min(16, pow2(din)), min(16, pow2(h)), 1
    bb = row_block(B, device, cap=8)
    per = max(16, min(128, 4096 // (bb * bk)))  # [BB, BK, BD] and [BB, BK, BH] tiles of ~4096 elements
    return bb, bk, min(per, pow2(din)), min(per, pow2(h)), 4


@triton.jit
def _softmax_gate_fwd_kernel(x_ptr, w_ptr, b_ptr, m_ptr, e_ptr, out_ptr, wts_ptr, B, DIN, K, H, s_mb, s_mk,
                             s_xb, HAS_MASK: tl.constexpr, HAS_X: tl.constexpr,
                             BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    """HAS_X: logits = x W^T + b from x [B, DIN]; otherwise x_ptr holds the logits [B, K] (row stride
    s_xb: a column slice of all tasks' logits computed by one GEMM)."""
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rk = tl.arange(0, BK)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    if HAS_X:
        acc = tl.zeros((BB, BK), dtype=tl.float32)
        for d0 in range(0, DIN, BD):
            dd = d0 + tl.arange(0, BD)
            x = tl.load(x_ptr + rb64[:, None] * s_xb + dd[None, :], mask=bmask[:, None] & (dd[None, :] < DIN),
                        other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rk[:, None] * DIN + dd[None, :], mask=(rk[:, None] < K) & (dd[None, :] < DIN),
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        logits = acc + tl.load(b_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    else:
        logits = tl.load(x_ptr + rb64[:, None] * s_xb + rk[None, :], mask=bmask[:, None] & (rk[None, :] < K),
                         other=0.0).to(tl.float32)
    valid = (rk[None, :] < K) & (rb[:, None] >= 0)  # padded rows stay finite (no nan warnings)
    if HAS_MASK:
        rbc = tl.minimum(rb64, B - 1)
        on = tl.load(m_ptr + rbc[:, None] * s_mb + rk[None, :] * s_mk, mask=valid, other=0)
        valid = valid & (on != 0)
    logits = tl.where(valid, logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    p = tl.where(valid, tl.exp(logits - mx[:, None]), 0.0)
    wts = p / tl.sum(p, axis=1)[:, None]
    kmask = bmask[:, None] & (rk[None, :] < K)
    tl.store(wts_ptr + rb64[:, None] * K + rk[None, :], wts.to(wts_ptr.dtype.element_ty), mask=kmask)
    kmask3 = kmask[:, :, None]
    for h0 in range(0, H, BH):
        hh = h0 + tl.arange(0, BH)
        emask = kmask3 & (hh[None, None, :] < H)
        ex = tl.load(e_ptr + (rb64[:, None, None] * K + rk[None, :, None]) * H + hh[None, None, :], mask=emask,
                     other=0.0).to(tl.float32)  # [BB, BK, BH]: every expert's slice at once
        o = tl.sum(wts[:, :, None] * ex, axis=1)
        tl.store(out_ptr + rb64[:, None] * H + hh[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=bmask[:, None] & (hh[None, :] < H))


@triton.jit
def _softmax_gate_bwd_kernel(go_ptr, gw_ptr, wts_ptr, e_ptr, w_ptr, dexp_ptr, dl_ptr, dx_ptr, B, DIN, K, H,
                             HAS_GW: tl.constexpr,
                             BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rk = tl.arange(0, BK)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    kmask = bmask[:, None] & (rk[None, :] < K)
    wts = tl.load(wts_ptr + rb64[:, None] * K + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BB, BK), dtype=tl.float32)
    if HAS_GW:  # the incoming gradient of the weights output (None when the weights were not used)
        dw += tl.load(gw_ptr + rb64[:, None] * K + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + tl.arange(0, BH)
        hmask = bmask[:, None] & (hh[None, :] < H)
        go = tl.load(go_ptr + rb64[:, None] * H + hh[None, :], mask=hmask, other=0.0).to(tl.float32)
        off = (rb64[:, None, None] * K + rk[None, :, None]) * H + hh[None, None, :]
        emask = kmask[:, :, None] & (hh[None, None, :] < H)
        ex = tl.load(e_ptr + off, mask=emask, other=0.0).to(tl.float32)
        tl.store(dexp_ptr + off, (wts[:, :, None] * go[:, None, :]).to(dexp_ptr.dtype.element_ty), mask=emask)
        dw += tl.sum(go[:, None, :] * ex, axis=2)
    dl = wts * (dw - tl.sum(wts * dw, axis=1)[:, None])  # softmax backward; masked experts have w = 0
    tl.store(dl_ptr + rb64[:, None] * K + rk[None, :], dl.to(dl_ptr.dtype.element_ty), mask=kmask)
    for d0 in range(0, DIN, BD):  # DIN = 0 when the logits were an input
        dd = d0 + tl.arange(0, BD)
        w = tl.load(w_ptr + rk[:, None] * DIN + dd[None, :], mask=(rk[:, None] < K) & (dd[None, :] < DIN),
                    other=0.0).to(tl.float32)
        dx = tl.sum(dl[:, :, None] * w[None, :, :], axis=1)  # [BB, BD]
        tl.store(dx_ptr + rb64[:, None] * DIN + dd[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=bmask[:, None] & (dd[None, :] < DIN))


def _mask2d(mask, B, K):
    if mask is None:
        return None
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # a free reinterpretation
    return m.expand(B, K) if m.dim() == 1 else m


def softmax_gate_forward(x, experts, weight, bias, mask=None, allow_tf32=None):
    """(out [B, h], weights [B, K]); ``allow_tf32`` is accepted for the ops' common signature (the
    logits are FMA dot products). ``weight=None``: ``x`` holds the logits [B, K] (softmax_mix)."""
    B, K, h = experts.shape
    has_x = weight is not None
    din = x.shape[1] if has_x else 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    experts = experts.contiguous()
    out = torch.empty((B, h), device=x.device, dtype=experts.dtype)
    wts = torch.empty((B, K), device=x.device, dtype=x.dtype)
    if B == 0:
        return out, wts
    m = _mask2d(mask, B, K)
    BB, BK, BD, BH, warps = _blocks(B, din, K, h, x.device)
    launch(_softmax_gate_fwd_kernel, grid_1d(cdiv(B, BB)),
           x, weight.contiguous() if has_x else x, bias.contiguous() if has_x else x, m if m is not None else x,
           experts, out, wts, B, din, K, h,
           m.stride(0) if m is not None else 0, m.stride(1) if m is not None else 0, x.stride(0),
           HAS_MASK=m is not None, HAS_X=has_x, BB=BB, BK=BK, BD=BD, BH=BH, num_warps=warps)
    return out, wts


def softmax_gate_backward(grad_out, grad_weights, x, experts, weight, weights, allow_tf32=None):
    """Returns (dx, d experts, dW, db); ``weight=None`` (softmax_mix): (d logits, d experts, None, None)."""
    B, K, h = experts.shape
    has_x = weight is not None
    din = x.shape[1] if has_x else 0
    x, experts, weights = x.contiguous(), experts.contiguous(), weights.contiguous()
    go = grad_out.contiguous()
    gw = grad_weights.contiguous() if grad_weights is not None else None
    dexp = torch.empty_like(experts)
    dl = torch.empty((B, K), device=x.device, dtype=torch.float32 if has_x else x.dtype)
    dx = torch.empty_like(x) if has_x else dl
    if B > 0:
        BB, BK, BD, BH, warps = _blocks(B, din, K, h, x.device)
        launch(_softmax_gate_bwd_kernel, grid_1d(cdiv(B, BB)),
               go, gw if gw is not None else weights, weights, experts, weight.contiguous() if has_x else x, dexp, dl,
               dx, B, din, K, h, HAS_GW=gw is not None, BB=BB, BK=BK, BD=BD, BH=BH, num_warps=warps)
    if not has_x:
        return dl, dexp, None, None
    # plain GEMM over the batch: cuBLAS (split-K is its business); db = column sums of d logits
    dW = dl.t().to(x.dtype).mm(x).to(weight.dtype)
    return dx, dexp, dW, dl.sum(0).to(weight.dtype)
