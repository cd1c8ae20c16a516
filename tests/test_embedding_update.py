"""Fused sparse embedding optimizers (dtn::embedding_bag_backward_update, dtn::embedding_rows_update).

The compiled op against its pure-PyTorch twin (touched rows to a tight tolerance; untouched rows and
state bit for bit), the twin and the op against independent dense references (torch.optim.SGD,
torch.optim.Adam, a hand-written dense row-wise Adagrad on the dense gradient of
dtn_kernels.ops.embedding_bag) over several steps, duplicates and a hot row, empty batches, errors,
determinism, embedding_rows_update against the fused op, and torch.library.opcheck. The compiled
tests skip with the reason when dtn_kernels._C lacks the ops; the CUDA ones without a GPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dtn_kernels
from dtn_kernels.ops import embedding_bag
from dtn_kernels.ops import embedding_update as eu
from dtn_kernels.reference.pt_embedding_update import (OPTIMIZERS, pt_embedding_bag_backward_update,
                                                       pt_embedding_rows_update, pt_touched_row_grads)

HAS_OP = dtn_kernels.HAS_C_EXT and hasattr(torch.ops.dtn, "embedding_bag_backward_update")
requires_op = pytest.mark.skipif(not HAS_OP, reason="dtn_kernels._C is not built with the fused optimizer ops")
requires_cuda = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available() and dtn_kernels.HAS_CUDA_EXT),
    reason="needs a CUDA device and dtn_kernels._C built with CUDA",
)
HP = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0, step=1, grad_scale=1.0)


# ----------------------------------------------------------------------------- data


def make_batch(sizes, B, d, *, lengths=(1, 1), seed=0, index_dtype=torch.int64, dtype=torch.float32, psw=False,
               pad=None, pad_frac=0.0, hot=None, device="cpu"):
    """Tables of ``sizes`` rows stacked in one weight; bag lengths uniform in ``lengths`` (inclusive);
    ``pad_frac`` of the ids replaced by ``pad``; ``hot``: every id of every table is that local id."""
    g = torch.Generator().manual_seed(seed)
    T = len(sizes)
    toff = torch.tensor([0] + list(sizes)).cumsum(0)
    lens = torch.randint(lengths[0], lengths[1] + 1, (T * B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    table_of = torch.arange(T).repeat_interleave(B).repeat_interleave(lens)
    rows = torch.tensor(sizes)[table_of]
    ids = (torch.rand(int(offsets[-1]), generator=g) * rows).long()
    if hot is not None:
        ids = torch.full_like(ids, hot)
    if pad is not None and pad_frac > 0:
        ids = torch.where(torch.rand(ids.shape, generator=g) < pad_frac, torch.full_like(ids, pad), ids)
    weight = (torch.randn(int(toff[-1]), d, generator=g) * 0.5).to(dtype)
    grad_out = torch.randn(B, T * d, generator=g).to(dtype)
    w = (torch.rand(ids.shape[0], generator=g) + 0.5).to(dtype) if psw else None
    out = [weight, toff, ids.to(index_dtype), offsets.to(index_dtype), grad_out, w]
    return [x.to(device) if x is not None else None for x in out]


def new_state(optimizer, weight, fill=0.0):
    s1, s2 = eu.state_shapes(optimizer, *weight.shape)
    return (torch.full(s1, fill, device=weight.device), torch.full(s2, fill, device=weight.device))


def touched_mask(toff, ids, offsets, R, pad=None):
    T = toff.numel() - 1
    B = (offsets.numel() - 1) // T
    lens = offsets.long().diff()
    table_of = torch.arange(T, device=ids.device).repeat_interleave(B).repeat_interleave(lens)
    lo = int(offsets[0])
    local = ids.long()[lo: lo + table_of.numel()]
    keep = local != pad if pad is not None else torch.ones_like(local, dtype=torch.bool)
    mask = torch.zeros(R, dtype=torch.bool, device=ids.device)
    mask[(local + toff[table_of])[keep]] = True
    return mask


def step_both(optimizer, batch, mode="sum", pad=None, hp=HP, state_fill=0.0, op=None):
    """One step of the compiled op (``op``, default the CPU/CUDA op) and of the twin from the same
    state; returns ((weight, s1, s2) of the op, of the twin, the touched-row mask)."""
    weight, toff, ids, offs, go, psw = batch
    op = op or torch.ops.dtn.embedding_bag_backward_update
    w_op, w_tw = weight.clone(), weight.clone()
    st_op, st_tw = new_state(optimizer, weight, state_fill), new_state(optimizer, weight, state_fill)
    if state_fill:  # different per-element state, so untouched rows would show any write
        for a, b in zip(st_op, st_tw):
            a.copy_(torch.rand(a.shape, generator=torch.Generator().manual_seed(3)) * state_fill)
            b.copy_(a)
    args = (toff, ids, offs, mode, psw, pad, optimizer)
    op(go, w_op, *args, *st_op, *[float(v) if k != "step" else int(v) for k, v in hp.items()])
    pt_embedding_bag_backward_update(go, w_tw, *args, *st_tw, **hp)
    return (w_op, *st_op), (w_tw, *st_tw), touched_mask(toff, ids, offs, weight.shape[0], pad)


def assert_matches(got, want, mask, weight_before, state_before=None, bf16=False):
    w_op, s1_op, s2_op = got
    w_tw, s1_tw, s2_tw = want
    # untouched rows: bit for bit as before
    assert torch.equal(w_op[~mask], weight_before[~mask])
    assert torch.equal(w_tw[~mask], weight_before[~mask])
    for a, b in ((s1_op, s1_tw), (s2_op, s2_tw)):
        if a.numel():
            assert torch.equal(a[~mask], b[~mask])
            if state_before is not None:
                assert torch.equal(a[~mask], state_before[~mask])
            torch.testing.assert_close(a[mask], b[mask], rtol=2e-6, atol=1e-7)
    tol = dict(rtol=8e-3, atol=1e-6) if bf16 else dict(rtol=2e-6, atol=1e-7)  # bf16: one rounding step apart
    torch.testing.assert_close(w_op[mask].float(), w_tw[mask].float(), **tol)
    assert mask.any()


CASES = {
    # name: (make_batch kwargs, mode, padding_idx)
    "sum-one-id": (dict(sizes=[7, 5000, 3], B=64), "sum", None),
    "sum-multi": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5)), "sum", None),
    "mean": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5)), "mean", None),
    "mean-one-id": (dict(sizes=[9, 6000], B=40), "mean", None),
    "psw-sum": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5), psw=True), "sum", None),
    "psw-mean": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5), psw=True), "mean", None),
    "padding": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5), pad=-1, pad_frac=0.3), "mean", -1),
    "padding-in-range": (dict(sizes=[7, 3000, 40], B=48, lengths=(1, 4), pad=2, pad_frac=0.2), "sum", 2),
    "int32": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5), index_dtype=torch.int32), "sum", None),
    "max": (dict(sizes=[7, 3000, 40], B=48, lengths=(0, 5)), "max", None),
    "odd-dim": (dict(sizes=[7, 3000], B=32, lengths=(0, 3), d=5), "mean", None),
}


@requires_op
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_op_matches_twin(optimizer, case):
    kw, mode, pad = CASES[case]
    kw = {"d": 16, **kw}
    batch = make_batch(**kw)
    hp = dict(HP, weight_decay=0.01, grad_scale=0.5, step=3)
    got, want, mask = step_both(optimizer, batch, mode, pad, hp, state_fill=0.1)
    assert_matches(got, want, mask, batch[0])


@requires_op
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_matches_twin_low_precision(optimizer, dtype):
    batch = make_batch([7, 3000, 40], B=48, d=16, lengths=(0, 5), dtype=dtype, psw=True)
    got, want, mask = step_both(optimizer, batch, "mean", None, dict(HP, weight_decay=0.01))
    assert got[0].dtype == dtype and got[1].dtype in (torch.float32,)
    assert_matches(got, want, mask, batch[0], bf16=True)


@requires_op
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bit_exact_against_the_twin(optimizer):
    """The op follows the twin operation by operation: sgd is bit-exact, lazy_adam's moments too (its
    weights are not: torch's CPU sqrt is not correctly rounded, the op's is), rowwise_adagrad's state
    is not (torch sums a row's g*g in another order); those are checked to a few ulps elsewhere."""
    batch = make_batch([7, 5000, 40], B=64, d=16, lengths=(0, 4))
    got, want, mask = step_both(optimizer, batch, "sum", None, dict(HP, weight_decay=0.01, step=2))
    if optimizer == "sgd":
        assert torch.equal(got[0], want[0])
    if optimizer == "lazy_adam":
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


@requires_op
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_hot_row_and_duplicates(optimizer):
    """Every id of every table is the same row (2048 times), and a small table with many duplicates."""
    for hot in (0, 4):
        batch = make_batch([5, 9000], B=2048, d=16, lengths=(1, 2), hot=hot)
        got, want, mask = step_both(optimizer, batch, "sum", None)
        assert int(mask.sum()) == 2
        assert_matches(got, want, mask, batch[0])
    batch = make_batch([3, 9000], B=512, d=8, lengths=(1, 6), seed=1)
    got, want, mask = step_both(optimizer, batch, "mean", None)
    assert_matches(got, want, mask, batch[0])


@pytest.mark.parametrize("impl", ["twin"] + (["op"] if HAS_OP else []))
@pytest.mark.parametrize("batch_kind", ["no-bags", "all-padding", "empty-bags"])
def test_empty_batch_changes_nothing(impl, batch_kind):
    weight = torch.randn(12, 4)
    toff = torch.tensor([0, 5, 12])
    if batch_kind == "no-bags":
        ids, offs, go = torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(0, 8)
    elif batch_kind == "all-padding":
        ids, offs, go = torch.full((6,), -1), torch.tensor([0, 1, 2, 3, 6]), torch.randn(2, 8)
    else:
        ids, offs, go = torch.zeros(0, dtype=torch.long), torch.zeros(5, dtype=torch.long), torch.randn(2, 8)
    fn = torch.ops.dtn.embedding_bag_backward_update if impl == "op" else pt_embedding_bag_backward_update
    for optimizer in OPTIMIZERS:
        w = weight.clone()
        s1, s2 = new_state(optimizer, w, 0.5)
        fn(go, w, toff, ids, offs, "sum", None, -1, optimizer, s1, s2, 0.1, 0.9, 0.999, 1e-8, 0.1, 1, 1.0)
        assert torch.equal(w, weight)
        assert torch.all(s1 == 0.5) and torch.all(s2 == 0.5)


# ----------------------------------------------------------------------------- dense references


def dense_grad(weight, toff, ids, offs, go, mode, psw, pad):
    w = weight.detach().clone().requires_grad_(True)
    embedding_bag(w, toff, ids, offs, mode, psw, pad).backward(go)
    return w.grad


@pytest.mark.parametrize("impl", ["twin"] + (["op"] if HAS_OP else []))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mode,psw", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
def test_against_dense_reference(impl, optimizer, mode, psw, weight_decay):
    """Four steps with the same ids (so the same rows are touched every step, where lazy and dense Adam
    agree) and a new upstream gradient each step, against torch.optim.SGD / torch.optim.Adam / a dense
    row-wise Adagrad on the dense gradient of the embedding bag, compared on the touched rows; the
    untouched rows must not move (the dense optimizers move them only through weight decay)."""
    weight, toff, ids, offs, _, w_ps = make_batch([6, 2000, 50], B=32, d=8, lengths=(0, 4), psw=psw, seed=2)
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-6
    fused = weight.clone()
    s1, s2 = new_state(optimizer, fused)
    ref = torch.nn.Parameter(weight.clone())
    if optimizer == "sgd":
        opt = torch.optim.SGD([ref], lr=lr, weight_decay=weight_decay, foreach=False)
    elif optimizer == "lazy_adam":
        opt = torch.optim.Adam([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, foreach=False)
    acc = torch.zeros(weight.shape[0])  # the dense row-wise Adagrad's state
    mask = touched_mask(toff, ids, offs, weight.shape[0])
    fn = torch.ops.dtn.embedding_bag_backward_update if impl == "op" else pt_embedding_bag_backward_update
    for step in range(1, 5):
        go = torch.randn(32, 3 * 8, generator=torch.Generator().manual_seed(10 + step))
        fn(go, fused, toff, ids, offs, mode, w_ps, None, optimizer, s1, s2, lr, b1, b2, eps, weight_decay, step, 1.0)
        g = dense_grad(ref.detach(), toff, ids, offs, go, mode, w_ps, None)
        if optimizer == "rowwise_adagrad":
            with torch.no_grad():
                g = g + weight_decay * ref
                acc += (g * g).mean(1)
                ref -= lr * g / (acc.sqrt() + eps)[:, None]
        else:
            ref.grad = g
            opt.step()
        torch.testing.assert_close(fused[mask], ref.detach()[mask], rtol=1e-5, atol=1e-6)
        assert torch.equal(fused[~mask], weight[~mask])
        if weight_decay == 0:
            torch.testing.assert_close(fused, ref.detach(), rtol=1e-5, atol=1e-6)
        if optimizer == "rowwise_adagrad":
            torch.testing.assert_close(s1[mask], acc[mask], rtol=1e-5, atol=1e-7)
        if optimizer == "lazy_adam":
            st = opt.state[ref]
            torch.testing.assert_close(s1[mask], st["exp_avg"][mask], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s2[mask], st["exp_avg_sq"][mask], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- errors, determinism


@pytest.mark.parametrize("impl", ["twin"] + (["op"] if HAS_OP else []))
def test_bad_id_names_table_and_id_and_changes_nothing(impl):
    weight, toff, ids, offs, go, _ = make_batch([5, 3000, 4], B=8, d=4, lengths=(1, 3))
    T, B = 3, 8
    k = 2 * B + 3  # table 2, bag 3
    ids = ids.clone()
    ids[int(offs[k])] = 7
    w = weight.clone()
    fn = torch.ops.dtn.embedding_bag_backward_update if impl == "op" else pt_embedding_bag_backward_update
    s1, s2 = new_state("rowwise_adagrad", w)
    with pytest.raises(RuntimeError, match=r"table 2: id 7 at indices\[\d+\] \(bag 3\) is outside the table's rows \[0, 4\)"):
        fn(go, w, toff, ids, offs, "sum", None, None, "rowwise_adagrad", s1, s2, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, 1.0)
    assert torch.equal(w, weight) and torch.all(s1 == 0)


@requires_op
def test_bad_offsets_and_big_table_bad_id():
    weight, toff, ids, offs, go, _ = make_batch([5, 3000], B=8, d=4, lengths=(1, 3))
    op = torch.ops.dtn.embedding_bag_backward_update
    bad = offs.clone()
    bad[5] = bad[4] - 1
    with pytest.raises(RuntimeError, match="table 0: offsets decrease at bag 4"):
        op(go, weight.clone(), toff, ids, bad, "sum", None, None, "sgd", *new_state("sgd", weight), 0.1, 0.9, 0.999,
           1e-8, 0.0, 1, 1.0)
    bad_ids = ids.clone()
    bad_ids[int(offs[8 + 2])] = -5  # table 1 (the sorted path), bag 2
    with pytest.raises(RuntimeError, match=r"table 1: id -5 at indices\[\d+\] \(bag 2\)"):
        op(go, weight.clone(), toff, bad_ids, offs, "sum", None, None, "sgd", *new_state("sgd", weight), 0.1, 0.9,
           0.999, 1e-8, 0.0, 1, 1.0)


@pytest.mark.parametrize("impl", ["twin"] + (["op"] if HAS_OP else []))
def test_wrong_state_shapes(impl):
    weight, toff, ids, offs, go, _ = make_batch([5, 30], B=4, d=4)
    fn = torch.ops.dtn.embedding_bag_backward_update if impl == "op" else pt_embedding_bag_backward_update
    rfn = torch.ops.dtn.embedding_rows_update if impl == "op" else pt_embedding_rows_update
    empty = torch.zeros(0)
    R = weight.shape[0]
    for optimizer, s1, s2, what in [("rowwise_adagrad", empty, empty, r"rowwise_adagrad needs state1 of shape \[35\]"),
                                    ("lazy_adam", torch.zeros(R, 4), torch.zeros(R), "lazy_adam needs state2 of shape"),
                                    ("lazy_adam", torch.zeros(R, 4, dtype=torch.float64), torch.zeros(R, 4),
                                     "needs state1 of shape"),
                                    ("sgd", torch.zeros(R), empty, r"sgd needs state1 of shape \[0\]")]:
        with pytest.raises(RuntimeError, match=what):
            fn(go, weight.clone(), toff, ids, offs, "sum", None, None, optimizer, s1, s2, 0.1, 0.9, 0.999, 1e-8, 0.0,
               1, 1.0)
        with pytest.raises(RuntimeError, match=what):
            rfn(weight.clone(), s1, s2, torch.tensor([1]), torch.ones(1, 4), optimizer, 0.1, 0.9, 0.999, 1e-8, 0.0, 1,
                1.0)
    with pytest.raises(RuntimeError, match="optimizer must be one of"):
        fn(go, weight.clone(), toff, ids, offs, "sum", None, None, "adam", empty, empty, 0.1, 0.9, 0.999, 1e-8, 0.0,
           1, 1.0)
    with pytest.raises(RuntimeError, match="lazy_adam needs step >= 1"):
        fn(go, weight.clone(), toff, ids, offs, "sum", None, None, "lazy_adam", *new_state("lazy_adam", weight), 0.1,
           0.9, 0.999, 1e-8, 0.0, 0, 1.0)


@requires_op
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_deterministic_across_runs_and_threads(optimizer):
    batch = make_batch([7, 5000, 40, 20000], B=256, d=16, lengths=(0, 6), psw=True, seed=4)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            got, _, _ = step_both(optimizer, batch, "mean", None, dict(HP, weight_decay=0.01))
            results.append(got)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- embedding_rows_update


@pytest.mark.parametrize("impl", ["twin"] + (["op"] if HAS_OP else []))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_rows_update_with_repeated_rows_equals_fused(impl, optimizer):
    """One id per bag, sum: the fused op's gradient of an id is its grad_output slice, so the update
    from (global row of every id, its slice) in input order must be the fused op's, bit for bit."""
    weight, toff, ids, offs, go, _ = make_batch([6, 4000, 30], B=64, d=8, seed=5)
    T, B, d = 3, 64, 8
    rows = ids.long() + toff[:-1].repeat_interleave(B)
    slices = go.view(B, T, d).transpose(0, 1).reshape(T * B, d)
    hp = dict(HP, weight_decay=0.01, step=2)
    w_rows, w_fused = weight.clone(), weight.clone()
    st_rows, st_fused = new_state(optimizer, weight, 0.0), new_state(optimizer, weight, 0.0)
    rfn = torch.ops.dtn.embedding_rows_update if impl == "op" else pt_embedding_rows_update
    fn = torch.ops.dtn.embedding_bag_backward_update if impl == "op" else pt_embedding_bag_backward_update
    rfn(w_rows, *st_rows, rows, slices, optimizer, *hp.values())
    fn(go, w_fused, toff, ids, offs, "sum", None, None, optimizer, *st_fused, *hp.values())
    assert torch.equal(w_rows, w_fused)
    for a, b in zip(st_rows, st_fused):
        assert torch.equal(a, b)


@requires_op
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_rows_update_op_matches_twin(optimizer):
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(500, 12, generator=g)
    rows = torch.randint(0, 500, (900,), generator=g)
    rows[:50] = 7  # a hot row
    grads = torch.randn(900, 12, generator=g)
    hp = dict(HP, weight_decay=0.01, step=4, grad_scale=0.25)
    w_op, w_tw = weight.clone(), weight.clone()
    st_op, st_tw = new_state(optimizer, weight, 0.0), new_state(optimizer, weight, 0.0)
    torch.ops.dtn.embedding_rows_update(w_op, *st_op, rows.int(), grads, optimizer, *hp.values())
    pt_embedding_rows_update(w_tw, *st_tw, rows, grads, optimizer, *hp.values())
    mask = torch.zeros(500, dtype=torch.bool)
    mask[rows] = True
    assert_matches((w_op, *st_op), (w_tw, *st_tw), mask, weight)
    with pytest.raises(RuntimeError, match=r"row 500 is outside weight's rows \[0, 500\)"):
        torch.ops.dtn.embedding_rows_update(w_op, *st_op, torch.tensor([3, 500]), grads[:2], optimizer, *hp.values())


# ----------------------------------------------------------------------------- registration


@requires_op
def test_opcheck():
    weight, toff, ids, offs, go, psw = make_batch([5, 300, 8], B=4, d=4, lengths=(0, 3), psw=True)
    for optimizer in OPTIMIZERS:
        s1, s2 = new_state(optimizer, weight)
        torch.library.opcheck(torch.ops.dtn.embedding_bag_backward_update.default,
                              (go, weight.clone(), toff, ids, offs, "mean", psw, None, optimizer, s1, s2, 0.1, 0.9,
                               0.999, 1e-8, 0.01, 1, 1.0))
        s1, s2 = new_state(optimizer, weight)
        torch.library.opcheck(torch.ops.dtn.embedding_rows_update.default,
                              (weight.clone(), s1, s2, torch.tensor([1, 4, 1]), torch.randn(3, 4), optimizer, 0.1,
                               0.9, 0.999, 1e-8, 0.01, 1, 1.0))


def test_dispatcher_names_a_stale_build(monkeypatch):
    """_C loaded but compiled before the ops existed: the fallback says so, and the twin runs."""
    monkeypatch.setattr(dtn_kernels, "HAS_C_EXT", True)
    monkeypatch.setattr(eu, "_HAS_OP", {"embedding_bag_backward_update": False})
    monkeypatch.setattr(eu, "_warned_stale", set())
    weight, toff, ids, offs, go, _ = make_batch([5, 30], B=4, d=4)
    w, w_tw = weight.clone(), weight.clone()
    with pytest.warns(RuntimeWarning, match="built but has no embedding_bag_backward_update op .a stale build"):
        eu.embedding_bag_backward_update(go, w, toff, ids, offs, "sum", None, None, "sgd", torch.zeros(0),
                                         torch.zeros(0), 0.1)
    pt_embedding_bag_backward_update(go, w_tw, toff, ids, offs, "sum", None, None, "sgd", torch.zeros(0),
                                     torch.zeros(0), 0.1, 0.9, 0.999, 1e-8, 0.0, 1)
    assert torch.equal(w, w_tw)


@requires_op
def test_dispatcher_uses_the_op():
    weight, toff, ids, offs, go, _ = make_batch([5, 30], B=4, d=4)
    w = weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eu.embedding_bag_backward_update(go, w, toff, ids, offs, "sum", None, None, "sgd", torch.zeros(0),
                                         torch.zeros(0), 0.1)
    rows, grads = pt_touched_row_grads(go, weight, toff, ids, offs)
    torch.testing.assert_close(w[rows], weight[rows] - 0.1 * grads)


# ----------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", ["sum-one-id", "mean", "psw-mean", "padding", "int32", "max"])
def test_cuda_matches_twin(optimizer, case):
    kw, mode, pad = CASES[case]
    batch = make_batch(**{"d": 16, **kw}, device="cuda")
    got, want, mask = step_both(optimizer, batch, mode, pad, dict(HP, weight_decay=0.01, step=2), state_fill=0.1)
    assert_matches(got, want, mask, batch[0])


@requires_cuda
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cuda_hot_row_bf16_and_determinism(optimizer):
    batch = make_batch([5, 9000], B=4096, d=64, lengths=(1, 3), hot=3, device="cuda")
    got, want, mask = step_both(optimizer, batch, "sum", None)
    assert_matches(got, want, mask, batch[0])
    again, _, _ = step_both(optimizer, batch, "sum", None)
    for a, b in zip(got, again):
        assert torch.equal(a, b)
    batch = make_batch([7, 3000, 40], B=256, d=32, lengths=(0, 5), dtype=torch.bfloat16, psw=True, device="cuda")
    got, want, mask = step_both(optimizer, batch, "mean", None)
    assert_matches(got, want, mask, batch[0], bf16=True)


@requires_cuda
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cuda_rows_update_and_bad_id(optimizer):
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(500, 12, generator=g).cuda()
    rows = torch.randint(0, 500, (900,), generator=g).cuda()
    grads = torch.randn(900, 12, generator=g).cuda()
    w_op, w_tw = weight.clone(), weight.clone()
    st_op, st_tw = new_state(optimizer, weight), new_state(optimizer, weight)
    torch.ops.dtn.embedding_rows_update(w_op, *st_op, rows, grads, optimizer, *HP.values())
    pt_embedding_rows_update(w_tw, *st_tw, rows, grads, optimizer, *HP.values())
    mask = torch.zeros(500, dtype=torch.bool, device="cuda")
    mask[rows] = True
    assert_matches((w_op, *st_op), (w_tw, *st_tw), mask, weight)
    from dtn_kernels.ops.embedding_bag import raise_pending_errors
    wb, toff, ids, offs, go, _ = make_batch([5, 30], B=4, d=4, device="cuda")
    ids = ids.clone()
    ids[0] = 9
    torch.ops.dtn.embedding_bag_backward_update(go, wb, toff, ids, offs, "sum", None, None, optimizer,
                                                *new_state(optimizer, wb), *HP.values())
    with pytest.raises(RuntimeError, match=r"dtn::embedding_bag_backward_update: table 0: id 9 at indices\[0\]"):
        raise_pending_errors()
