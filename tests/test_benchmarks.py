"""The benchmark suite's own machinery: grids, precision policy, interleaved timing, the report
(targets, roofline column, history, no matplotlib), the suite's GPU test selection and stage log,
and the quality script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import compile_budget  # noqa: E402
import graphs  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import results_log  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def bench_env(monkeypatch):
    """A clean benchmark environment on CPU (the caller's DTN_BENCH_* settings must not leak in)."""
    for var in list(os.environ):
        if var.startswith("DTN_BENCH_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("DTN_BENCH_DEVICE", "cpu")
    monkeypatch.setattr(compile_budget, "_COMPILE_SEEN", {})
    monkeypatch.setattr(results_log, "SKIPPED", [])
    return monkeypatch


# ----------------------------------------------------------------------------- grids and precision


def test_group_grid_has_precision_and_core_first(bench_env):
    bench_env.setenv("DTN_BENCH_PRESET", "full")
    full = harness.group_grid()
    assert (2048, "fwd+bwd", "bf16") in full and (2048, "fwd+bwd", "fp32") in full
    assert (16384, "fwd+bwd", "bf16") in full and (16384, "fwd", "fp32") not in full  # sweep: fwd+bwd only
    assert len(full) == 2 * (2 * 3 + 3)
    bench_env.setenv("DTN_BENCH_SUBSET", "core")
    assert harness.group_grid() == [(2048, "fwd+bwd", "bf16"), (2048, "fwd+bwd", "fp32")]
    bench_env.setenv("DTN_BENCH_SUBSET", "rest")
    assert len(harness.group_grid()) == len(full) - 2
    bench_env.setenv("DTN_BENCH_SUBSET", "most")
    with pytest.raises(ValueError, match="DTN_BENCH_SUBSET"):
        harness.group_grid()
    # smoke: the core is the first precision, so a check run has something in both stages
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    bench_env.setenv("DTN_BENCH_SUBSET", "core")
    assert harness.group_grid() == [(64, "fwd+bwd", "bf16")]
    bench_env.setenv("DTN_BENCH_SUBSET", "rest")
    assert harness.group_grid() == [(64, "fwd+bwd", "fp32")]
    # the earlier (batch, mode) grid still works for files on run_case
    bench_env.setenv("DTN_BENCH_PRESET", "quick")
    bench_env.delenv("DTN_BENCH_SUBSET")
    assert harness.shape_grid() == [(2048, "fwd"), (2048, "bwd"), (2048, "fwd+bwd"), (4096, "fwd+bwd")]


def test_model_grid_headline_is_the_dtn_training_step(bench_env):
    import bench_model

    bench_env.setenv("DTN_BENCH_PRESET", "full")
    every = bench_model.model_grid()
    bench_env.setenv("DTN_BENCH_SUBSET", "headline")
    assert bench_model.model_grid() == [("dtn", "train", b, p) for b in (2048, 4096) for p in ("bf16", "fp32")]
    bench_env.setenv("DTN_BENCH_SUBSET", "core")
    assert bench_model.model_grid() == []  # the ops' core stage: the DTN step was timed first
    bench_env.setenv("DTN_BENCH_SUBSET", "rest")
    rest = bench_model.model_grid()
    assert len(rest) == len(every) - 4 and not [g for g in rest if g[:2] == ("dtn", "train")]
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    bench_env.setenv("DTN_BENCH_SUBSET", "headline")
    assert bench_model.model_grid() == [("dtn", "train", 64, "bf16"), ("dtn", "train", 64, "fp32")]


def test_run_order_priority(bench_env):
    """Paper batches before the sweep, ops before whole models, then bf16 before fp32."""
    keys = [harness.priority({"batch": b, "precision": p}, model=m) for b, p, m in
            [(2048, "bf16", False), (4096, "fp32", False), (2048, "bf16", True), (2048, "fp32", True),
             (512, "bf16", False), (16384, "fp32", False)]]
    assert all(a < b for a, b in zip(keys, keys[1:]))
    bench_env.setenv("DTN_BENCH_PRECISIONS", "fp32,bf16")
    fp32, bf16 = (harness.priority({"batch": 2048, "precision": p}) for p in ("fp32", "bf16"))
    assert fp32 < bf16


def test_precision_settings_are_checked(bench_env):
    bench_env.setenv("DTN_BENCH_PRECISIONS", "fp32,fp8")
    with pytest.raises(ValueError, match="fp8"):
        harness.precisions()
    bench_env.setenv("DTN_BENCH_FP32_MATMUL", "tf32")
    with pytest.raises(ValueError, match="DTN_BENCH_FP32_MATMUL"):
        harness.fp32_matmul_policy()
    bench_env.setenv("DTN_BENCH_PROVIDERS", "eager,fast")
    with pytest.raises(ValueError, match="fast"):
        harness.provider_list()
    bench_env.setenv("DTN_BENCH_PROVIDERS", "fused,eager")
    assert harness.provider_list() == ["eager", "fused"]


def test_precision_record_and_cpu_bf16_rule(bench_env):
    rec = harness.precision_record("fp32", CPU)
    assert rec["precision"] == "fp32" and rec["autocast"] is None
    assert rec["fp32_matmul"] == torch.get_float32_matmul_precision()
    assert rec["roofline_precision"] == "fp32-ieee"  # CPU: torch's policy is left alone
    rec = harness.precision_record("bf16", CPU)
    assert rec["roofline_precision"] == "bf16" and rec["autocast"] == "cpu/bfloat16"
    bench_env.setenv("DTN_BENCH_PRESET", "quick")
    assert "opt-in" in harness.precision_skip_reason("bf16", CPU)
    assert harness.precision_skip_reason("fp32", CPU) is None
    bench_env.setenv("DTN_BENCH_PRECISIONS", "fp32,bf16")
    assert harness.precision_skip_reason("bf16", CPU) is None
    bench_env.delenv("DTN_BENCH_PRECISIONS")
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    assert harness.precision_skip_reason("bf16", CPU) is None


def test_importing_the_harness_leaves_triton_alone():
    """The suite's tests share pytest's process with the Triton tests, which must set
    TRITON_INTERPRET before anything imports triton (tests/triton_env.py)."""
    code = "import sys; sys.path.insert(0, 'benchmarks'); import harness, report; print('triton' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- interleaved timing


def test_interleaved_rounds_rotate_and_keep_setup_untimed():
    calls = []

    def runner(p):
        return (lambda: calls.append(("setup", p))), (lambda: calls.append(("target", p)))

    names = ["eager", "fused", "compile", "compile_fused"]
    times = harness.interleaved_times({p: runner(p) for p in names}, CPU, n_rounds=8)
    assert {p: len(t) for p, t in times.items()} == {p: 8 for p in names}
    targets = [p for kind, p in calls if kind == "target"]
    rounds_ = [targets[i:i + 4] for i in range(0, len(targets), 4)]
    assert all(sorted(r) == sorted(names) for r in rounds_)  # every provider once a round
    assert rounds_[0] == names and rounds_[1] == names[1:] + names[:1]  # the start rotates
    for pos in range(4):  # over 4 (and 8) rounds every provider holds every position equally often
        assert sorted(r[pos] for r in rounds_) == sorted(names * 2)
    for i, (kind, p) in enumerate(calls):  # each timed call directly follows its own untimed setup
        if kind == "target":
            assert calls[i - 1] == ("setup", p)


class FakeBenchmark:
    """pytest-benchmark's fixture, as far as run_group uses it."""

    def __init__(self):
        self.extra_info = {}
        self.calls = 0

    def pedantic(self, fn, rounds, iterations=1, warmup_rounds=0):
        for _ in range(rounds):
            fn()
            self.calls += 1


def _sleepy_case(op, provider, seconds, seen=None):
    def fwd():
        if seen is not None:
            seen.append((provider, torch.is_autocast_enabled("cpu")))
        time.sleep(seconds)
        return torch.ones(2, requires_grad=True) * 2
    return harness.Case(op, provider, "fwd", 8, forward=fwd, shape="toy")


def test_run_group_logs_partial_then_final_and_skips_compile_over_budget(bench_env, tmp_path):
    log = tmp_path / "cases.jsonl"
    bench_env.setenv("DTN_BENCH_LOG", str(log))
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    bench_env.setenv("DTN_BENCH_ROUNDS", "4")
    bench_env.setenv("DTN_BENCH_DEADLINE", str(time.time() + 40))
    bench_env.setenv("DTN_BENCH_COMPILE_S", "100")  # no compile fits in 40 s
    # 40 ms vs 1 ms of sleep: a 40x margin, so a loaded machine's late wake-ups cannot swap the two
    speed = {"eager": 0.040, "fused": 0.001, "compile": 0.002, "compile_fused": 0.001}
    fb = FakeBenchmark()
    out = harness.run_group(fb, "toy_op", "fwd", 8, "fp32", lambda p: _sleepy_case("toy_op", p, speed[p]), CPU,
                            fused_on_cpu=True)
    assert set(out) == {"eager", "fused"} and fb.calls == 4
    assert out["eager"]["median_ms"] >= 40 and out["eager"]["median_ms"] > out["fused"]["median_ms"]
    assert out["eager"]["interleaved_with"] == ["eager", "fused"] and out["eager"]["rounds"] == 4
    assert out["eager"]["precision"] == "fp32" and out["eager"]["roofline_precision"] == "fp32-ieee"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    kinds = [(r["kind"], r.get("provider"), r.get("final")) for r in lines]
    # eager / fused on disk before any compile is attempted, then the final set, then the skips
    assert kinds[:2] == [("case", "eager", False), ("case", "fused", False)]
    assert kinds[2:4] == [("case", "eager", True), ("case", "fused", True)]
    skips = [r for r in lines if r["kind"] == "skipped" and r["provider"] != "fused_graph"]  # CUDA only
    assert {r["provider"] for r in skips} == {"compile", "compile_fused"}
    assert all("would not fit" in r["reason"] and r["precision"] == "fp32" for r in skips)
    assert all(r["compile_expected_s"] == 100 and 0 < r["left_s"] <= 40 for r in skips)
    assert fb.extra_info["cases"][0]["op"] == "toy_op" and len(fb.extra_info["skipped"]) == 3


def test_run_group_compiles_within_budget_and_applies_autocast(bench_env, tmp_path):
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    bench_env.setenv("DTN_BENCH_ROUNDS", "3")
    bench_env.setenv("DTN_BENCH_DEADLINE", str(time.time() + 60))
    bench_env.setenv("DTN_BENCH_COMPILE_S", "1")
    seen = []
    out = harness.run_group(FakeBenchmark(), "toy_op", "fwd", 8, "bf16",
                            lambda p: _sleepy_case("toy_op", p, 0.001, seen), CPU, fused_on_cpu=True)
    timed = [p for p in harness.PROVIDERS if p != "fused_graph"]  # CUDA graphs: CUDA only
    assert set(out) == set(timed)
    assert all(r["interleaved_with"] == timed and r["final"] for r in out.values())
    assert all(r["numerics"] == ("reference" if p == "eager" else "ok") for p, r in out.items())
    assert seen and all(autocast for _, autocast in seen)  # every provider's forward ran under bf16 autocast
    assert compile_budget._COMPILE_SEEN["op"]  # the compile providers' first calls feed the next estimate
    seen.clear()
    harness.run_group(FakeBenchmark(), "toy_op", "fwd", 8, "fp32", lambda p: _sleepy_case("toy_op", p, 0.001, seen),
                      CPU, fused_on_cpu=True)
    assert seen and not any(autocast for _, autocast in seen)


def test_run_group_times_the_others_when_a_provider_raises(bench_env, tmp_path):
    log = tmp_path / "cases.jsonl"
    bench_env.setenv("DTN_BENCH_LOG", str(log))
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    bench_env.setenv("DTN_BENCH_PROVIDERS", "eager,fused,compile")

    def make(p):
        case = _sleepy_case("toy_op", p, 0.001)
        if p == "fused":
            case.forward = lambda: torch.ones(2) @ torch.ones(3)  # a shape error, as a broken kernel would raise
        return case

    with pytest.raises(pytest.fail.Exception, match="fused failed: RuntimeError"):
        harness.run_group(FakeBenchmark(), "toy_op", "fwd", 8, "fp32", make, CPU, fused_on_cpu=True)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    finals = {r["provider"] for r in lines if r["kind"] == "case" and r["final"]}
    assert finals == {"eager", "compile"}
    err = [r for r in lines if r["kind"] == "error"]
    assert len(err) == 1 and err[0]["provider"] == "fused" and "RuntimeError" in err[0]["reason"]
    assert report.main([str(log), "--out", str(tmp_path / "r"), "--no-chart"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**Failed providers**" in md and "toy_op fwd B=8 fp32: fused failed: RuntimeError" in md


def _toy_module_case(provider, mode="fwd+bwd", shift=0.0):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(7, 6, requires_grad=True)
    return harness.Case("toy_op", provider, mode, 7, forward=lambda: lin(x) + shift, params=[lin.weight, lin.bias, x])


def test_numerics_gate_fails_a_perturbed_provider_and_never_shows_it_as_a_speedup(bench_env, tmp_path):
    log = tmp_path / "cases.jsonl"
    bench_env.setenv("DTN_BENCH_LOG", str(log))
    bench_env.setenv("DTN_BENCH_PRESET", "smoke")
    bench_env.setenv("DTN_BENCH_PROVIDERS", "eager,fused,fused_cublas")
    # fused: its output off by 1e-3 of its scale (over fp32's bound); fused_cublas: a 1e-6 relative wobble (within)
    shifts = {"eager": 0.0, "fused": 1e-3, "fused_cublas": 1e-7}
    fb = FakeBenchmark()
    with pytest.raises(pytest.fail.Exception, match="fused failed: numerics FAILED against eager"):
        harness.run_group(fb, "toy_op", "fwd+bwd", 7, "fp32", lambda p: _toy_module_case(p, shift=shifts[p]), CPU,
                          fused_on_cpu=True, extra=("fused_cublas",))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    timed = {r["provider"]: r for r in lines if r["kind"] == "case" and r["final"]}
    assert timed["fused_cublas"]["numerics"] == "ok" and timed["eager"]["numerics"] == "reference"
    assert timed["fused"]["numerics"] == "FAILED"  # its time is in the log, marked
    err = [r for r in lines if r["kind"] == "error"]
    assert len(err) == 1 and err[0]["provider"] == "fused" and err[0]["numerics"] == "FAILED"
    detail = err[0]["numerics_detail"]
    assert detail["worst"]["tensor"] == "output" and detail["worst"]["over_bound"] == 35 and detail["rtol"] == 1e-4
    assert report.main([str(log), "--out", str(tmp_path / "r"), "--no-chart"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    row = _row(md, "| toy_op | fwd+bwd | 7 |")
    assert "**FAILED**" in row and "**FAILED: fused**" in row
    assert "x" not in row.split("|")[6]  # no speed-up in "fused vs eager"


def test_numerics_gate_compares_gradients_and_tolerances_per_precision():
    ref = {"output": torch.tensor([1.0, -2.0, 0.0]), "grad[0]": torch.tensor([[0.5, 1e-6]])}
    same = {k: v.clone() for k, v in ref.items()}
    assert harness.compare_outputs(ref, same, harness.tolerance("fp32-ieee"))["status"] == "ok"
    off = dict(same, **{"grad[0]": torch.tensor([[0.5, 2e-3]])})  # 2e-3 - 1e-6 > 1e-4 * 0.5 + 1e-4 * 1e-6
    v = harness.compare_outputs(ref, off, harness.tolerance("fp32-ieee"))
    assert v["status"] == "FAILED" and v["worst"]["tensor"] == "grad[0]" and "grad[0]" in v["problems"][0]
    assert harness.compare_outputs(ref, off, harness.tolerance("bf16"))["status"] == "ok"  # 2e-3 <= 3e-2 * 0.5
    nan = dict(same, output=torch.tensor([1.0, float("nan"), 0.0]))
    assert harness.compare_outputs(ref, nan, harness.tolerance("bf16"))["status"] == "FAILED"
    assert harness.compare_outputs(ref, {"output": ref["output"]}, harness.tolerance("bf16"))["problems"] == \
        ["grad[0]: missing"]
    assert harness.compare_outputs(ref, {"output": ref["output"]}, harness.tolerance("bf16"),
                                   compare_grads=False)["status"] == "ok"
    assert set(harness.TOLERANCES) >= {"fp32-ieee", "fp32-tf32", "bf16"}


class FakeGraph:
    """torch.cuda.CUDAGraph's part graph_case uses: capture() records the body's calls, replay() reruns it."""

    def __init__(self):
        self.captured, self.replays = None, 0

    def capture(self):
        import contextlib

        return contextlib.nullcontext()

    def replay(self):
        self.replays += 1


def test_cuda_graph_case_captures_once_and_the_gate_reads_its_static_outputs(bench_env):
    with pytest.raises(harness.SkipProvider, match="CUDA device"):
        graphs.graph_case(_toy_module_case("fused_graph"), CPU)
    with pytest.raises(harness.SkipProvider, match="not 'bwd' alone"):
        graphs.graph_case(_toy_module_case("fused_graph", mode="bwd"), CPU, graph_factory=FakeGraph)
    assert harness.provider_skip_reason("grouped_graph", CPU, "model:dtn", fused_on_cpu=True).startswith("CUDA graphs")
    base = _toy_module_case("fused_graph")
    calls = []
    inner = base.forward
    base.forward = lambda: calls.append(1) or inner()
    case = graphs.graph_case(base, CPU, graph_factory=FakeGraph)
    setup, target = case.runner()
    target()
    assert len(calls) == 4  # three warm-up calls, then the capture
    target()
    target()
    assert len(calls) == 4  # later calls replay
    verdict = harness.NumericsGate(_toy_module_case("eager"), "fp32-ieee").verdict(case)
    assert verdict["status"] == "ok" and verdict["compared"] == 4  # output + 3 static gradients


def test_compiled_uses_fullgraph_and_records_graph_breaks(bench_env):
    whole = harness.Compiled(lambda x: torch.sin(x) * 2, backend="eager")
    x = torch.randn(4)
    torch.testing.assert_close(whole(x), torch.sin(x) * 2)
    assert whole.info == {"fullgraph": True, "graph_breaks": 0}

    def breaks(x):
        y = torch.sin(x)
        if y.sum().item() > -100:  # a host read: a graph break
            y = y * 2
        return y

    broken = harness.Compiled(breaks, backend="eager")
    torch.testing.assert_close(broken(x), torch.sin(x) * 2)
    assert broken.info["fullgraph"] is False and broken.info["graph_breaks"] >= 1 and broken.info["break_reason"]


def test_environment_reads_tf32_with_the_guard(bench_env, monkeypatch):
    class Mixed:  # torch raises when the legacy and new TF32 APIs were mixed
        fp32_precision = "none"

        @property
        def allow_tf32(self):
            raise RuntimeError("mixed legacy and new TF32 APIs")

    monkeypatch.setattr(torch.backends.cuda, "matmul", Mixed())
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert harness.tf32_allowed() is True
        torch.set_float32_matmul_precision("highest")
        assert harness.tf32_allowed() is False
    finally:
        torch.set_float32_matmul_precision(prev)
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(fp32_precision="tf32"))
    assert harness.tf32_allowed() is True


def test_run_group_skips_what_cannot_run(bench_env):
    bench_env.setenv("DTN_BENCH_PRESET", "quick")
    with pytest.raises(pytest.skip.Exception, match="opt-in"):  # bf16 on CPU outside smoke
        harness.run_group(FakeBenchmark(), "toy_op", "fwd", 8, "bf16", lambda p: None, CPU)

    def no_case(p):
        raise harness.SkipProvider("not built here")

    with pytest.raises(pytest.skip.Exception, match="eager: not built here"):
        harness.run_group(FakeBenchmark(), "toy_op", "fwd", 8, "fp32", no_case, CPU)


# ----------------------------------------------------------------------------- report


def _rec(op, provider, mode, batch, ms, precision="fp32", device_type="cuda", group="g", final=True, with_=None,
         roof=None):
    return {"op": op, "provider": provider, "mode": mode, "batch": batch, "median_ms": ms, "peak_mem_mb": 1.0,
            "precision": precision, "fp32_matmul": "high",
            "roofline_precision": roof or ("bf16" if precision == "bf16" else "fp32-tf32"),
            "device": "Test GPU", "device_type": device_type, "torch": "x", "triton": "y", "cuda": "13.0",
            "threads": 1, "preset": "full", "group_id": group + op + mode + str(batch) + precision, "final": final,
            "interleaved_with": with_ or ["eager", "compile", "fused", "compile_fused"],
            "measured_at": "2026-11-30T10:00:00Z"}


def _write_log(path, recs, skipped=()):
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps({"kind": "case", **r}) + "\n")
        for s in skipped:
            fh.write(json.dumps({"kind": "skipped", **s}) + "\n")


def _row(md, prefix):
    return next(line for line in md.splitlines() if line.startswith(prefix))


def _op_group(op, batch, precision, eager, compile_, fused, **kw):
    return [_rec(op, "eager", "fwd+bwd", batch, eager, precision, **kw),
            _rec(op, "compile", "fwd+bwd", batch, compile_, precision, **kw),
            _rec(op, "fused", "fwd+bwd", batch, fused, precision, **kw)]


def test_report_marks_each_ops_targets_in_both_precisions(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "roofline", raising=False)
    monkeypatch.setattr(report, "HERE", str(tmp_path))  # no roofline.py there ...
    bench_dir = os.path.dirname(os.path.abspath(report.__file__))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != bench_dir])  # ... nor here
    recs = (_op_group("gated_cross", 2048, "fp32", 2.1, 1.4, 1.0)  # 2.1x eager (≥ 2), 1.4x compile (≥ 1.3)
            + _op_group("gated_cross", 2048, "bf16", 1.9, 1.2, 1.0)  # 1.9x < 2, 1.2x < 1.3
            + _op_group("mask_block", 4096, "bf16", 1.8, 1.3, 1.0)  # exactly 1.8x and 1.3x: met
            + _op_group("hcnet", 2048, "fp32", 4.9, 2.0, 1.0)  # 4.9x < 5
            + _op_group("softmax_gate", 2048, "bf16", 3.0, 1.0, 1.0)  # 3x met, 1.0x compile missed
            + _op_group("softmax_gate", 512, "bf16", 1.0, 1.0, 1.0)  # not a paper batch: no marks
            + [_rec("model:dtn", "eager", "train", 2048, 10.0, "bf16"),
               _rec("model:dtn", "compile", "train", 2048, 6.0, "bf16"),
               _rec("model:dtn", "fused", "train", 2048, 5.0, "bf16")])  # 2x eager met, 1.2x compile missed
    log = tmp_path / "cases.jsonl"
    _write_log(log, recs, [{"test": "t1", "reason": "compile: budget"}, {"test": "t2", "reason": "compile: budget"}])
    assert report.main([str(log), "--out", str(tmp_path / "out"), "--command", "bash x.sh", "--no-chart"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    row = _row(md, "| gated_cross | fwd+bwd | 2048 | fp32 (tf32)")
    assert "2.10x ✓" in row and "1.40x ✓" in row
    row = _row(md, "| gated_cross | fwd+bwd | 2048 | bf16")
    assert "1.90x ✗" in row and "1.20x ✗" in row
    row = _row(md, "| mask_block | fwd+bwd | 4096 | bf16")
    assert "1.80x ✓" in row and "1.30x ✓" in row
    assert "4.90x ✗" in _row(md, "| hcnet | fwd+bwd | 2048")
    row = _row(md, "| softmax_gate | fwd+bwd | 2048 | bf16")
    assert "3.00x ✓" in row and "1.00x ✗" in row
    sweep = _row(md, "| softmax_gate | fwd+bwd | 512")
    assert "✓" not in sweep and "✗" not in sweep
    row = _row(md, "| model:dtn | train | 2048 | bf16")
    assert "2.00x ✓" in row and "1.20x ✗" in row
    assert "2 × compile: budget" in md and "`bash x.sh`" in md
    assert "Roofline column blank: benchmarks/roofline.py is not there" in md
    # the same numbers measured on CPU carry no GPU target marks
    _write_log(log, [dict(r, device_type="cpu") for r in recs])
    assert report.main([str(log), "--out", str(tmp_path / "cpu"), "--no-chart"]) == 0
    md = (tmp_path / "cpu" / "report.md").read_text()
    assert "✓" not in md and "✗" not in md


def test_report_uses_final_rounds_and_flags_partial_or_solo_timing(tmp_path):
    recs = [_rec("hcnet", "eager", "fwd+bwd", 2048, 50.0, group="a", final=False, with_=["eager", "fused"]),
            _rec("hcnet", "fused", "fwd+bwd", 2048, 5.0, group="a", final=False, with_=["eager", "fused"]),
            # a group whose compiles were cut off: only the partial set exists
            _rec("gated_cross", "eager", "fwd+bwd", 2048, 3.0, final=False, with_=["eager", "fused"]),
            _rec("gated_cross", "fused", "fwd+bwd", 2048, 1.0, final=False, with_=["eager", "fused"]),
            # providers timed alone (run_case): not interleaved
            _rec("mask_block", "eager", "fwd+bwd", 2048, 3.0, with_=["eager"]),
            _rec("mask_block", "fused", "fwd+bwd", 2048, 1.0, with_=["fused"])]
    recs += [_rec("hcnet", p, "fwd+bwd", 2048, ms, group="b", with_=["eager", "compile", "fused"])
             for p, ms in (("eager", 60.0), ("compile", 13.0), ("fused", 10.0))]
    log = tmp_path / "cases.jsonl"
    _write_log(log, recs)
    with open(log, "a") as fh:
        fh.write('{"kind": "case", "op": "hc')  # the last line of a killed run
    assert report.main([str(log), "--out", str(tmp_path), "--no-chart"]) == 0
    md = (tmp_path / "report.md").read_text()
    row = _row(md, "| hcnet | fwd+bwd | 2048")
    assert "60.000" in row and "6.00x ✓" in row and "1.30x ✓" in row  # the final group, not the partial one
    row = _row(md, "| gated_cross | fwd+bwd | 2048")
    assert "3.00x*" in row and "✓" not in row and "the group's full interleaved timing did not finish" in md
    row = _row(md, "| mask_block | fwd+bwd | 2048")
    assert "3.00x†" in row and "✓" not in row and "not timed interleaved" in md


def test_report_roofline_column_from_the_roofline_module(tmp_path, monkeypatch):
    calls = []

    def floor_ms(op, mode, batch, precision, device_name):
        calls.append((op, mode, batch, precision, device_name))
        return {"gated_cross": 0.6, "hcnet": 0.2}.get(op)

    monkeypatch.setitem(sys.modules, "roofline", types.SimpleNamespace(floor_ms=floor_ms))
    recs = (_op_group("gated_cross", 2048, "bf16", 3.0, 2.0, 1.0) + _op_group("hcnet", 2048, "fp32", 6.0, 2.0, 1.0)
            + _op_group("softmax_gate", 2048, "fp32", 3.0, 2.0, 1.0))
    log = tmp_path / "cases.jsonl"
    _write_log(log, recs)
    assert report.main([str(log), "--out", str(tmp_path), "--no-chart"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert ("gated_cross", "fwd+bwd", 2048, "bf16", "Test GPU") in calls
    assert ("hcnet", "fwd+bwd", 2048, "fp32-tf32", "Test GPU") in calls
    assert "| 0.600 | 60% ✓ |" in _row(md, "| gated_cross | fwd+bwd | 2048")  # floor 0.6 / fused 1.0 ms
    assert "| 0.200 | 20% ✗ |" in _row(md, "| hcnet | fwd+bwd | 2048")
    assert "|  |  |" in _row(md, "| softmax_gate | fwd+bwd | 2048")  # None: left blank
    roof = md[md.index("Roofline: every provider"):]
    assert "| gated_cross | fwd+bwd | 2048 | bf16 | 0.600 | 20% | 30% | 60% |" in roof  # eager, compile, fused

    def broken(*args):
        raise KeyError("H100")

    monkeypatch.setitem(sys.modules, "roofline", types.SimpleNamespace(floor_ms=broken))
    assert report.main([str(log), "--out", str(tmp_path), "--no-chart"]) == 0
    assert "roofline.floor_ms failed (KeyError" in (tmp_path / "report.md").read_text()


def test_report_markdown_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    log = tmp_path / "cases.jsonl"
    _write_log(log, _op_group("gated_cross", 2048, "fp32", 3.0, 2.0, 1.0))
    assert report.main([str(log), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| gated_cross | fwd+bwd | 2048" in md and "matplotlib is not installed" in md
    assert not (tmp_path / "o" / "speedups.png").exists()


def test_report_history_appends_once_and_shows_runs(tmp_path, monkeypatch):
    hist = tmp_path / "history.jsonl"
    log = tmp_path / "cases.jsonl"
    _write_log(log, _op_group("gated_cross", 2048, "bf16", 3.0, 2.0, 1.5))
    assert report.main([str(log), "--out", str(tmp_path / "r1"), "--history", str(hist), "--commit", "aaa111",
                        "--no-chart"]) == 0
    first = [json.loads(x) for x in hist.read_text().splitlines()]
    assert len(first) == 1 and first[0]["commit"] == "aaa111" and first[0]["device"] == "Test GPU"
    assert first[0]["precision"] == "bf16" and first[0]["ms"] == {"eager": 3.0, "compile": 2.0, "fused": 1.5}
    assert "History on" not in (tmp_path / "r1" / "report.md").read_text()  # one run: no history section
    assert report.main([str(log), "--out", str(tmp_path / "r1"), "--history", str(hist), "--commit", "aaa111",
                        "--no-chart"]) == 0
    assert len(hist.read_text().splitlines()) == 1  # the same run is not appended twice
    _write_log(log, [dict(r, measured_at="2026-12-01T10:00:00Z") for r in
                     _op_group("gated_cross", 2048, "bf16", 3.0, 2.0, 1.0)])
    assert report.main([str(log), "--out", str(tmp_path / "r2"), "--history", str(hist), "--commit", "bbb222",
                        "--no-chart"]) == 0
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "History on Test GPU (2 runs" in md and "aaa111" in md and "bbb222" in md
    assert "| 2.00x |" in md and "| 3.00x |" in md
    assert report.main(["--history", str(hist), "--out", str(tmp_path / "h")]) == 0  # history alone
    assert "bbb222" in (tmp_path / "h" / "history.md").read_text()


def test_report_errors_name_the_file_and_still_list_stages(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert report.main([str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.json" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": [{"extra_info": {}}]}))
    assert report.main([str(other), "--out", str(tmp_path)]) == 2
    assert "no suite results" in capsys.readouterr().err
    stages = tmp_path / "stages.jsonl"
    stages.write_text(json.dumps({"stage": "build", "status": "timeout", "seconds": 180, "budget_s": 180,
                                  "reason": "timed out after 180s"}) + "\n")
    assert report.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "s"), "--stages", str(stages)]) == 2
    md = (tmp_path / "s" / "report.md").read_text()
    assert "No benchmark results" in md and "| build | timeout | 180 | 180 | timed out after 180s |" in md


def test_report_reads_pytest_benchmark_group_json(tmp_path):
    data = {"datetime": "2026-11-30", "benchmarks": [
        {"name": "test_x",
         "extra_info": {"op": "gated_cross", "cases": _op_group("gated_cross", 2048, "fp32", 3, 2, 1)}},
        {"name": "old", "extra_info": dict(_rec("hcnet", "eager", "fwd+bwd", 2048, 9.0), precision=None)},
        {"name": "other", "extra_info": {}}], "dtn_skipped": []}
    data["benchmarks"][1]["extra_info"].pop("precision")  # the earlier per-case format had no precision
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    cases, _, env = report.load([str(path)])
    assert {(c["op"], c["provider"], c["precision"]) for c in cases} >= {("gated_cross", "fused", "fp32"),
                                                                         ("hcnet", "eager", "fp32")}
    assert env["device"] == "Test GPU"


# ----------------------------------------------------------------------------- through pytest-benchmark


def test_smoke_suite_through_pytest_benchmark(tmp_path):
    """A tiny real run, both precisions: the embedding bag (eager twin, C++ op, per-feature loop) and
    the softmax gate, through pytest-benchmark to JSON and the per-group log, then the report."""
    env = dict(os.environ, DTN_BENCH_DEVICE="cpu", DTN_BENCH_PRESET="smoke", DTN_BENCH_THREADS="1",
               DTN_BENCH_PROVIDERS="eager,fused,loop", PYTHONPATH=ROOT)
    for var in ("DTN_BENCH_SUBSET", "DTN_BENCH_DEADLINE", "DTN_BENCH_PRECISIONS", "TRITON_INTERPRET",
                "DTN_TRITON_ON_CPU"):
        env.pop(var, None)  # the Triton tests' interpreter settings must not leak into timing
    for var in [v for v in env if v.startswith("PYTEST_XDIST_")]:
        env.pop(var)  # under -n 2: pytest-benchmark reads PYTEST_XDIST_WORKER as xdist on and disables itself
    out = tmp_path / "res.json"
    env["DTN_BENCH_LOG"] = str(tmp_path / "cases.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         os.path.join(BENCH, "bench_embedding_bag.py"), os.path.join(BENCH, "bench_softmax_gate.py"),
         "-k", "not test_embedding_bag_fwd_bwd", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    groups = [b["extra_info"] for b in data["benchmarks"]]
    assert sorted((g["op"], g["precision"]) for g in groups) == [
        ("embedding_bag", "bf16"), ("embedding_bag", "fp32"), ("softmax_gate", "bf16"), ("softmax_gate", "fp32")]
    eb = next(g for g in groups if g["op"] == "embedding_bag" and g["precision"] == "fp32")
    assert {c["provider"] for c in eb["cases"]} == {"eager", "fused", "loop"}
    for c in eb["cases"]:
        assert c["median_ms"] > 0 and c["device_type"] == "cpu" and c["rounds"] == 3 and c["peak_mem_mb"] >= 0
        assert c["interleaved_with"] == ["eager", "fused", "loop"] and c["fp32_matmul"]
    # the Triton-backed fused softmax gate cannot be timed on CPU: skipped, with the reason kept
    assert any(s.get("op") == "softmax_gate" and "Triton" in s["reason"] for s in data["dtn_skipped"])
    lines = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert sorted((r["op"], r["provider"], r["precision"]) for r in lines if r["kind"] == "case") == sorted(
        (g["op"], c["provider"], g["precision"]) for g in groups for c in g["cases"])
    for path in (out, tmp_path / "cases.jsonl"):
        assert report.main([str(path), "--out", str(tmp_path / path.suffix[1:]), "--no-chart"]) == 0
        md = (tmp_path / path.suffix[1:] / "report.md").read_text()
        assert "| embedding_bag | fwd+bwd | 64 | bf16 |" in md
        assert "| embedding_bag | fwd+bwd | 64 | fp32 (ieee) |" in md


# ----------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_quality.sh", "cpu_suite.sh"], ids=["suite", "quality", "cpu"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", os.path.join(BENCH, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_test_selection_keeps_tests_that_declare_a_gpu(tmp_path):
    (tmp_path / "test_sel.py").write_text(
        "import pytest\n"
        "needs = pytest.mark.skipif(False, reason='needs a CUDA device and the extension')\n"
        "@pytest.mark.requires_cuda\n"
        "def test_marked(): pass\n"
        "@needs\n"
        "def test_skipif_names_cuda(): pass\n"
        "@pytest.mark.skipif(False, reason='no parquet engine')\n"
        "def test_other_skipif(): pass\n"
        "@pytest.mark.skipif(False, reason='TorchRec is not usable here: torchrec 1.8.0, fbgemm-gpu-cpu 1.8.0')\n"
        "def test_cpu_torchrec(): pass\n"
        "def test_emulated_cuda_algorithm_on_cpu(): pass\n")
    (tmp_path / "test_mod.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.skipif(False, reason='needs a GPU')\n"
        "def test_in_gpu_module(): pass\n")
    env = dict(os.environ, PYTHONPATH=BENCH)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_test_selection",
                           "-o", "markers=requires_cuda", "--collect-only", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    picked = sorted(line.split("::")[-1] for line in proc.stdout.splitlines() if "::" in line)
    assert picked == ["test_in_gpu_module", "test_marked", "test_skipif_names_cuda"]
    assert "3 deselected" in proc.stdout


def test_suite_records_every_stage_and_goes_on_after_a_timeout(tmp_path):
    """The suite's CPU check with a stage forced to time out, one that selects no test (failed, not
    ok) and the expensive stages left out: every stage gets a line in stages.jsonl, in the GPU
    run's order, the run goes on, the report lists the stages."""
    out = tmp_path / "suite"
    env = dict(os.environ, DTN_SUITE_CHECK="1", PYTHON=sys.executable, DTN_STAGE_BUDGET_TESTS_TRITON="1",
               DTN_SUITE_ONLY="env,tests-triton,tests-gpu,report", DTN_COMMIT="testcommit",
               DTN_SUITE_TEST_K="no_test_has_this_name")  # tests-gpu selects nothing: pytest exits 5
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_suite.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # a check run with anything not ok fails
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    status = {s["stage"]: s["status"] for s in stages}
    assert status == {"env": "ok", "build": "skipped", "compile-warm": "skipped", "bench-headline": "skipped",
                      "tests-triton": "timeout", "tests-gpu": "failed", "bandwidth": "skipped", "bench-core": "skipped",
                      "bench-rest": "skipped", "report": "failed"}
    order = [s["stage"] for s in stages]  # build and compile-warm run side by side: either may log first
    assert order[0] == "env" and set(order[1:3]) == {"build", "compile-warm"} and order[3] == "bench-headline"
    assert order[3:] == ["bench-headline", "tests-triton", "tests-gpu", "bandwidth", "bench-core", "bench-rest", "report"]
    timeout_ = next(s for s in stages if s["stage"] == "tests-triton")
    assert "timed out after 1s" in timeout_["reason"] and timeout_["budget_s"] == 1
    assert "no tests selected (pytest exit 5)" in next(s for s in stages if s["stage"] == "tests-gpu")["reason"]
    assert all(isinstance(s["seconds"], int) and s["seconds"] >= 0 for s in stages)
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["commit"] == "testcommit" and "pytest" in env_json["packages"]
    md = (out / "report.md").read_text()  # no benchmark ran, the report still lists the stages
    assert "No benchmark results" in md and "| tests-triton | timeout |" in md
    assert 'tar -czf "$OUT/suite.tar.gz"' in proc.stdout


def test_quality_script_writes_the_table_per_run_and_resumes(tmp_path):
    out = tmp_path / "q"
    env = dict(os.environ, DTN_SUITE_CHECK="1", PYTHON=sys.executable, DTN_QUALITY_DATA="synthetic",
               DTN_QUALITY_MODELS="shared_bottom,dtn", DTN_QUALITY_SEEDS="1", DTN_QUALITY_ROWS="1000")
    script = os.path.join(BENCH, "gpu_quality.sh")
    proc = subprocess.run(["bash", script, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("table written") >= 2  # after each model
    summary = json.loads((out / "table3.json").read_text())
    assert summary["seeds"] == {"shared_bottom": [1], "dtn": [1]} and summary["check"] is True
    assert summary["significance"] is None  # one seed: nothing to pair
    assert not list(out.glob("*/seed1/*.pt"))  # checkpoints removed, test predictions kept for the bootstrap
    assert len(list(out.glob("*/seed1/test_predictions.npz"))) == 2
    env["DTN_QUALITY_SEEDS"] = "1,2"
    proc = subprocess.run(["bash", script, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[shared_bottom seed 1] reusing" in proc.stdout
    summary = json.loads((out / "table3.json").read_text())
    assert summary["seeds"] == {"shared_bottom": [1, 2], "dtn": [1, 2]}
    sig = summary["significance"]
    assert [(r["model"], r["n"], r["resamples"]) for r in sig["rows"]] == [("shared_bottom", 2, 100)] * 2
    runs = {m: [json.loads((out / m / f"seed{s}" / "metrics.json").read_text()) for s in (1, 2)]
            for m in ("dtn", "shared_bottom")}
    for r in sig["rows"]:  # the difference is of the runs' own test AUCs, seed k with seed k
        diffs = [a["test"][r["task"]]["auc"] - b["test"][r["task"]]["auc"] for a, b in zip(runs["dtn"], runs["shared_bottom"])]
        assert r["mean_diff"] == pytest.approx(sum(diffs) / 2, abs=1e-9)
    md = (out / "table3.md").read_text()
    assert "| Shared-Bottom |" in md and "| DTN |" in md and "Seeds per model: Shared-Bottom [1, 2]" in md
    assert "Significance of DTN's test AUC differences, over seeds [1, 2] (100 bootstrap resamples)" in md
    env = dict(env, DTN_QUALITY_DATA="census", DTN_CENSUS_DIR=str(tmp_path / "nowhere"))
    (tmp_path / "nowhere").mkdir()
    proc = subprocess.run(["bash", script, str(tmp_path / "q2")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3 and "Census-Income data NOT FOUND" in proc.stdout


def test_report_grouped_and_cublas_route_columns(tmp_path):
    """Whole models in grouped mode get their own ratios (judged on the DTN step's targets), and the fused
    ops' cuBLAS route is reported against the Triton route."""
    provs = ["eager", "compile", "fused", "grouped", "fused_cublas"]
    recs = [_rec("model:dtn", p, "train", 2048, ms, "bf16", with_=provs)
            for p, ms in (("eager", 4.0), ("compile", 2.6), ("fused", 2.5), ("grouped", 1.6))]
    recs += [_rec("gated_cross", p, "fwd+bwd", 2048, ms, "bf16", with_=provs)
             for p, ms in (("eager", 3.0), ("compile", 2.0), ("fused", 1.0), ("fused_cublas", 1.5))]
    log = tmp_path / "cases.jsonl"
    _write_log(log, recs)
    assert report.main([str(log), "--out", str(tmp_path / "out"), "--no-chart"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| op |"))
    assert "grouped vs eager" in head and "cuBLAS route ms / Triton route ms" in head
    dtn = _row(md, "| model:dtn | train | 2048")
    assert "2.50x ✓" in dtn and "1.62x ✓" in dtn  # grouped: 4.0 / 1.6 vs eager (≥ 2), 2.6 / 1.6 vs compile (≥ 1.25)
    assert "1.50x" in _row(md, "| gated_cross | fwd+bwd | 2048")


def test_embedding_scale_grid_writes_step_and_memory_per_configuration(tmp_path):
    """bench_embedding_scale.py end to end at toy sizes: each configuration in its own process, the
    table with one row per (rows, optimizer), the ratios to the smallest tables, and the memory of
    a table big enough to see (26 x 20,000 rows x 16 fp32 = 33 MB) counted against its weights."""
    out = tmp_path / "scale.md"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_embedding_scale.py"), "--models", "mmoe",
                           "--rows", "10", "20000", "--optimizers", "sgd", "rowwise_adagrad", "--rounds", "1",
                           "--cpu-allocators", "caching", "system", "--warmup", "1", "--steps", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| mmoe |")]
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (n, o, a) for n in ("10", "20,000") for o in ("sgd", "rowwise_adagrad") for a in ("caching", "system")]
    assert rows[0][5] == "1.00x" and rows[4][5].endswith("x")
    big = {(r[2], r[3]): r for r in rows if r[1] == "20,000"}
    for opt, r in big.items():
        weights, warm = float(r[8].replace(",", "")), float(r[9].replace(",", ""))
        assert weights == 32  # 26 x 20,000 x 16 x 4 bytes in MiB, rounded
        assert warm >= weights, (opt, r)  # the tables themselves are part of the peak
