"""MemoNet's HCNet in Triton: hashing, codebook gather, linear restoring and global attentive
shrinking in one kernel, never materialising the [B, M, H, d_c] codewords.

Because restoring is linear and shared by all crosses, shrinking can come first:
    U[b, s] = sum_{k ∋ s} w[b, k] * W_o [cw_{k,1} | ... | cw_{k,H}] = W_o P[b, s],
    P[b, s] = sum_{k ∋ s} w[b, k] * [cw_{k,1} | ... | cw_{k,H}]          ([H * d_c] per field)
forward: one program per (block of rows, field s) walks the S-1 crosses that contain s,
  hashes them (bit-identical to ``dtn_kernels.hashing.cross_hash``: uint32 arithmetic wraps
  like the reference's masked int64 products), gathers the H codewords, accumulates
  w * codeword into a [rows, H, d_c] register tile (P), then multiplies by W_o^T into U.
backward: one program per (block of rows, chunk of crosses); for cross k = (i, j) it hashes and
  gathers again, forms G = dU[b, i] + dU[b, j] and g = G W_o (the codewords' gradient before the
  attention weight) with a small tensor-core GEMM, writes dw[b, k] = <codewords, g>, adds w * g
  into the codebook gradient, and accumulates this program's share of dW_o = sum G^T (w * cw)
  in registers (partials summed afterwards in a fixed order). Nothing of size B*S*H*d_c is
  written. The codebook gradient goes either through relaxed atomics (fast; summation order not
  fixed) or deterministically: the (row, hash) keys are written, stably sorted, and one program
  per codebook row sums its contributions in sorted order -- every size is known on the host
  (no host sync; the row ranges come from ``searchsorted`` on the device).
The backward's grid is one-dimensional, so any number of crosses works (S(S-1)/2 > 65,535 too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import interpreting, resolve_tf32, tensor_cores
from ._launch import cdiv, grid_1d, launch, num_sms, pow2
from .triton_linear import precision


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser on uint32 (multiplications wrap mod 2^32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _field_hash(ids_ptr, salts_ptr, rb64, bmask, f, S):
    """fmix32((id & 0xFFFFFFFF) ^ salt_f) for field position f of the subset, rows rb."""
    ids = tl.load(ids_ptr + rb64 * S + f, mask=bmask, other=0).to(tl.int64).to(tl.uint32)  # keeps the low 32 bits
    salt = tl.load(salts_ptr + f).to(tl.uint32)
    return _fmix32(ids ^ salt)


@triton.jit
def _codebook_rows(a_i, a_j, seeds, rh, NBK, SHARED: tl.constexpr):
    """[BB, BH] int64 row of the flattened [num_books * N] codebook for every row and hash."""
    h = _fmix32(_fmix32(a_i[:, None] ^ seeds[None, :]) ^ a_j[:, None])
    bucket = (h % tl.cast(NBK, tl.uint32)).to(tl.int64)
    if SHARED:
        return bucket
    return rh.to(tl.int64)[None, :] * NBK + bucket


@triton.jit
def _hcnet_fwd_kernel(ids_ptr, salts_ptr, seeds_ptr, cb_ptr, wr_ptr, w_ptr, u_ptr,
                      B, S, M, NBK, D, H, DC,
                      SHARED: tl.constexpr, PRECISION: tl.constexpr,
                      BB: tl.constexpr, BH: tl.constexpr, BDC: tl.constexpr, BD: tl.constexpr):
    grp = tl.program_id(2).to(tl.int64)  # member of a group of HCNets (same fields and shapes)
    seeds_ptr += grp * H
    cb_ptr += grp * (NBK * (1 if SHARED else H)) * DC
    wr_ptr += grp * D * H * DC
    w_ptr += grp * B * M
    u_ptr += grp * B * S * D
    s = tl.program_id(1)
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    rh = tl.arange(0, BH)
    rc = tl.arange(0, BDC)
    hmask = rh < H
    cmask = rc < DC
    seeds = tl.load(seeds_ptr + rh, mask=hmask, other=0).to(tl.int64).to(tl.uint32)
    gmask = bmask[:, None, None] & hmask[None, :, None] & cmask[None, None, :]
    a_s = _field_hash(ids_ptr, salts_ptr, rb64, bmask, s, S)
    acc = tl.zeros((BB, BH, BDC), dtype=tl.float32)
    for tt in range(0, S - 1):
        t = tt + (tt >= s).to(tl.int32)  # the S-1 partners of s
        a_t = _field_hash(ids_ptr, salts_ptr, rb64, bmask, t, S)
        lo = tl.minimum(s, t)
        hi = tl.maximum(s, t)
        k = lo * S - (lo * (lo + 1)) // 2 + (hi - lo - 1)  # itertools.combinations order
        a_i = tl.where(s < t, a_s, a_t)
        a_j = tl.where(s < t, a_t, a_s)
        rows = _codebook_rows(a_i, a_j, seeds, rh, NBK, SHARED)
        cw = tl.load(cb_ptr + rows[:, :, None] * DC + rc[None, None, :], mask=gmask, other=0.0)
        wk = tl.load(w_ptr + rb64 * M + k, mask=bmask, other=0.0).to(tl.float32)
        acc += wk[:, None, None] * cw.to(tl.float32)
    HD = H * DC
    p2 = tl.reshape(acc, (BB, BH * BDC)).to(wr_ptr.dtype.element_ty)
    col = tl.reshape(rh[:, None] * DC + rc[None, :], (BH * BDC,))
    colm = tl.reshape(hmask[:, None] & cmask[None, :], (BH * BDC,))
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        wt = tl.load(wr_ptr + rd[None, :] * HD + col[:, None], mask=colm[:, None] & (rd[None, :] < D), other=0.0)
        u = tl.dot(p2, wt, input_precision=PRECISION)
        tl.store(u_ptr + (rb64 * S + s)[:, None] * D + rd[None, :], u.to(u_ptr.dtype.element_ty),
                 mask=bmask[:, None] & (rd[None, :] < D))


@triton.jit
def _hcnet_bwd_kernel(ids_ptr, salts_ptr, seeds_ptr, cb_ptr, wr_ptr, w_ptr, gu_ptr, pi_ptr, pj_ptr,
                      dw_ptr, dcb_ptr, key_ptr, dwr_ptr,
                      B, S, M, NBK, D, H, DC, NBLK, KPER, PROGRAMS,
                      SHARED: tl.constexpr, DETERMINISTIC: tl.constexpr, PRECISION: tl.constexpr,
                      BB: tl.constexpr, BH: tl.constexpr, BDC: tl.constexpr, BD: tl.constexpr):
    grp = (tl.program_id(0) // PROGRAMS).to(tl.int64)  # member of a group of HCNets
    pid = tl.program_id(0) % PROGRAMS
    rows_per_member = NBK * (1 if SHARED else H)
    seeds_ptr += grp * H
    cb_ptr += grp * rows_per_member * DC
    wr_ptr += grp * D * H * DC
    w_ptr += grp * B * M
    gu_ptr += grp * B * S * D
    dw_ptr += grp * B * M
    dcb_ptr += grp * rows_per_member * DC
    key_ptr += grp * B * M * H
    dwr_ptr += grp * PROGRAMS * D * H * DC
    bblk = pid % NBLK
    kc = pid // NBLK
    rb = bblk * BB + tl.arange(0, BB)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    rh = tl.arange(0, BH)
    rc = tl.arange(0, BDC)
    rd = tl.arange(0, BD)
    hmask = rh < H
    cmask = rc < DC
    dmask = rd < D
    HD = H * DC
    seeds = tl.load(seeds_ptr + rh, mask=hmask, other=0).to(tl.int64).to(tl.uint32)
    col = tl.reshape(rh[:, None] * DC + rc[None, :], (BH * BDC,))
    colm = tl.reshape(hmask[:, None] & cmask[None, :], (BH * BDC,))
    wr = tl.load(wr_ptr + rd[:, None] * HD + col[None, :], mask=dmask[:, None] & colm[None, :], other=0.0)  # [BD, BHC]
    dwr = tl.zeros((BD, BH * BDC), dtype=tl.float32)
    for kk in range(0, KPER):
        k = kc * KPER + kk
        rmask = bmask & ((rb * 0 + k) < M)
        i = tl.load(pi_ptr + tl.minimum(k, M - 1))  # past the last cross: a real pair, every row masked
        j = tl.load(pj_ptr + tl.minimum(k, M - 1))
        a_i = _field_hash(ids_ptr, salts_ptr, rb64, rmask, i, S)
        a_j = _field_hash(ids_ptr, salts_ptr, rb64, rmask, j, S)
        rows = _codebook_rows(a_i, a_j, seeds, rh, NBK, SHARED)
        gmask = rmask[:, None, None] & hmask[None, :, None] & cmask[None, None, :]
        cw = tl.load(cb_ptr + rows[:, :, None] * DC + rc[None, None, :], mask=gmask, other=0.0).to(tl.float32)
        gd_msk = rmask[:, None] & dmask[None, :]
        G = tl.load(gu_ptr + (rb64 * S + i)[:, None] * D + rd[None, :], mask=gd_msk, other=0.0).to(tl.float32) + \
            tl.load(gu_ptr + (rb64 * S + j)[:, None] * D + rd[None, :], mask=gd_msk, other=0.0).to(tl.float32)
        g = tl.reshape(tl.dot(G.to(wr.dtype), wr, input_precision=PRECISION), (BB, BH, BDC))  # dL/dcw / w
        tl.store(dw_ptr + rb64 * M + k, tl.sum(tl.sum(cw * g, axis=2), axis=1), mask=rmask)
        wk = tl.load(w_ptr + rb64 * M + k, mask=rmask, other=0.0).to(tl.float32)
        if DETERMINISTIC:  # rows of the whole group's flattened codebook gradient, so one sort serves all
            tl.store(key_ptr + (rb64 * M + k)[:, None] * H + rh[None, :], rows + grp * rows_per_member,
                     mask=rmask[:, None] & hmask[None, :])
        else:
            tl.atomic_add(dcb_ptr + rows[:, :, None] * DC + rc[None, None, :], wk[:, None, None] * g, mask=gmask,
                          sem="relaxed")
        wcw = tl.reshape(wk[:, None, None] * cw, (BB, BH * BDC))
        dwr = tl.dot(tl.trans(G).to(wr.dtype), wcw.to(wr.dtype), dwr, input_precision=PRECISION)  # dot-m: BD
    tl.store(dwr_ptr + pid.to(tl.int64) * (D * HD) + rd[:, None] * HD + col[None, :], dwr,
             mask=dmask[:, None] & colm[None, :])


@triton.jit
def _hcnet_codebook_grad_kernel(perm_ptr, start_ptr, end_ptr, w_ptr, gu_ptr, wr_ptr, pi_ptr, pj_ptr, dcb_ptr,
                                B, S, M, D, H, DC, BDC: tl.constexpr, BD: tl.constexpr):
    """One codebook row (of the group's flattened codebooks): the sum of its contributions in sorted
    (member, b, k, h) order."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + r)
    end = tl.load(end_ptr + r)
    rc = tl.arange(0, BDC)
    rd = tl.arange(0, BD)
    cmask = rc < DC
    dmask = rd < D
    HD = H * DC
    acc = tl.zeros((BDC,), dtype=tl.float32)
    for n in range(start, end):
        idx = tl.load(perm_ptr + n)  # flat ((g * B + b) * M + k) * H + h
        h = idx % H
        gbk = idx // H  # (g * B + b) * M + k: also the offset into the group's attention weights
        kk = gbk % M
        gb = gbk // M  # g * B + b: the row of the group's upstream gradient
        grp = gb // B
        i = tl.load(pi_ptr + kk)
        j = tl.load(pj_ptr + kk)
        G = tl.load(gu_ptr + (gb * S + i) * D + rd, mask=dmask, other=0.0).to(tl.float32) + \
            tl.load(gu_ptr + (gb * S + j) * D + rd, mask=dmask, other=0.0).to(tl.float32)
        wr_h = tl.load(wr_ptr + grp * D * HD + rd[:, None] * HD + h * DC + rc[None, :],
                       mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + gbk).to(tl.float32) * tl.sum(G[:, None] * wr_h, axis=0)
    tl.store(dcb_ptr + r * DC + rc, acc, mask=cmask)


def _blocks(H, DC, D, tc: bool = True):
    """(BB, BH, BDC, BD, warps): BH * BDC >= 16 and BD >= 16 (tl.dot's minimum). 64 rows per program
    feed wgmma's 64-row tiles; IEEE fp32 (FMA dots) takes 32, which keeps the backward's registers
    without spills."""
    bh = pow2(H, 1)
    bdc = max(pow2(DC, 1), 16 // bh)
    bd = pow2(D)
    if interpreting():
        return 16, bh, bdc, bd, 1
    return (64, bh, bdc, bd, 4) if tc else (32, bh, bdc, bd, 8)


def _check(ids, salts, seeds, codebook, restore_weight, attn):
    """Shapes in group form: (G, B, S, H, books, N, DC)."""
    B, S = ids.shape
    G, H = seeds.shape
    _, books, N, DC = codebook.shape
    if books not in (1, H):
        raise ValueError(f"codebook has {books} books; expected 1 (shared) or {H} (one per hash)")
    if restore_weight.shape[-1] != H * DC:
        raise ValueError(f"restore weight {tuple(restore_weight.shape)} needs H*d_c = {H * DC} columns")
    if attn.shape[-2:] != (B, S * (S - 1) // 2):
        raise ValueError(f"attention weights {tuple(attn.shape)} must be [..., B, S(S-1)/2] = [{B}, {S * (S - 1) // 2}]")
    if codebook.shape[0] != G or restore_weight.shape[0] != G or attn.shape[0] != G:
        raise ValueError(f"a group of {G} HCNets (seeds {tuple(seeds.shape)}) needs as many codebooks "
                         f"{tuple(codebook.shape)}, restore weights {tuple(restore_weight.shape)} and attention "
                         f"weights {tuple(attn.shape)}")
    if salts.shape != (S,):
        raise ValueError(f"salts {tuple(salts.shape)} must be [S] = [{S}] (the members of a group cross the same fields)")
    return G, B, S, H, books, N, DC


def _prep(ids, salts, seeds, codebook, restore_weight, attn):
    """Group form: a single HCNet (codebook [books, N, d_c]) is a group of one."""
    grouped = codebook.dim() == 4
    if not grouped:
        seeds, codebook, restore_weight, attn = seeds[None], codebook[None], restore_weight[None], attn[None]
    return (ids.contiguous(), salts.to(torch.int64).contiguous(), seeds.to(torch.int64).contiguous(),
            codebook.contiguous(), restore_weight.contiguous(), attn.contiguous(), grouped)


def hcnet_forward(ids, salts, seeds, codebook, restore_weight, attn, allow_tf32=None) -> torch.Tensor:
    """U [B, S, d] from ids [B, S] (the subset fields), salts [S], seeds [H], codebook [books, N, d_c],
    restore weight [d, H*d_c] and attention weights attn [B, M]; a group of G HCNets over the same
    fields: seeds [G, H], codebook [G, books, N, d_c], restore weight [G, d, H*d_c], attn [G, B, M]
    -> U [G, B, S, d] in one launch."""
    ids, salts, seeds, codebook, restore_weight, attn, grouped = _prep(ids, salts, seeds, codebook, restore_weight,
                                                                       attn)
    G, B, S, H, books, N, DC = _check(ids, salts, seeds, codebook, restore_weight, attn)
    D = restore_weight.shape[1]
    u = torch.empty((G, B, S, D), device=codebook.device, dtype=restore_weight.dtype)  # the compute dtype
    if B > 0 and D > 0 and G > 0:
        if S < 2:  # no crosses: U = 0
            u.zero_()
        else:
            tf32 = resolve_tf32(allow_tf32)
            BB, BH, BDC, BD, warps = _blocks(H, DC, D, tensor_cores(restore_weight.dtype, tf32))
            launch(_hcnet_fwd_kernel, (cdiv(B, BB), S, G),
                   ids, salts, seeds, codebook, restore_weight, attn, u, B, S, S * (S - 1) // 2, N, D, H, DC,
                   SHARED=books == 1, PRECISION=precision(tf32), BB=BB, BH=BH, BDC=BDC,
                   BD=min(BD, 64), num_warps=warps, dot_m=BB)
    return u if grouped else u[0]


_PAIRS: dict = {}


def _pairs(S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) int32 of every cross in itertools.combinations order, made once per (S, device)."""
    key = (S, str(device))
    if key in _PAIRS:
        return _PAIRS[key]
    pairs = torch.triu_indices(S, S, 1, device=device).to(torch.int32)
    out = (pairs[0].contiguous(), pairs[1].contiguous())
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:  # a tensor made inside a CUDA-graph capture is only filled by the graph's replays
        _PAIRS[key] = out
    return out


def _crosses_per_program(nblk: int, M: int, device) -> int:
    """Crosses per backward program (``nblk`` row blocks of all members): about 8 programs per SM, so
    the partial dW_o tiles to sum stay few whatever the number of crosses."""
    if interpreting():
        return 2
    want = max(1, (nblk * M) // (8 * num_sms(device)))
    return pow2(want, 1)  # no cap: the dW_o partials stay ~8 per SM whatever M is


def hcnet_backward(grad_u, ids, salts, seeds, codebook, restore_weight, attn, deterministic: bool = False,
                   allow_tf32=None):
    """Returns (d codebook, d restore weight, d attn), in the inputs' shapes (single or group)."""
    ids, salts, seeds, codebook, restore_weight, attn, grouped = _prep(ids, salts, seeds, codebook, restore_weight,
                                                                       attn)
    G, B, S, H, books, N, DC = _check(ids, salts, seeds, codebook, restore_weight, attn)
    D = restore_weight.shape[1]
    M = S * (S - 1) // 2
    dev = codebook.device
    dw = torch.empty((G, B, M), device=dev, dtype=torch.float32)
    if B == 0 or M == 0 or D == 0 or G == 0:
        out = (torch.zeros_like(codebook), torch.zeros_like(restore_weight), dw.zero_().to(attn.dtype))
        return out if grouped else tuple(t[0] for t in out)
    gu = grad_u.to(restore_weight.dtype).reshape(G, B, S, D).contiguous()
    tf32 = resolve_tf32(allow_tf32)
    BB, BH, BDC, BD, warps = _blocks(H, DC, D, tensor_cores(restore_weight.dtype, tf32))
    nblk = cdiv(B, BB)
    kper = _crosses_per_program(nblk * G, M, dev)
    programs = nblk * cdiv(M, kper)  # per member
    pi, pj = _pairs(S, dev)
    dwr_part = torch.empty((G, programs, D, H * DC), device=dev, dtype=torch.float32)
    rows = books * N  # per member
    dcb = torch.empty((G * rows, DC), device=dev, dtype=torch.float32) if deterministic else \
        torch.zeros((G * rows, DC), device=dev, dtype=torch.float32)
    keys = torch.empty((G, B, M, H), device=dev, dtype=torch.int64) if deterministic else dw
    launch(_hcnet_bwd_kernel, grid_1d(G * programs),
           ids, salts, seeds, codebook, restore_weight, attn, gu, pi, pj, dw, dcb, keys, dwr_part,
           B, S, M, N, D, H, DC, nblk, kper, programs,
           SHARED=books == 1, DETERMINISTIC=deterministic, PRECISION=precision(tf32), BB=BB, BH=BH, BDC=BDC, BD=BD,
           num_warps=warps, dot_m=BB)
    if deterministic:
        sorted_rows, perm = torch.sort(keys.view(-1), stable=True)
        bounds = torch.arange(G * rows, device=dev, dtype=torch.int64)
        starts = torch.searchsorted(sorted_rows, bounds)
        ends = torch.searchsorted(sorted_rows, bounds, right=True)
        launch(_hcnet_codebook_grad_kernel, grid_1d(G * rows),
               perm, starts, ends, attn, gu, restore_weight, pi, pj, dcb, B, S, M, D, H, DC, BDC=BDC, BD=BD,
               num_warps=1)
    dwr = dwr_part.sum(1)  # fixed order: deterministic
    # the codebook gradient is written in fp32, the dtype of the (fp32) codebook parameter: no cast
    out = (dcb.view(G, books, N, DC).to(codebook.dtype), dwr.to(restore_weight.dtype), dw.to(attn.dtype))
    return out if grouped else tuple(t[0] for t in out)
