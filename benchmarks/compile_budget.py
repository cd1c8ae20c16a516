"""torch.compile in the suite: the wrapper that records whether one graph held (and the graph breaks),
and the time budget (``DTN_BENCH_DEADLINE``): compile estimates from the compiles seen so far, a hard
limit on one compile's first call, and the kinds (op / model) whose compile overran."""
from __future__ import annotations

import contextlib
import os
import time

import torch

# Compile estimates (seconds) before any compile was seen in this process; afterwards 1.5x the
# slowest compile seen for that kind (op / model). A compile provider starts only if the estimate
# fits in what is left of DTN_BENCH_DEADLINE.
DEFAULT_COMPILE_S = {"op": 45.0, "model": 120.0}
# Hard limit (seconds) on one compile provider's first call (compilation): over it, the compile is
# interrupted, recorded as overrun, and no later group compiles that kind again (not retried).
# DTN_BENCH_COMPILE_LIMIT_S / DTN_BENCH_MODEL_COMPILE_LIMIT_S override.
COMPILE_LIMIT_S = {"op": 60.0, "model": 90.0}
MIN_GROUP_S = 10.0  # a group needs at least this much of the budget to start


def seconds_left() -> float:
    """Seconds until ``DTN_BENCH_DEADLINE`` (a Unix time the suite scripts set), inf without one."""
    deadline = os.environ.get("DTN_BENCH_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


_COMPILE_SEEN: dict = {}


def compile_kind(op: str) -> str:
    return "model" if op.startswith("model:") else "op"


def compile_estimate_s(op: str) -> float:
    """Seconds a compile provider's first call of ``op`` is expected to take (see DEFAULT_COMPILE_S;
    ``DTN_BENCH_COMPILE_S`` / ``DTN_BENCH_MODEL_COMPILE_S`` override the defaults)."""
    kind = compile_kind(op)
    seen = _COMPILE_SEEN.get(kind)
    if seen:
        return 1.5 * max(seen)
    env = os.environ.get("DTN_BENCH_MODEL_COMPILE_S" if kind == "model" else "DTN_BENCH_COMPILE_S")
    return float(env) if env else DEFAULT_COMPILE_S[kind]


def note_compile(op: str, seconds: float) -> None:
    _COMPILE_SEEN.setdefault(compile_kind(op), []).append(seconds)


_COMPILE_OVERRAN: dict = {}  # kind -> the limit an earlier compile of that kind overran


def compile_limit_s(op: str) -> float:
    kind = compile_kind(op)
    env = os.environ.get("DTN_BENCH_MODEL_COMPILE_LIMIT_S" if kind == "model" else "DTN_BENCH_COMPILE_LIMIT_S")
    return float(env) if env else COMPILE_LIMIT_S[kind]


def note_overrun(op: str, limit: float) -> None:
    """A compile of ``op``'s kind ran past ``limit``: no later compile of that kind is tried."""
    _COMPILE_OVERRAN[compile_kind(op)] = limit


def overrun_limit(op: str):
    """The limit an earlier compile of ``op``'s kind overran in this run, or None."""
    return _COMPILE_OVERRAN.get(compile_kind(op))


class CompileOverrun(Exception):
    """A compile provider's first call ran past its limit (raised by the timer's signal)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CompileOverrun` in this (main) thread after ``seconds``; no limit elsewhere
    (signals reach the main thread only) or without SIGALRM."""
    import signal
    import threading

    if seconds == float("inf") or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise CompileOverrun(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Compiled:
    """``torch.compile(fn, dynamic=False, fullgraph=True)``, falling back to ``fullgraph=False`` when
    the function does not trace as one graph. ``info`` (recorded with the provider's results):
    ``fullgraph`` (whether one graph held), ``graph_breaks`` (breaks counted by torch._dynamo in the
    first call) and the first break's reason."""

    def __init__(self, fn, backend: str = "inductor"):
        self.fn, self.info, self.backend = fn, {}, backend
        self._compiled = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)

    def __call__(self, *args, **kwargs):
        if self.info:
            return self._compiled(*args, **kwargs)
        import torch._dynamo
        from torch._dynamo.utils import counters

        try:
            out = self._compiled(*args, **kwargs)
            self.info.update(fullgraph=True, graph_breaks=0)
            return out
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as exc:
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        before = sum(counters["graph_break"].values())
        self._compiled = torch.compile(self.fn, dynamic=False, backend=self.backend)
        out = self._compiled(*args, **kwargs)
        self.info.update(fullgraph=False, graph_breaks=sum(counters["graph_break"].values()) - before,
                         break_reason=reason)
        return out


def compiled(fn, key: tuple, cache: dict) -> Compiled:
    """:class:`Compiled` ``fn`` (fullgraph where it traces as one graph, static shapes), once per key
    (op, provider, batch size, precision): every batch size gets its own static-shape graph, the
    strongest baseline torch.compile offers (a default compile would reuse a dynamic-shape graph
    from the second size on). The first call of each case, where compilation happens, is untimed."""
    if key not in cache:
        _raise_recompile_limit()
        cache[key] = Compiled(fn)
    return cache[key]


def _raise_recompile_limit() -> None:
    """torch.compile keeps one cache per code object: a module class's forward is shared by every
    instance, batch size and precision (static shapes: one graph each), and the default limit of 8
    would silently fall back to eager after the 8th graph. Done here, not at import: importing
    torch._dynamo imports triton, which must not happen before the Triton tests set
    TRITON_INTERPRET (tests/triton_env.py) when the suite's tests share their process."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
            break
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
