"""The benchmark suite's orchestration: :func:`run_group` times one group of providers, interleaved.

A benchmark file defines one pytest test per **group** -- (op, mode, batch, precision) -- and hands
:func:`run_group` a ``make_case(provider)`` callback. ``run_group``

* builds a :class:`Case` per provider (``eager``, ``fused``, ``compile``, ``compile_fused``, plus
  any baselines the file adds, e.g. the embedding bag's ``loop``) and records why any provider is
  left out (Triton off CUDA, torch.compile over the time budget, ...);
* runs every provider's first call untimed (compilation; a compile's first call under a hard
  limit, see :func:`compile_limit_s`), then compares every provider's forward output and gradients
  with the eager reference's once (:class:`NumericsGate`, per-precision tolerances in
  :data:`TOLERANCES`): a mismatch is FAILED -- its records say so, the test fails, the report shows
  no time and no speed-up for it (its median stays in the log, to judge the verdict) -- then times
  the providers in
  **interleaved rounds**: round r runs every provider once, in turn, the starting provider rotating
  with r, so each provider runs after the others have churned the caches and none owns a position.
  The reported median of a provider is over its rounds; ratios come from those medians. On CUDA each
  call is timed with CUDA events, the L2 flushed and the device idle before the start event (so the
  host's launch gaps are counted); on CPU with ``time.perf_counter``;
* drives the rounds through pytest-benchmark's ``pedantic`` (its statistics are those of a whole
  round), and stores every provider's result in ``benchmark.extra_info["cases"]`` and, line by
  line, in the ``DTN_BENCH_LOG`` JSONL file, which survives a run cut short. Groups with compile
  providers first log an eager/fused-only interleaved result (``final: false``), so a compile that
  runs into the stage's timeout still leaves the group's other providers measured.

Precision (the ``precision`` dimension, recorded in every result):

* ``fp32``: fp32 modules and inputs under torch's float32 matmul policy. On CUDA the harness sets
  ``torch.set_float32_matmul_precision(DTN_BENCH_FP32_MATMUL)`` (default ``"high"``: TF32 for eager,
  compile and fused alike); on CPU it leaves torch's policy alone. The policy in force is recorded.
* ``bf16``: the same fp32 modules and inputs, the forward (and loss) under
  ``torch.autocast(device, dtype=torch.bfloat16)``; the backward and optimizer outside it.
  On CPU bf16 runs in the ``smoke`` preset or when ``DTN_BENCH_PRECISIONS`` names it; otherwise
  its groups are skipped with that reason (it would double the CPU suite past its budget, and the
  project's bf16 targets are GPU targets).

Modes: ``fwd`` (a training forward: autograd records), ``bwd`` (the forward runs untimed before
every timed backward), ``fwd+bwd``; whole models add ``train`` and ``infer``.

The machinery lives in one module per job, and the suites import it from here:
``suite_settings`` (providers, grids, presets, run order, skip reasons), ``precision_policy``
(autocast, the recorded policy), ``timing`` (one call, interleaved rounds, peak memory),
``compile_budget`` (the torch.compile wrapper, compile estimates and limits, the deadline),
``timed_case`` (:class:`Case`, :func:`module_case`), ``results_log`` (the environment, records and
the ``DTN_BENCH_LOG`` lines) and ``numerics_gate`` (every provider against the eager reference).
"""
from __future__ import annotations

import time
import uuid
import warnings
from typing import Callable, Optional, Union

import pytest
import torch

# the suites and tests import the machinery from here (one module per job; see the docstring)
from compile_budget import (MIN_GROUP_S, CompileOverrun, Compiled, compile_estimate_s, compile_kind,  # noqa: F401
                            compile_limit_s, compiled, note_compile, note_overrun, overrun_limit, seconds_left,
                            time_limit)
from numerics_gate import REFERENCE_PROVIDER, TOLERANCES, NumericsGate, compare_outputs, numerics_reason, tolerance  # noqa: F401
from precision_policy import autocast, precision_record, precision_skip_reason, tf32_allowed  # noqa: F401
from results_log import SKIPPED, case_records, environment, log_line, record_errors, record_skip  # noqa: F401
from suite_settings import (EMBED_DIM, GRAPH_SUFFIX, HIDDEN, NUM_FIELDS, PAPER_BATCHES, PROVIDERS,  # noqa: F401
                            SMOKE_BATCH, SkipProvider, bench_device, fp32_matmul_policy, group_grid, precisions,
                            preset, priority, provider_list, provider_skip_reason, rounds, shape_grid, subset)
from timed_case import Case, module_case  # noqa: F401
from timing import cuda_event_times, interleaved_times, peak_memory, round_order, sync, time_call, warm_up  # noqa: F401


def run_group(benchmark, op: str, mode: str, batch: int, precision: str,
              make_case: Callable[[str], "Case"], device: torch.device, request=None, *,
              extra: tuple = (), fused_on_cpu: Union[bool, tuple] = False,
              rounds_override: Optional[int] = None) -> dict:
    """Time every provider of one (op, mode, batch, precision) group in interleaved rounds (see the
    module docstring). ``make_case(provider)`` returns the provider's :class:`Case` or raises
    :class:`SkipProvider`. Returns {provider: record}."""
    reason = precision_skip_reason(precision, device)
    if reason:
        pytest.skip(f"{precision}: {reason}")
    if seconds_left() < MIN_GROUP_S:
        pytest.skip("not enough of the suite's time budget (DTN_BENCH_DEADLINE) left for this group")
    test = request.node.nodeid if request is not None else f"{op} {mode} B={batch} {precision}"
    group = {"op": op, "mode": mode, "batch": batch, "group_id": uuid.uuid4().hex[:12],
             **precision_record(precision, device)}
    cases, skipped = {}, {}
    for p in provider_list(extra):
        why = provider_skip_reason(p, device, op, fused_on_cpu)
        if why is None:
            try:
                case = make_case(p)
                case.precision, case.device_type = precision, device.type
                if p.endswith(GRAPH_SUFFIX):
                    from graphs import graph_case

                    case = graph_case(case, device)
                cases[p] = case
            except SkipProvider as exc:
                why = str(exc)
        if why is not None:
            skipped[p] = why
    if not cases:  # benchmarks/conftest.py records the whole test's skip with this reason
        pytest.skip("no provider can run: " + "; ".join(f"{p}: {r}" for p, r in skipped.items()))
    base_env = environment(device)
    key = {k: group[k] for k in ("op", "mode", "batch", "precision")}
    runners = {p: c.runner() for p, c in cases.items()}
    n = rounds(rounds_override)
    first_call: dict = {}
    errors: dict = {}
    budget_note: dict = {}

    def warm(p, limit=float("inf")):  # a provider that raises is left out of the group (and fails the test)
        try:
            with time_limit(limit):
                first_call[p] = warm_up(*runners[p], device)
            return True
        except CompileOverrun:
            kind = compile_kind(op)
            note_overrun(op, limit)
            skipped[p] = f"its compile overran its {limit:.0f} s limit (interrupted; no later {kind} compile is tried)"
            budget_note[p] = {"compile_limit_s": round(limit, 1), "compile_overran": True}
            del runners[p]
            return False
        except Exception as exc:  # noqa: BLE001 -- the other providers still get measured
            errors[p] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            del runners[p]
            return False

    # the numerics gate: every provider against the eager reference, once, after its warm-up
    reference = cases.get(REFERENCE_PROVIDER)
    if reference is None and REFERENCE_PROVIDER not in errors:
        try:  # not timed here (DTN_BENCH_PROVIDERS), still the reference
            reference = make_case(REFERENCE_PROVIDER)
            reference.precision, reference.device_type = precision, device.type
        except Exception:  # noqa: BLE001 -- no reference: the verdicts say "unchecked"
            reference = None
    gate = NumericsGate(reference, group["roofline_precision"])
    numerics: dict = {}
    failed_numerics: dict = {}

    def gate_check(providers):
        for p in providers:
            if p not in runners:
                continue
            numerics[p] = gate.verdict(cases[p])
            if numerics[p]["status"] == "FAILED":  # timed still (its record says FAILED), never a speed-up
                errors[p] = numerics_reason(numerics[p])
                failed_numerics[p] = numerics[p]

    plain = [p for p in runners if not p.startswith("compile")]
    compiled_ = [p for p in runners if p.startswith("compile")]
    for p in plain:
        warm(p)
    gate_check(plain)
    plain = [p for p in plain if p in runners]
    if plain and compiled_:  # on disk before any compile: a compile killed by the timeout loses nothing else
        early = interleaved_times({p: runners[p] for p in plain}, device, max(3, n // 2))
        for rec in case_records(group, cases, early, first_call, device, base_env, final=False, memory={},
                                numerics=numerics):
            log_line({"kind": "case", **rec})
    for p in compiled_:
        need, left = compile_estimate_s(op), seconds_left()
        overran = overrun_limit(op)
        if overran is not None:  # not retried: the same kind of compile would overrun again
            skipped[p] = (f"an earlier {compile_kind(op)} compile overran its {overran:.0f} s limit in this run "
                          "(not retried)")
            del runners[p]
            continue
        if left < need + 5:  # the reason is the same text every time, so the report can count them
            skipped[p] = "its compile would not fit in what was left of the time budget (DTN_BENCH_DEADLINE)"
            budget_note[p] = {"compile_expected_s": round(need, 1), "left_s": round(max(left, 0.0), 1)}
            del runners[p]
            continue
        if warm(p, min(compile_limit_s(op), max(left - 5, 1.0))):
            note_compile(op, first_call[p])
            gate_check([p])
    if not runners:
        record_errors(test, key, errors, failed_numerics)
        pytest.fail("every provider failed: " + "; ".join(f"{p}: {e}" for p, e in errors.items()))
    # one untimed interleaved round, then as many timed rounds as the budget allows (at least 3)
    t0 = time.perf_counter()
    interleaved_times(runners, device, 1)
    round_s = time.perf_counter() - t0
    if round_s > 0 and seconds_left() != float("inf"):
        n = max(3, min(n, int((seconds_left() - 5) / round_s)))
    times: dict = {p: [] for p in runners}
    state = {"r": 0}

    def one_round():
        for p in round_order(list(runners), state["r"]):
            times[p].append(time_call(*runners[p], device))
        state["r"] += 1

    benchmark.pedantic(one_round, rounds=n, iterations=1, warmup_rounds=0)
    memory = {}
    for p in runners:  # the last call's gradients must not sit in the baseline
        setup, target = runners[p]
        cases[p].zero_grads()
        try:
            memory[p] = round(peak_memory(setup, target, device) / 2**20, 2)
        except Exception as exc:  # noqa: BLE001 -- a memory probe must not cost the group its times
            memory[p] = None
            warnings.warn(f"{op} {p}: peak memory probe failed ({type(exc).__name__}: {exc})", RuntimeWarning)
    records = case_records(group, cases, times, first_call, device, base_env, final=True, memory=memory,
                           numerics=numerics)
    for rec in records:
        log_line({"kind": "case", **rec})
    for p, why in skipped.items():
        record_skip(test, key, p, why, **budget_note.get(p, {}))
    record_errors(test, key, errors, failed_numerics)
    info = benchmark.extra_info
    info.update({**base_env, **group, "cases": records,
                 "skipped": [{"provider": p, "reason": r} for p, r in skipped.items()],
                 "errors": [{"provider": p, "reason": e} for p, e in errors.items()],
                 "numerics": numerics})
    if request is not None:
        request.config.__dict__.setdefault("dtn_bench_results", []).extend(dict(r) for r in records)
    if errors:  # measured what could be measured; the failure still shows
        pytest.fail("; ".join(f"{p} failed: {e}" for p, e in errors.items()))
    return {r["provider"]: r for r in records}


def run_case(benchmark, case: Case, device: torch.device, dtype: torch.dtype = torch.float32, request=None,
             rounds_override: Optional[int] = None) -> dict:
    """One provider timed alone (the harness's earlier interface, kept for files not yet on
    :func:`run_group`). Its records say ``interleaved_with: [provider]``, and the report marks
    ratios built from them: they do not meet the project's interleaving rule."""
    case.device_type = device.type
    group = {"op": case.op, "mode": case.mode, "batch": case.batch, "group_id": uuid.uuid4().hex[:12],
             **precision_record(case.precision, device)}
    setup, target = case.runner()
    first = {case.provider: warm_up(setup, target, device)}
    n = rounds(rounds_override)
    times: dict = {case.provider: []}
    benchmark.pedantic(lambda: times[case.provider].append(time_call(setup, target, device)),
                       rounds=n, iterations=1, warmup_rounds=0)
    case.zero_grads()
    memory = {case.provider: round(peak_memory(setup, target, device) / 2**20, 2)}
    (rec,) = case_records(group, {case.provider: case}, times, first, device, environment(device), True, memory)
    log_line({"kind": "case", **rec})
    benchmark.extra_info.update(rec)
    if request is not None:
        request.config.__dict__.setdefault("dtn_bench_results", []).append(dict(rec))
    return rec


def skip_unless_available(provider: str, device: torch.device, fused_on_cpu: bool = False,
                          compile_s: float = 60.0, op: str = "") -> None:
    """Skip (with the reason) what cannot be timed here (the earlier interface; see run_case)."""
    if seconds_left() < (compile_s if provider.startswith("compile") else MIN_GROUP_S):
        pytest.skip(f"{provider}: not enough of the suite's time budget (DTN_BENCH_DEADLINE) left")
    reason = provider_skip_reason(provider, device, op, fused_on_cpu)
    if reason:
        pytest.skip(f"{provider}: {reason}")


def run_module_group(benchmark, op: str, mode: str, batch: int, precision: str, build: Callable[[], torch.nn.Module],
                     make_inputs: Callable[[int], tuple], shape: str, device: torch.device, request=None,
                     extra: tuple = ()) -> dict:
    """:func:`run_group` of a dtn layer: every provider's case is a :func:`module_case` of ``build()``."""
    return run_group(benchmark, op, mode, batch, precision,
                     lambda provider: module_case(op, provider, mode, batch, build, make_inputs, shape=shape,
                                                  precision=precision),
                     device, request, extra=extra)
