"""The caching CPU allocator (dtn_kernels.cpu_allocator, csrc/cpu/caching_allocator.cpp).

The layout tests run in a fresh interpreter each (the pool is process-wide and the trainer enables it
in this one): best-fit reuse, merging of free neighbours, tensors that keep their data whatever is
allocated and freed around them, threads, fork, the profiler's view, empty_cache's effect on RSS,
and a training run that is bit-identical under either allocator.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dtn_kernels import HAS_C_EXT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not HAS_C_EXT, reason="needs dtn_kernels' compiled extension")

PRELUDE = """
import os, sys, threading
import torch
from dtn_kernels import cpu_allocator as A
KB, MB = 1 << 10, 1 << 20
def f32(nbytes):  # a float32 tensor of nbytes
    return torch.empty(nbytes // 4)
"""


def run(body: str, timeout: int = 300) -> str:
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pool_serves_its_sizes_and_reuses_the_best_fit():
    run("""
    assert not A.enabled() and A.enable() and A.enabled() and not A.enable()
    s0 = A.stats()
    small, big = f32(16 * KB), f32(80 * MB)  # outside the pool's sizes: c10::alloc_cpu
    assert A.stats()["pool_allocs"] == s0["pool_allocs"] and A.stats()["system_allocs"] == s0["system_allocs"] + 2
    a = f32(1 * MB)
    b = f32(3 * MB)  # carved right after a
    c = f32(1 * MB)
    assert b.data_ptr() == a.data_ptr() + MB and c.data_ptr() == b.data_ptr() + 3 * MB
    assert A.stats()["allocated"] == 5 * MB and A.stats()["segments"] == 1
    pb = b.data_ptr()
    del b
    d = f32(1 * MB + 100)  # the smallest free block that fits is b's hole, not the segment's tail
    assert d.data_ptr() == pb
    assert A.stats()["allocated"] == 3 * MB + 4 * KB  # a, c and d (rounded up to 4 KiB)
    empty = torch.empty(0)  # no bytes: nothing to allocate or free
    del empty
    assert A._check()
    """)


def test_freed_neighbours_merge():
    run("""
    A.enable()
    a, b, c, guard = f32(1 * MB), f32(1 * MB), f32(1 * MB), f32(1 * MB)
    pa = a.data_ptr()
    del a, c
    assert A._check()
    del b  # a, b and c are one free block of 3 MB again
    assert A._check()
    d = f32(3 * MB)
    assert d.data_ptr() == pa
    del d, guard
    st = A.stats()
    assert st["allocated"] == 0 and st["free"] == st["mapped"] and st["largest_free"] == st["mapped"]
    """)


def test_tensors_keep_their_data_under_random_allocation_and_free():
    """Every live tensor holds its own pattern after thousands of random allocations and frees of
    sizes on both sides of the pool's limits; the block map stays consistent and the accounting exact."""
    run("""
    import random
    A.enable()
    rng = random.Random(0)
    sizes = [4 * KB, 60 * KB, 64 * KB, 100 * KB, 256 * KB + 12, 1 * MB, 3 * MB + 4, 7 * MB, 70 * MB]
    live = {}
    for it in range(3000):
        if live and (rng.random() < 0.45 or len(live) > 40):
            k = rng.choice(list(live))
            t, v = live.pop(k)
            assert bool((t == v).all()), (it, k, t.numel())
        else:
            n = rng.choice(sizes) // 4
            t = torch.full((n,), float(it))
            live[it] = (t, float(it))
        del t  # only `live` holds tensors at the checks
        if it % 250 == 0:
            assert A._check(), it
            pooled = sum(-(-t.numel() * 4 // 4096) * 4096 for t, _ in live.values() if 64 * KB <= t.numel() * 4 <= 64 * MB)
            assert A.stats()["allocated"] == pooled, it
    for t, v in live.values():
        assert bool((t == v).all())
    del t
    live.clear()
    assert A._check() and A.stats()["allocated"] == 0
    print(A.stats()["segments"])
    """)


def test_threads_allocate_and_free_concurrently():
    run("""
    A.enable()
    errors = []
    def work(seed):
        try:
            for i in range(300):
                t = torch.full(((64 + (seed * 37 + i * 13) % 2000) * KB // 4,), float(seed))
                u = t * 2  # an op's output: also from the pool
                assert bool((u == 2 * seed).all()) and bool((t == seed).all())
        except Exception as e:  # reported by the main thread
            errors.append(repr(e))
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert A._check() and A.stats()["allocated"] == 0
    """)


def test_fork_child_uses_its_copy_of_the_pool():
    """Forked while three threads allocate and free: the pool's mutex is taken around the fork, so the
    child's copy is consistent and usable (without the atfork handlers the child can inherit a held lock
    or a half-updated block map)."""
    run("""
    A.enable()
    keep = torch.full((1 * MB // 4,), 7.0)
    stop = threading.Event()
    def churn(seed):
        while not stop.is_set():
            t = torch.full(((64 + seed * 300) * KB // 4,), 1.0)
            del t
    threads = [threading.Thread(target=churn, args=(s,)) for s in range(3)]
    [t.start() for t in threads]
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            ok = bool((keep == 7).all()) and A._check()
            t = f32(2 * MB).fill_(1)
            del t
            os._exit(0 if ok and A._check() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    stop.set()
    [t.join() for t in threads]
    pid = os.fork()
    if pid == 0:
        ok = bool((keep == 7).all())
        t = f32(2 * MB).fill_(1)
        del t
        os._exit(0 if ok and A._check() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert bool((keep == 7).all()) and A._check()
    """)


def test_disable_passes_requests_on_and_old_tensors_still_free():
    run("""
    A.enable()
    a = f32(1 * MB)
    assert A.disable() and not A.enabled() and not A.disable()
    n = A.stats()["pool_allocs"]
    b = f32(1 * MB)  # torch's allocator again
    assert A.stats()["pool_allocs"] == n
    del a  # made by the pool: returns to it
    assert A.stats()["allocated"] == 0 and A._check()
    with A.caching():
        c = f32(1 * MB)
        assert A.enabled()
    assert not A.enabled() and A.stats()["pool_allocs"] == n + 1
    """)


def test_pointers_return_to_their_maker_across_enable_and_disable():
    """oneDNN frees through whichever CPU allocator torch holds at the time, not the tensor's: a pointer
    made before the pool was installed, or by the pool before it stopped serving, still reaches its maker;
    many enable/disable cycles keep working."""
    run("""
    import warnings
    if torch.backends.mkldnn.is_available():
        x = torch.randn(1 << 20).to_mkldnn()  # torch's allocator, before the pool is installed
        A.enable()
        del x  # freed through the pool's raw deleter: handed back to torch's
        y = torch.randn(1 << 18).to_mkldnn()  # 1 MiB: a pool block
        A.disable()
        del y  # freed while the pool does not serve: still returns to the pool
        assert A.stats()["allocated"] == 0 and A._check()
    for i in range(600):
        with A.caching():
            t = f32(1 * MB)
        assert not A.enabled()
        del t
    A.enable()
    assert A.enabled() and A.stats()["allocated"] == 0 and A._check()
    print(torch.backends.mkldnn.is_available())
    """)


def test_profiler_sees_pool_allocations_and_frees():
    run("""
    from torch.profiler import profile, ProfilerActivity
    A.enable()
    x = torch.ones(1 * MB // 4)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = x * 2   # 1 MB from the pool
        z = torch.ones(8 * KB // 4) + 1  # 8 KB outside it
        del y, z
    mem = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage]
    assert 1 * MB in mem and -(1 * MB) in mem, mem  # the pool's block, its free
    assert 8 * KB in mem and -(8 * KB) in mem, mem  # c10::alloc_cpu's
    """)


def test_empty_cache_returns_free_pages_to_the_system():
    run("""
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    A.enable()
    ts = [torch.full((1 * MB // 4 + 300,), float(i)) for i in range(128)]  # written: resident (not page multiples)
    before = rss()
    keep = ts[1::2]  # every other one stays alive, between freed ones
    del ts
    assert rss() > before - 16 * MB  # freed blocks stay resident (the next step reuses them)
    released = A.empty_cache()
    assert released >= 60 * MB
    assert rss() < before - 48 * MB
    for i, t in enumerate(keep):  # the live neighbours lost nothing
        assert bool((t == 2 * i + 1).all()), i
    del keep
    again = torch.ones(64 * MB // 4)  # the pages come back, zero-filled then written
    assert bool((again == 1).all()) and A._check()
    """)


@pytest.mark.parametrize("model", ["mmoe", "dtn"])
def test_training_is_bit_identical_under_either_allocator(tmp_path, model):
    """The same seeded steps of a small model: the trainer's caching allocator (the default) and torch's
    own give the same weights bit for bit (no computation reads memory it did not write)."""
    body = """
    import dataclasses
    from dtn.config import load_config
    from dtn.features import FeatureBatch, FeatureSpec, Schema
    from dtn.models import build_model
    from dtn.train import Trainer
    from dtn.train.host_sync import EpochStats
    torch.manual_seed(0)
    B, F = 512, 10
    schema = Schema([FeatureSpec(f"c{{i}}", cardinality=5000) for i in range(F)] + [FeatureSpec("x", kind="numeric")],
                    labels=["t1", "t2"])
    cfg = load_config("cpu")
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, embed_dim=16),
                      train=dataclasses.replace(cfg.train, cpu_allocator={alloc!r}, num_threads=1, progress=False))
    model = build_model({model!r}, schema, cfg.model)
    trainer = Trainer(model, cfg)
    assert A.enabled() == ({alloc!r} == "caching")
    stats = EpochStats(trainer.device, 2)
    for i in range(4):
        batch = FeatureBatch(torch.randint(0, 5000, (B, F)), torch.randn(B, 1))
        trainer.train_step(batch, torch.randint(0, 2, (B, 2)).float(), i, stats)
    assert A.enabled() == ({alloc!r} == "caching")
    if A.enabled():
        assert A.stats()["pool_allocs"] > 100  # the step's buffers came from the pool
    torch.save(model.state_dict(), {out!r})
    """
    outs = {}
    for alloc in ("caching", "system"):
        out = str(tmp_path / f"{alloc}.pt")
        run(body.format(alloc=alloc, out=out, model=model))
        outs[alloc] = torch.load(out)
    flat = {}
    for alloc, sd in outs.items():  # the fused optimizer's state is a dict of tensors
        flat[alloc] = {f"{k}.{j}": v for k, x in sd.items() for j, v in (x.items() if isinstance(x, dict) else [("", x)])}
    outs = flat
    a, b = outs["caching"], outs["system"]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_cpu_allocator_applies_only_to_cpu_training():
    from dtn.config import ConfigError, load_config
    from dtn.request_check import check_applicable

    cfg = load_config("cpu")
    cfg = cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "device": "cuda"}))
    with pytest.raises(ConfigError, match="train.cpu_allocator applies only where train.device is 'cpu'"):
        check_applicable(cfg, {"train.cpu_allocator": "--set train.cpu_allocator=system"})
    with pytest.raises(ConfigError, match="cpu_allocator"):
        load_config("cpu").replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "cpu_allocator": "jemalloc"}))
