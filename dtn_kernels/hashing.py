"""The cross-feature hash of MemoNet's HCNet: a 32-bit murmur3 finaliser (fmix32) that gives the
same bucket on CPU, CUDA and in the Triton kernels.

Every product is split so that no intermediate leaves int64 range (torch has no uint32
arithmetic); ``dtn_kernels/triton/triton_hcnet.py`` computes the same thing in uint32.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for 0 <= h < 2^32 without signed int64 overflow."""
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    """Python-int twin of :func:`fmix32` (for salts and seeds)."""
    h &= M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def cross_hash(id_i: torch.Tensor, id_j: torch.Tensor, salt_i, salt_j, seed: int, num_buckets: int) -> torch.Tensor:
    """Bucket in [0, num_buckets) of the cross (field_i = id_i, field_j = id_j) for one hash seed.

    ``salt_*`` identify the fields (ints or int64 tensors broadcastable to the ids).
    """
    a = fmix32((id_i.long() & M32) ^ salt_i)
    b = fmix32((id_j.long() & M32) ^ salt_j)
    h = fmix32(fmix32(a ^ seed) ^ b)
    return h % num_buckets


def field_salt(field_index: int) -> int:
    return fmix32_int(0x5BD1E995 + 2654435761 * (field_index + 1))


def hash_seed(hcnet_index: int, hash_index: int) -> int:
    return fmix32_int(0x27D4EB2F * (hcnet_index + 1) + 0x165667B1 * (hash_index + 1))
