"""The benchmark suite's own machinery: case grids, a smoke run through pytest-benchmark, the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import harness  # noqa: E402
import report  # noqa: E402


def test_grids_follow_preset_and_subset(monkeypatch):
    monkeypatch.setenv("DTN_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("DTN_BENCH_SUBSET", raising=False)
    monkeypatch.setenv("DTN_BENCH_PRESET", "full")
    full = harness.shape_grid()
    assert (2048, "fwd") in full and (4096, "bwd") in full and (16384, "fwd+bwd") in full
    assert (16384, "fwd") not in full  # the sweep is forward + backward only
    monkeypatch.setenv("DTN_BENCH_PRESET", "quick")
    assert harness.shape_grid() == [(2048, "fwd"), (2048, "bwd"), (2048, "fwd+bwd"), (4096, "fwd+bwd")]
    monkeypatch.setenv("DTN_BENCH_PRESET", "full")
    monkeypatch.setenv("DTN_BENCH_SUBSET", "core")
    assert harness.shape_grid() == [(2048, "fwd+bwd")]
    monkeypatch.setenv("DTN_BENCH_SUBSET", "rest")
    assert (2048, "fwd+bwd") not in harness.shape_grid() and len(harness.shape_grid()) == len(full) - 1
    monkeypatch.setenv("DTN_BENCH_SUBSET", "most")
    with pytest.raises(ValueError, match="DTN_BENCH_SUBSET"):
        harness.shape_grid()


def test_provider_list_rejects_unknown(monkeypatch):
    monkeypatch.setenv("DTN_BENCH_PROVIDERS", "eager,fast")
    with pytest.raises(ValueError, match="fast"):
        harness.provider_list()
    monkeypatch.setenv("DTN_BENCH_PROVIDERS", "fused,eager")
    assert harness.provider_list() == ["eager", "fused"]


def _case(op, provider, mode, batch, ms, device_type="cuda", mem=1.0):
    return {"extra_info": {"op": op, "provider": provider, "mode": mode, "batch": batch, "median_ms": ms,
                           "peak_mem_mb": mem, "device": "Test GPU", "device_type": device_type, "torch": "x",
                           "triton": "y", "cuda": "13.0", "dtype": "float32", "threads": 1, "preset": "full"}}


def test_report_ratios_targets_and_chart(tmp_path):
    data = {"datetime": "2026-11-27", "benchmarks": [
        _case("gated_cross", "eager", "fwd+bwd", 2048, 3.0),
        _case("gated_cross", "compile", "fwd+bwd", 2048, 1.2),
        _case("gated_cross", "fused", "fwd+bwd", 2048, 1.0),  # 3.0x eager (meets 3x), 1.2x compile (misses 1.3x)
        _case("model:dtn", "eager", "train", 2048, 10.0),
        _case("model:dtn", "fused", "train", 2048, 4.0),  # 2.5x eager: meets 2x
        {"extra_info": {}, "name": "not a suite case"},
    ], "dtn_skipped": [{"test": "t1", "reason": "compile: budget"}, {"test": "t2", "reason": "compile: budget"}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--command", "bash x.sh"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| gated_cross | fwd+bwd | 2048"))
    assert "3.00x ✓" in row and "1.20x ✗" in row
    dtn_row = next(line for line in md.splitlines() if line.startswith("| model:dtn | train"))
    assert "2.50x ✓" in dtn_row
    assert "2 × compile: budget" in md and "`bash x.sh`" in md
    assert (tmp_path / "out" / "speedups.png").stat().st_size > 1000


def test_report_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert report.main([str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.json" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": [{"extra_info": {}}]}))
    assert report.main([str(other), "--out", str(tmp_path)]) == 2
    assert "no suite results" in capsys.readouterr().err


def test_smoke_suite_through_pytest_benchmark(tmp_path):
    """A tiny real run: the embedding bag (eager twin, C++ op, per-feature loop) and the softmax
    gate, through pytest-benchmark to JSON, then the report."""
    env = dict(os.environ, DTN_BENCH_DEVICE="cpu", DTN_BENCH_PRESET="smoke", DTN_BENCH_THREADS="1",
               DTN_BENCH_PROVIDERS="eager,fused,loop", PYTHONPATH=ROOT)
    for var in ("DTN_BENCH_SUBSET", "DTN_BENCH_DEADLINE", "TRITON_INTERPRET", "DTN_TRITON_ON_CPU"):
        env.pop(var, None)  # the Triton tests' interpreter settings must not leak into timing
    out = tmp_path / "res.json"
    env["DTN_BENCH_LOG"] = str(tmp_path / "cases.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         os.path.join(BENCH, "bench_embedding_bag.py"), os.path.join(BENCH, "bench_softmax_gate.py"),
         "-k", "not test_embedding_bag_fwd_bwd", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    got = {(i["op"], i["provider"]) for i in infos}
    assert ("embedding_bag", "eager") in got and ("embedding_bag", "loop") in got
    assert ("softmax_gate", "eager") in got
    for i in infos:
        assert i["median_ms"] > 0 and i["device_type"] == "cpu" and i["dtype"] == "float32"
        assert i["peak_mem_mb"] >= 0 and "torch" in i
    # the Triton-backed fused softmax gate cannot be timed on CPU: skipped, with the reason kept
    assert any("softmax_gate" in s["test"] and "Triton" in s["reason"] for s in data["dtn_skipped"])
    assert report.main([str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| embedding_bag | fwd+bwd | 64 |" in md
    # the per-case log holds the same cases and the skips, line by line (it survives a killed run)
    lines = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert sorted((r["op"], r["provider"]) for r in lines if r["kind"] == "case") == sorted(
        (i["op"], i["provider"]) for i in infos)
    assert any(r["kind"] == "skipped" and "Triton" in r["reason"] for r in lines)
    assert report.main([str(tmp_path / "cases.jsonl"), "--out", str(tmp_path / "rep2")]) == 0
    assert "| embedding_bag | fwd+bwd | 64 |" in (tmp_path / "rep2" / "report.md").read_text()
