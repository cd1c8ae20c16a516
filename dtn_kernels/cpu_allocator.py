"""A caching CPU allocator for training steps (the compiled extension's; csrc/cpu/caching_allocator.cpp).

A training step allocates and frees the same buffers every step: activations, their gradients,
optimizer temporaries. glibc serves them from a heap shared with small long-lived objects, where
they spread over about twice the memory they need at once, and that spread stays resident. With
this allocator, tensors of 64 KiB to 64 MiB are carved from large anonymous mappings with
best-fit placement; a freed block merges with its free neighbours and is reused by the next step.
A step's resident memory is then close to the most it holds at once, it does not creep from step
to step, and the step faults no pages in after the first ones. Smaller and larger tensors go to
torch's usual ``c10::alloc_cpu`` (larger ones are long-lived: embedding tables).

Measured on the MMoE training step with 26 x 10^6-row tables, rowwise_adagrad, B = 2048, 1 thread
(benchmarks/results/embedding_scale_cpu.md): peak memory 1.084x the weights, the same every round,
against 1.097 to 1.101x with glibc's heap (the step's buffers: 26 MB at most at once, spread by glibc
over ~55 MB), and the step 59 against 67 ms.

It is process-wide, like any torch allocator: the first ``enable()`` installs it as torch's CPU
allocator, in front of the one in place, for the rest of the process; from then on ``enable()`` /
``disable()`` switch whether the pool serves the sizes above or hands every request to the allocator
it replaced. Whatever is switched, a pointer always returns to the allocator that made it (oneDNN, for
one, frees through whichever allocator torch looks up at that moment, not the tensor's). The trainer
enables it when it trains on the CPU (``train.cpu_allocator: caching``, the default; ``system`` leaves
torch's allocator). Pool blocks are not touched by c10's zero/junk-fill debug flags.

Freed blocks stay mapped and resident until reused; ``empty_cache()`` returns their pages to the
system (the next use faults them in again).
"""
from __future__ import annotations

from contextlib import contextmanager

from . import HAS_C_EXT

__all__ = ["available", "enable", "disable", "enabled", "empty_cache", "stats", "reset_peak", "caching"]


def _c():
    if not available():
        from . import C_EXT_ERROR

        why = C_EXT_ERROR or ("dtn_kernels._C was not built" if not HAS_C_EXT else "dtn_kernels._C predates it: rebuild")
        raise RuntimeError(f"the caching CPU allocator needs dtn_kernels' compiled extension: {why}")
    from . import _C  # type: ignore[attr-defined]

    return _C


def available() -> bool:
    """Whether the compiled extension is here and has the allocator (a build older than it has not)."""
    if not HAS_C_EXT:
        return False
    from . import _C  # type: ignore[attr-defined]

    return hasattr(_C, "_cpu_allocator_enable")


def enable() -> bool:
    """The pool serves CPU tensors of 64 KiB to 64 MiB (installed as torch's CPU allocator the first
    time). Returns False if it already did. Raises if another library holds torch's CPU allocator at a
    higher priority."""
    return _c()._cpu_allocator_enable()


def disable() -> bool:
    """Every request goes to the allocator the pool replaced (pool blocks still return to the pool when
    freed). Returns False if the pool was not serving."""
    return _c()._cpu_allocator_disable()


def enabled() -> bool:
    return available() and _c()._cpu_allocator_enabled()


def empty_cache() -> int:
    """Give the pages of every free pool block back to the system; returns the bytes released."""
    return _c()._cpu_allocator_empty_cache()


def stats() -> dict:
    """``allocated`` (live pool bytes), ``peak_allocated`` (since ``reset_peak``), ``free``,
    ``largest_free``, ``mapped`` (virtual bytes), ``segments``, ``pool_allocs``, ``system_allocs``."""
    return _c()._cpu_allocator_stats()


def reset_peak() -> None:
    _c()._cpu_allocator_reset_peak()


def _check() -> bool:
    """The pool's block map is consistent (tests)."""
    return _c()._cpu_allocator_check()


@contextmanager
def caching():
    """``with caching(): ...`` -- the pool is the CPU allocator inside the block (restored after if
    this call enabled it)."""
    turned_on = enable()
    try:
        yield
    finally:
        if turned_on:
            disable()
