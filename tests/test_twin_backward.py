"""The reference twins' hand-written backwards against autograd of the twins' own forwards, in fp32.

Each ``pt_*_backward`` in ``dtn_kernels/reference`` writes out, in PyTorch, the formula a kernel's
backward computes (Triton for the FIMs and the gate, the compiled extension for the embedding
bag's fused update). The float64 gradchecks in the op tests exercise them through the ops; here each one is
compared directly, in fp32 (the precision the kernels run), with ``torch.autograd.grad`` of the
same twin's forward -- odd shapes, every input that has a gradient, the tolerances of
tests/numerics.py (fp32: |a - e| <= 1e-5 + 1e-4 |e|).
"""
from __future__ import annotations

import pytest
import torch

from numerics import assert_close

from dtn_kernels.reference.pt_embedding_bag import pt_embedding_bag
from dtn_kernels.reference.pt_embedding_update import pt_touched_row_grads
from dtn_kernels.reference.pt_gated_cross import pt_gated_cross, pt_gated_cross_backward, pt_gated_cross_pre
from dtn_kernels.reference.pt_hcnet import pt_hcnet, pt_hcnet_backward
from dtn_kernels.reference.pt_masknet import pt_mask_block, pt_mask_block_backward
from dtn_kernels.reference.pt_softmax_gate import (pt_softmax_gate, pt_softmax_gate_backward, pt_softmax_mix,
                                                   pt_softmax_mix_backward)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def autograd_grads(outputs, grads, inputs):
    """torch.autograd.grad of sum(<output, grad>) over the (output, grad) pairs."""
    return torch.autograd.grad(outputs, inputs, grads)


def check_all(got, want, names):
    assert len(got) == len(want) == len(names)
    for g, w, name in zip(got, want, names):
        assert_close(g, w, name)


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("pre", [True, False], ids=["saved-pre", "recomputed"])
def test_gated_cross_backward(gated, pre):
    gen = torch.Generator().manual_seed(1)
    B, D = 7, 13
    names = ["x0", "xl", "weight", "bias"] + (["gate_weight"] if gated else [])
    x0, xl, w, b, wg = _leaves(*(_randn(*s, gen=gen) for s in ((B, D), (B, D), (D, D), (D,), (D, D))))
    wg = wg if gated else None
    inputs = [x0, xl, w, b] + ([wg] if gated else [])
    go = _randn(B, D, gen=gen)
    want = autograd_grads(pt_gated_cross(x0, xl, w, b, wg), go, inputs)
    z, a = pt_gated_cross_pre(xl, w, b, wg) if pre else (None, None)
    got = pt_gated_cross_backward(go, x0.detach(), xl.detach(), w.detach(), b.detach(),
                                  wg.detach() if gated else None, z, a)
    assert (got[4] is None) is (not gated)
    check_all([g for g in got if g is not None], want, names)


def _mask_block_inputs(gen, B, DE, DV, HM, DO, G=None, shared_e=False):
    lead = () if G is None else (G,)
    e = _randn(*(() if shared_e else lead), B, DE, gen=gen)
    v = _randn(*lead, B, DV, gen=gen)
    params = [_randn(*lead, *s, gen=gen) * 0.5 for s in ((HM, DE), (HM,), (DV, HM), (DV,), (DO, DV))]
    gamma = 1.0 + 0.1 * _randn(*lead, DO, gen=gen)
    beta = 0.1 * _randn(*lead, DO, gen=gen)
    return _leaves(e, v, *params, gamma, beta)


MASK_NAMES = ["e", "v", "w1", "b1", "w2", "b2", "w3", "gamma", "beta"]


@pytest.mark.parametrize("group", [None, "shared-e"], ids=["one", "group-shared-e"])
def test_mask_block_backward(group):
    gen = torch.Generator().manual_seed(2)
    B, DE, DV, HM, DO = 9, 11, 7, 5, 13
    G = 3 if group else None
    inputs = _mask_block_inputs(gen, B, DE, DV, HM, DO, G, shared_e=group == "shared-e")
    out = pt_mask_block(*inputs, 1e-5)[0]
    go = _randn(*out.shape, gen=gen)
    want = autograd_grads(out, go, inputs)
    got = pt_mask_block_backward(go, *(t.detach() for t in inputs), 1e-5)
    check_all(got, want, MASK_NAMES)


@pytest.mark.parametrize("books", ["shared", "per-hash", "group"])
def test_hcnet_backward(books):
    gen = torch.Generator().manual_seed(3)
    B, S, H, N, dc, d = 6, 5, 3, 17, 3, 7  # N small: many crosses share a bucket (the scatter adds up)
    M = S * (S - 1) // 2
    G = 2 if books == "group" else None
    lead = () if G is None else (G,)
    ids = torch.randint(0, 1000, (B, S), generator=gen)
    salts = torch.randint(0, 2 ** 32, (S,), generator=gen)
    seeds = torch.randint(0, 2 ** 32, (*lead, H), generator=gen)
    cb, wr, attn = _leaves(_randn(*lead, H if books == "per-hash" else 1, N, dc, gen=gen),
                           _randn(*lead, d, H * dc, gen=gen), torch.rand(*lead, B, M, generator=gen))
    out = pt_hcnet(ids, salts, seeds, cb, wr, attn)
    go = _randn(*out.shape, gen=gen)
    want = autograd_grads(out, go, [cb, wr, attn])
    got = pt_hcnet_backward(go, ids, salts, seeds, cb.detach(), wr.detach(), attn.detach())
    check_all(got, want, ["codebook", "restore_weight", "attn"])


@pytest.mark.parametrize("mask_kind", [None, "experts", "rows"])
@pytest.mark.parametrize("weights_used", [True, False])
def test_softmax_gate_backward(mask_kind, weights_used):
    gen = torch.Generator().manual_seed(4)
    B, D, K, h = 7, 11, 5, 6
    mask = {None: None, "experts": torch.tensor([True, False, True, True, False]),
            "rows": torch.rand(B, K, generator=gen) > 0.3}[mask_kind]
    if mask is not None and mask.dim() == 2:
        mask[:, 0] = True  # every row keeps an expert (an all-off row is NaN by definition)
    x, experts, w, b = _leaves(_randn(B, D, gen=gen), _randn(B, K, h, gen=gen), _randn(K, D, gen=gen),
                               _randn(K, gen=gen))
    out, weights = pt_softmax_gate(x, experts, w, b, mask)
    go = _randn(B, h, gen=gen)
    gw = _randn(B, K, gen=gen) if weights_used else None
    outs, grads = ((out, weights), (go, gw)) if weights_used else ((out,), (go,))
    want = autograd_grads(outs, grads, [x, experts, w, b])
    got = pt_softmax_gate_backward(go, gw if weights_used else 0.0, x.detach(), experts.detach(), w.detach(),
                                   b.detach(), mask)
    check_all(got, want, ["x", "experts", "weight", "bias"])


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_mix_backward(masked):
    gen = torch.Generator().manual_seed(5)
    B, K, h = 9, 3, 5
    mask = torch.tensor([True, False, True]) if masked else None
    logits, experts = _leaves(_randn(B, K, gen=gen), _randn(B, K, h, gen=gen))
    out, weights = pt_softmax_mix(logits, experts, mask)
    go, gw = _randn(B, h, gen=gen), _randn(B, K, gen=gen)
    want = autograd_grads((out, weights), (go, gw), [logits, experts])
    got = pt_softmax_mix_backward(go, gw, experts.detach(), weights.detach())
    check_all(got, want, ["logits", "experts"])


@pytest.mark.parametrize("mode,psw,padding", [("sum", False, None), ("mean", False, None), ("sum", True, None),
                                              ("mean", True, -1), ("max", False, None)])
def test_touched_row_grads(mode, psw, padding):
    """The embedding bag's weight gradient restricted to the rows a batch touched (the fused
    optimizers' backward) against autograd of the twin's forward: equal on those rows, and
    every other row's autograd gradient is zero."""
    gen = torch.Generator().manual_seed(6)
    sizes, B, d = (7, 3, 11), 5, 6
    toff = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    lengths = torch.randint(0, 4, (len(sizes) * B,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    table = torch.arange(len(sizes)).repeat_interleave(B).repeat_interleave(lengths)
    ids = (torch.rand(int(lengths.sum()), generator=gen) * torch.tensor(sizes)[table]).long()
    if padding is not None:
        ids[::4] = padding
    weight = _randn(int(toff[-1]) + 2, d, gen=gen).requires_grad_()  # 2 rows past the last table
    psw_t = torch.rand(ids.shape[0], generator=gen) if psw else None
    out = pt_embedding_bag(weight, toff, ids, offsets, mode, psw_t, padding)
    go = _randn(*out.shape, gen=gen)
    (want,) = autograd_grads(out, go, [weight])
    rows, grads = pt_touched_row_grads(go, weight.detach(), toff, ids, offsets, mode, psw_t, padding)
    assert rows.numel() and torch.equal(rows, rows.unique())
    assert_close(grads, want[rows], "touched rows")
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(want[others], torch.zeros_like(want[others])), "autograd has gradient on an untouched row"
