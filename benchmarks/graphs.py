"""CUDA-graph providers of the benchmark suite (``fused_graph``, ``grouped_graph``): a case's whole
call captured once into one ``torch.cuda.CUDAGraph`` and replayed (``benchmarks/harness.py``'s
``run_group`` wraps the providers whose name ends in ``_graph``)."""
from __future__ import annotations

import torch

from harness import Case, SkipProvider, autocast


def graph_case(case: Case, device: torch.device, graph_factory=None) -> Case:
    """``case``'s whole call (forward + backward, or its ``step``: a training step with its optimizer)
    captured once into one ``torch.cuda.CUDAGraph`` and replayed: what is left of the host's cost is
    one graph launch. Capture follows torch's whole-network recipe: three warm-up calls on a side
    stream, gradients set to None, then the capture (the gradients, outputs and the optimizer's state
    become the graph's static tensors). Only ``fwd+bwd`` and whole steps are captured (a backward
    alone would replay against the capture's forward). The numerics gate reads the static outputs
    after a replay; a ``step`` case's ``check`` takes an optional ``replay`` callable and uses it
    instead of its own forward + backward. ``graph_factory`` stands in for ``torch.cuda.CUDAGraph``
    on a machine without a GPU (the tests): its objects give ``capture()`` (a context) and
    ``replay()``; the warm-up then runs on the current stream."""
    real = graph_factory is None
    if real:
        if device.type != "cuda":
            raise SkipProvider("CUDA graphs need a CUDA device")
        graph_factory = torch.cuda.CUDAGraph
    if case.step is None and case.mode != "fwd+bwd":
        raise SkipProvider(f"a CUDA graph captures forward + backward or a whole step, not {case.mode!r} alone")
    state: dict = {}

    def body():
        if case.step is not None:
            return case.step()
        with autocast(case.precision, torch.device(case.device_type), cache_enabled=False):
            out = case._out(case.forward())
        out.backward(case.grad_for(out))
        return out

    def capture():
        if real:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    case.zero_grads()
                    body()
            torch.cuda.current_stream().wait_stream(side)
        else:
            for _ in range(3):
                case.zero_grads()
                body()
        case.zero_grads()
        graph = graph_factory()
        ctx = torch.cuda.graph(graph) if real else graph.capture()
        with ctx:
            state["out"] = body()
        state["grads"] = [p.grad for p in case.params]
        state["graph"] = graph

    def run():
        if "graph" not in state:
            capture()
        state["graph"].replay()
        return state["out"]

    def check():
        if case.step is not None:  # the step's own check, handed the replay (it sets the weights first)
            return case.check(run) if case.check is not None else None
        run()
        out = case._out(state["out"])
        res = {"output": out.detach()}
        if case.compare_grads:
            res.update({f"grad[{i}]": g for i, g in enumerate(state["grads"]) if g is not None})
        return res

    return Case(op=case.op, provider=case.provider, mode=case.mode, batch=case.batch, step=run,
                params=[], shape=case.shape, precision=case.precision, device_type=case.device_type, env=case.env,
                check=check, compare_grads=case.compare_grads, compiled=case.compiled)
