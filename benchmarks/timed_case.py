"""What is timed: a :class:`Case` (a forward whose backward may be timed, or a whole step) and the
cases of a dtn layer (:func:`module_case`: the reference module, its fused copy, their compiles)."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import dtn_kernels
from compile_budget import Compiled, compiled
from precision_policy import autocast


@dataclass
class Case:
    """One timed thing.

    ``forward()`` returns the tensor(s) whose backward is timed; it runs under the precision's
    autocast. ``params`` are reset to ``grad=None`` before every call (as
    ``zero_grad(set_to_none=True)`` does). ``step`` (optional) replaces fwd / bwd entirely, e.g. a
    whole training step, and applies the precision itself (see :func:`autocast`).
    """

    op: str
    provider: str
    mode: str
    batch: int
    forward: Optional[Callable[[], object]] = None
    params: list = field(default_factory=list)
    step: Optional[Callable[[], object]] = None
    shape: str = ""
    precision: str = "fp32"
    device_type: str = "cpu"
    env: dict = field(default_factory=dict)  # environment set around every call (e.g. DTN_FUSED_GEMM)
    # the numerics gate: ``check()`` returns {name: tensor} (forward output, gradients) of one call
    # without changing what is timed; forward cases have a default (:meth:`outputs`), ``step`` cases
    # give their own. ``compare_grads=False``: only the forward output is comparable (the embedding
    # bag's per-feature loop has other parameters than the reference).
    check: Optional[Callable[[], dict]] = None
    compare_grads: bool = True
    compiled: Optional["Compiled"] = None  # compile providers: fullgraph / graph-break record
    _grad: Optional[torch.Tensor] = None

    def _out(self, result):
        return result[0] if isinstance(result, (tuple, list)) else result

    def grad_for(self, out: torch.Tensor) -> torch.Tensor:
        if self._grad is None or self._grad.shape != out.shape or self._grad.dtype != out.dtype:
            g = torch.Generator(device=out.device).manual_seed(0)
            self._grad = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
        return self._grad

    def zero_grads(self):
        for p in self.params:
            p.grad = None

    def outputs(self) -> Optional[dict]:
        """{name: tensor} of one forward + backward at the benchmarked shape and precision (the
        numerics gate compares it with the eager reference's); None when the case has no check."""
        if self.check is not None:
            return _with_env(self.env, self.check)() if self.env else self.check()
        if self.step is not None:
            return None

        def fwd_bwd():
            self.zero_grads()
            out = self._out(self._fwd())
            out.backward(self.grad_for(out))
            res = {"output": out.detach()}
            if self.compare_grads:
                res.update({f"grad[{i}]": p.grad for i, p in enumerate(self.params) if p.grad is not None})
            self.zero_grads()
            return res
        return _with_env(self.env, fwd_bwd)() if self.env else fwd_bwd()

    def _fwd(self):
        with autocast(self.precision, torch.device(self.device_type)):
            return self.forward()

    def runner(self) -> tuple[Callable[[], object], Callable[[], object]]:
        """(setup, target): setup runs untimed before each call, target is what is timed."""
        setup, target = self._runner()
        if not self.env:
            return setup, target
        return _with_env(self.env, setup), _with_env(self.env, target)

    def _runner(self) -> tuple[Callable[[], object], Callable[[], object]]:
        if self.step is not None:
            return (lambda: None), self.step
        if self.mode == "fwd":  # a training forward: autograd records the graph, as in fwd+bwd
            return self.zero_grads, self._fwd
        if self.mode == "fwd+bwd":
            def fwd_bwd():
                self.zero_grads()
                out = self._out(self._fwd())
                out.backward(self.grad_for(out))
            return (lambda: None), fwd_bwd
        if self.mode == "bwd":
            state = {}

            def setup():
                self.zero_grads()
                state["out"] = self._out(self._fwd())
                self.grad_for(state["out"])

            def bwd():
                out = state.pop("out")
                out.backward(self.grad_for(out))
            return setup, bwd
        raise ValueError(f"unknown mode {self.mode!r}")


def _with_env(env: dict, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return call


_MODULES: dict = {}
_COMPILED: dict = {}
_INPUTS: dict = {}


def module_case(op: str, provider: str, mode: str, batch: int, build: Callable[[], torch.nn.Module],
                make_inputs: Callable[[int], tuple], shape: str = "", precision: str = "fp32") -> Case:
    """A Case for a dtn layer: ``build()`` makes the reference module (fixed seed), the fused
    providers get a copy switched with ``dtn_kernels.set_kernels(..., "fused")`` (same weights),
    the compile providers ``torch.compile`` of either. ``make_inputs(batch)`` returns the forward's
    arguments (fp32 in every precision: bf16 is autocast around the same inputs); the floating ones
    require grad (they stand for embeddings)."""
    key = (op, "fused" if provider in ("fused", "compile_fused", "fused_cublas", "fused_graph") else "reference")
    if key not in _MODULES:
        if (op, "reference") not in _MODULES:
            torch.manual_seed(0)
            _MODULES[(op, "reference")] = build()
        if key[1] == "fused":
            fused = copy.deepcopy(_MODULES[(op, "reference")])
            dtn_kernels.set_kernels(fused, "fused")
            _MODULES[key] = fused
    module = _MODULES[key]
    fn = compiled(module, (op, provider, batch, precision), _COMPILED) if provider.startswith("compile") else module
    if (op, batch) not in _INPUTS:
        torch.manual_seed(1)
        _INPUTS[(op, batch)] = make_inputs(batch)
    inputs = _INPUTS[(op, batch)]
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    env = {"DTN_FUSED_GEMM": "torch"} if provider == "fused_cublas" else {}
    return Case(op=op, provider=provider, mode=mode, batch=batch, forward=lambda: fn(*inputs),
                params=list(module.parameters()) + grads, shape=shape, precision=precision, env=env,
                compiled=fn if isinstance(fn, Compiled) else None)
