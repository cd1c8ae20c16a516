"""Pure-PyTorch twin of ``torch.ops.dtn.hcnet``: the CPU path and the test oracle.

It computes exactly what ``dtn_kernels.modules.HCNet.forward`` does after the SENet, with the
same hash (``cross_hash``), including the [B, M, H, d_c] codeword tensor the kernel avoids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._group import stack_members

from ..hashing import cross_hash


def pt_hcnet_buckets(ids: torch.Tensor, salts: torch.Tensor, seeds: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """[B, M, H] buckets of every cross (i < j, itertools.combinations order) under every seed."""
    S = ids.shape[1]
    pi, pj = torch.triu_indices(S, S, 1, device=ids.device)
    ii, jj = ids[:, pi].long(), ids[:, pj].long()
    si, sj = salts.long()[pi], salts.long()[pj]
    return torch.stack([cross_hash(ii, jj, si, sj, int(s), num_buckets) for s in seeds.tolist()], dim=-1)


def pt_hcnet(ids: torch.Tensor, salts: torch.Tensor, seeds: torch.Tensor, codebook: torch.Tensor,
             restore_weight: torch.Tensor, attn: torch.Tensor, deterministic: bool = False,
             allow_tf32: bool = False) -> torch.Tensor:
    """U [B, S, d]: U[b, s] = sum over crosses k containing s of attn[b, k] * W_o [cw_{k,1} | ... | cw_{k,H}].

    ids [B, S] (ids of the crossed fields), salts [S], seeds [H] (int64, < 2^32), codebook
    [books, N, d_c] (books = 1 shared or H), restore_weight [d, H*d_c], attn [B, S(S-1)/2].
    ``deterministic``/``allow_tf32`` only matter to the Triton kernel. A group (seeds [G, H], codebook
    [G, books, N, d_c], restore_weight [G, d, H*d_c], attn [G, B, M]) gives [G, B, S, d].
    """
    if codebook.dim() == 4:
        return torch.stack([pt_hcnet(ids, salts, seeds[g], codebook[g], restore_weight[g], attn[g])
                            for g in range(codebook.shape[0])])
    B, S = ids.shape
    books, N, _ = codebook.shape
    idx = pt_hcnet_buckets(ids, salts, seeds, N)  # [B, M, H]
    H = idx.shape[-1]
    if books == 1:
        cw = codebook[0][idx]  # [B, M, H, d_c]
    else:
        cw = torch.stack([codebook[h][idx[..., h]] for h in range(H)], dim=2)
    cw = cw.to(restore_weight.dtype)  # the gathered rows only (the codebook may be kept in fp32)
    v = F.linear(cw.flatten(2), restore_weight)  # [B, M, d]
    pi, pj = torch.triu_indices(S, S, 1, device=ids.device)
    incidence = torch.zeros(S, pi.numel(), device=ids.device, dtype=v.dtype)
    k = torch.arange(pi.numel(), device=ids.device)
    incidence[pi, k] = 1.0
    incidence[pj, k] = 1.0
    return torch.einsum("sm,bmd->bsd", incidence, attn[..., None] * v)


def pt_hcnet_backward(grad_u, ids, salts, seeds, codebook, restore_weight, attn):
    """(d codebook, d restore weight, d attn) in closed form: with G[b, k] = dU[b, i_k] + dU[b, j_k],
    d attn = <G, v>, dv = attn * G, dW_o = dv^T cw, d cw = dv W_o, scattered into the codebook."""
    if codebook.dim() == 4:
        return stack_members([pt_hcnet_backward(grad_u[g], ids, salts, seeds[g], codebook[g], restore_weight[g],
                                                attn[g]) for g in range(codebook.shape[0])])
    B, S = grad_u.shape[:2]
    books, N, dc = codebook.shape
    idx = pt_hcnet_buckets(ids, salts, seeds, N)  # [B, M, H]
    H = idx.shape[-1]
    if books == 1:
        cw = codebook[0][idx]
    else:
        cw = torch.stack([codebook[h][idx[..., h]] for h in range(H)], dim=2)
    cw = cw.to(restore_weight.dtype).flatten(2)  # [B, M, H*dc]
    v = F.linear(cw, restore_weight)
    pi, pj = torch.triu_indices(S, S, 1, device=ids.device)
    G = grad_u[:, pi] + grad_u[:, pj]  # [B, M, d]
    dattn = (G * v).sum(-1)
    dv = attn[..., None] * G
    dwr = dv.flatten(0, 1).t() @ cw.flatten(0, 1)
    dcw = (dv @ restore_weight).view(*idx.shape, dc).to(codebook.dtype)  # [B, M, H, dc]
    dcb = torch.zeros_like(codebook)
    if books == 1:
        dcb[0].index_add_(0, idx.flatten(), dcw.reshape(-1, dc))
    else:
        for h in range(H):
            dcb[h].index_add_(0, idx[..., h].flatten(), dcw[:, :, h].reshape(-1, dc))
    return dcb, dwr, dattn
