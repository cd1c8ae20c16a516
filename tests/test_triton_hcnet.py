"""torch.ops.dtn.hcnet: Triton kernels (interpreter) vs the PyTorch twin, opcheck, gradcheck,
bit-identical hashing and the deterministic codebook gradient."""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import (LOW_PRECISION, assert_close, compare_fwd_bwd, interpreter, needs_cuda, needs_interpreter,
                        requires_cuda)

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dtn_kernels.sm90_check import GPU_TEST_SHAPES

import dtn_kernels  # noqa: F401
from dtn.layers.memonet import field_salt, hash_seed
from dtn_kernels.reference.pt_hcnet import pt_hcnet

NAMES = {3: "codebook", 4: "restore.weight", 5: "attn"}
DIFF = [3, 4, 5]


def make_args(B, S, H, books, N, dc, d, dtype=torch.float32, device="cpu", seed=0, wide_ids=True, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    M = S * (S - 1) // 2
    hi = 2 ** 40 if wide_ids else 10
    ids = torch.randint(0, hi, (B, S), generator=g)
    if B > 2:
        ids[1] = -ids[1]  # negative ids hash through their low 32 bits, like the reference
    salts = torch.tensor([field_salt(f) for f in range(S)])
    seeds = torch.tensor([hash_seed(seed % 3, h) for h in range(H)])
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    cb = r(books, N, dc)
    attn = torch.rand(B, M, generator=g).to(dtype)
    if noncontig:
        ids = torch.randint(0, hi, (S, B), generator=g).t()
        attn = torch.rand(M, B, generator=g).to(dtype).t()
    args = [ids, salts, seeds, cb, r(d, H * dc) / (H * dc) ** 0.5, attn]
    return [a.to(device) for a in args]


def op(ids, salts, seeds, cb, wr, attn, deterministic=False):
    return torch.ops.dtn.hcnet(ids, salts, seeds, cb, wr, attn, deterministic, False)


@interpreter
@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("B,S,H,books,N,dc,d,noncontig", [
    (1, 2, 1, 1, 7, 3, 5, False),    # batch 1, one cross, one hash
    (19, 4, 2, 1, 11, 5, 7, False),  # shared codebook, few buckets (many collisions)
    (9, 5, 2, 2, 13, 16, 17, True),  # one book per hash, non-contiguous ids / attention
    (5, 3, 3, 3, 50, 4, 4, False),
])
def test_matches_twin(B, S, H, books, N, dc, d, noncontig, deterministic):
    args = make_args(B, S, H, books, N, dc, d, noncontig=noncontig)
    compare_fwd_bwd(lambda *a: op(*a, deterministic), pt_hcnet, args, DIFF, names=NAMES)


@interpreter
@needs_interpreter
@settings(max_examples=3, deadline=None)
@given(B=st.integers(1, 18), S=st.integers(2, 5), H=st.integers(1, 3), shared=st.booleans(),
       N=st.integers(1, 40), dc=st.integers(1, 9), d=st.integers(1, 9), seed=st.integers(0, 99))
def test_matches_twin_hypothesis(B, S, H, shared, N, dc, d, seed):
    args = make_args(B, S, H, 1 if shared else H, N, dc, d, seed=seed)
    compare_fwd_bwd(op, pt_hcnet, args, DIFF, seed=seed, names=NAMES)


@interpreter
@needs_interpreter
def test_buckets_bit_identical_to_reference_hash():
    """One-hot codebook rows + identity restore: U reveals exactly which buckets the kernel read."""
    B, S, N = 6, 3, 29
    ids, salts, seeds, _, _, attn = make_args(B, S, 1, 1, N, 1, 1)
    cb = torch.arange(N, dtype=torch.float32).view(1, N, 1) + 1.0  # row n holds n + 1
    wr = torch.ones(1, 1)
    attn = torch.zeros_like(attn)
    attn[:, 0] = 1.0  # only cross (0, 1): U[b, 0] = bucket + 1
    u = op(ids, salts, seeds, cb, wr, attn)
    from dtn.layers.memonet import cross_hash

    want = cross_hash(ids[:, 0], ids[:, 1], int(salts[0]), int(salts[1]), int(seeds[0]), N) + 1
    assert torch.equal(u[:, 0, 0].long(), want) and torch.equal(u[:, 1, 0].long(), want)


@interpreter
@needs_interpreter
def test_deterministic_codebook_grad_is_reproducible():
    args = make_args(20, 4, 2, 1, 5, 4, 3)  # 5 buckets: heavy collisions
    grads = []
    for _ in range(2):
        cb = args[3].clone().requires_grad_()
        u = op(args[0], args[1], args[2], cb, args[4], args[5], True)
        (u * torch.linspace(-1, 1, u.numel()).view_as(u)).sum().backward()
        grads.append(cb.grad)
    assert torch.equal(grads[0], grads[1])


@interpreter
@needs_interpreter
def test_matches_reference_module():
    """The fused HCNet module equals dtn.layers.memonet.HCNet on the same parameters."""
    from dtn.layers.memonet import HCNet
    from dtn_kernels import set_kernels

    torch.manual_seed(0)
    net = HCNet([0, 2, 3], num_fields=5, embed_dim=6, num_buckets=31, codebook_dim=5, index=1)
    E, ids = torch.randn(7, 5, 6), torch.randint(0, 1000, (7, 4))
    ref = net(E, ids)
    set_kernels(net, "fused")
    assert_close(net(E, ids), ref, "U")


@interpreter
@needs_interpreter
def test_empty_batch():
    assert op(*make_args(0, 3, 2, 1, 5, 4, 3)).shape == (0, 3, 3)


@interpreter
@needs_interpreter
def test_opcheck_triton():
    args = make_args(3, 3, 2, 1, 7, 4, 5)
    args[3].requires_grad_(); args[4].requires_grad_(); args[5].requires_grad_()  # noqa: E702
    torch.library.opcheck(torch.ops.dtn.hcnet.default, (*args, False, False))


def test_opcheck_and_gradcheck_twin():
    args = make_args(3, 3, 2, 2, 5, 2, 3, dtype=torch.float64)
    for i in DIFF:
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.dtn.hcnet.default, (*args, False, False))
    assert torch.autograd.gradcheck(lambda cb, wr, a: op(args[0], args[1], args[2], cb, wr, a), args[3:])


@requires_cuda
@needs_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,S,H,books,N,dc,d,deterministic", GPU_TEST_SHAPES["hcnet"])
def test_cuda_dtypes(B, S, H, books, N, dc, d, deterministic, dtype):
    """Forward and every gradient computed in ``dtype`` on the GPU, against the twin in higher precision."""
    args = make_args(B, S, H, books, N, dc, d, device="cuda")
    compare_fwd_bwd(lambda *a: op(*a, deterministic), pt_hcnet, args, DIFF, names=NAMES, dtype=dtype)


@requires_cuda
@needs_cuda
def test_cuda_deterministic_is_bitwise_reproducible():
    args = make_args(512, 6, 2, 1, 7, 16, 16, device="cuda")  # 7 buckets: every row is hot
    grads = []
    for _ in range(2):
        cb = args[3].clone().requires_grad_()
        u = op(args[0], args[1], args[2], cb, args[4], args[5], True)
        u.backward(torch.ones_like(u))
        grads.append(cb.grad)
    assert torch.equal(grads[0], grads[1])


@interpreter
@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("G,books", [(1, 1), (2, 2), (3, 1)])
def test_group_matches_members(G, books, deterministic):
    """G HCNets over the same fields in one launch equal G separate ones, forward and every gradient
    (the deterministic mode sorts the whole group's codebook rows at once)."""
    members = [make_args(11, 4, 2, books, 13, 5, 6, seed=s) for s in range(G)]
    ids, salts = members[0][0], members[0][1]
    seeds = torch.stack([m[2] for m in members])
    cb, wr, attn = (torch.stack([m[i] for m in members]) for i in (3, 4, 5))

    def twin(ids, salts, seeds, cb, wr, attn):
        return torch.stack([pt_hcnet(ids, salts, seeds[g], cb[g], wr[g], attn[g]) for g in range(G)])

    compare_fwd_bwd(lambda *a: op(*a, deterministic), twin, [ids, salts, seeds, cb, wr, attn], DIFF, names=NAMES)


@interpreter
@needs_interpreter
def test_group_opcheck():
    members = [make_args(3, 3, 2, 1, 7, 4, 5, seed=s) for s in range(2)]
    args = [members[0][0], members[0][1]] + [torch.stack([m[i] for m in members]) for i in (2, 3, 4, 5)]
    for i in DIFF:
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.dtn.hcnet.default, (*args, False, None))


def test_group_member_counts_must_agree():
    from dtn_kernels.triton.triton_hcnet import _check

    ids, salts, seeds, cb, wr, attn = make_args(4, 3, 2, 1, 7, 4, 5)
    with pytest.raises(ValueError, match="a group of 2 HCNets"):
        _check(ids, salts, torch.stack([seeds, seeds]), torch.stack([cb, cb, cb]), torch.stack([wr, wr]),
               torch.stack([attn, attn]))


def test_wrapper_never_casts_the_codebook(monkeypatch):
    """Under autocast the restore weight and attention weights go to the compute dtype but the fp32
    codebook reaches the op as the parameter itself (the kernels convert only the rows they gather):
    no full-codebook cast per step, and so no cast of its gradient either."""
    from dtn_kernels.ops.hcnet import hcnet

    ids, salts, seeds, cb, wr, attn = make_args(4, 3, 2, 1, 7, 4, 5)
    seen = []
    monkeypatch.setattr(torch.ops.dtn, "hcnet", lambda *a: seen.append(a) or a[4].new_zeros(4, 3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hcnet(ids, salts, seeds, cb, wr, attn)
    assert seen[0][3] is cb and seen[0][4].dtype == torch.bfloat16 and seen[0][5].dtype == torch.bfloat16


def test_twin_takes_an_fp32_codebook_with_low_precision_rest():
    """The twin (the CPU path and the GPU tests' baseline) accepts the mixed dtypes the op now gets: U
    and d restore / d attn in the compute dtype, d codebook in the codebook's fp32."""
    from dtn_kernels.reference.pt_hcnet import pt_hcnet_backward

    ids, salts, seeds, cb, wr, attn = make_args(5, 3, 2, 1, 7, 4, 5)
    wr, attn = wr.bfloat16(), attn.bfloat16()
    u = pt_hcnet(ids, salts, seeds, cb, wr, attn)
    dcb, dwr, dattn = pt_hcnet_backward(torch.ones_like(u), ids, salts, seeds, cb, wr, attn)
    assert u.dtype == torch.bfloat16 and dcb.dtype == torch.float32
    assert dwr.dtype == torch.bfloat16 and dattn.dtype == torch.bfloat16
    want = pt_hcnet(ids, salts, seeds, cb, wr.float(), attn.float())
    torch.testing.assert_close(u.float(), want, atol=0.05, rtol=0.05)
