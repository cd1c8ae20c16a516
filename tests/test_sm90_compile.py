"""The offline sm_90 check (``python -m dtn_kernels.sm90_check``): every Triton kernel variant the
launchers pick, at the paper's shapes and the GPU tests' shapes, in fp32 (IEEE and TF32), bf16 and
fp16, compiled for an H100/H200 by the installed triton and read with its ptxas -- no GPU needed.

It runs in a subprocess because the rest of the test session imports triton with
TRITON_INTERPRET=1, which replaces the compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DTN_TRITON_ON_CPU")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "dtn_kernels.sm90_check", "--json", str(out / "rows.json"),
                           "--markdown", str(out / "table.md")], capture_output=True, text=True, env=env,
                          timeout=1800, cwd=ROOT)
    rows = json.loads((out / "rows.json").read_text()) if (out / "rows.json").exists() else []
    return proc, rows


def test_check_passes(check):
    proc, rows = check
    assert proc.returncode == 0, f"sm_90 check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert rows and not any(r["problems"] for r in rows)


def test_every_op_and_precision_was_compiled(check):
    _, rows = check
    seen = {(r["op"], r["precision"]) for r in rows if r["regs"] > 0}
    for op in ("gated_cross", "mask_block", "hcnet", "softmax_gate"):
        for prec in ("fp32-ieee", "fp32-tf32", "bf16", "fp16"):
            assert (op, prec) in seen, f"{op} {prec}: no kernel compiled"


def test_tensor_core_gemms_use_wgmma(check):
    """Every launch with a bf16/fp16/TF32 GEMM tile of 64+ rows has wgmma among its dots' MMAs (the
    per-dot rule is the next test)."""
    _, rows = check
    tc = [r for r in rows if r["dot_m"] and r["dot_m"] >= 64 and r["precision"] != "fp32-ieee"]
    assert tc, "no tensor-core GEMM launch recorded"
    assert all("wgmma" in r["mma"].split("+") for r in tc)
    # IEEE fp32 never runs a Triton GEMM tile of 64+ rows: those GEMMs go to cuBLAS
    assert not [r for r in rows if r["precision"] == "fp32-ieee" and r["kernel"] == "_gemm_kernel"]


def test_paper_shapes_fill_the_card(check):
    _, rows = check
    paper = [r for r in rows if r["paper"]]
    assert paper and min(r["programs"] for r in paper) >= 132
    assert all(r["spill"] == 0 for r in paper)


def test_many_crosses_use_a_one_dimensional_grid(check):
    """400 fields = 79,800 crosses: past CUDA's 65,535 limit on grid y/z; the backward's grid is 1-D."""
    _, rows = check
    wide = [r for r in rows if r["case"].startswith("hcnet(64, 400")]
    assert wide and all(not r["problems"] for r in wide)
    bwd = [r for r in wide if r["kernel"] == "_hcnet_bwd_kernel"]
    assert bwd and all(len(r["grid"]) == 1 for r in bwd)


def test_tensor_core_dots_use_wgmma_and_the_small_ones_are_listed(check):
    """Per dot, not per kernel: every bf16/fp16/TF32 dot with an M tile of 64+ rows is wgmma; the one
    dot with a smaller tile at the paper's shapes, HCNet's 16-row dW_o partial, is mma.sync."""
    _, rows = check
    dots = [(r["kernel"], d) for r in rows if r["precision"] != "fp32-ieee" for d in r["dots"] if d["mma"] != "-"]
    assert dots
    assert {d["mma"] for _, d in dots if d["m"] is not None and d["m"] >= 64} == {"wgmma"}
    small = {(k, d["name"], d["mma"]) for k, d in dots if d["m"] is not None and d["m"] < 64}
    paper_small = {(r["kernel"], d["name"], d["mma"]) for r in rows if r["paper"] and r["precision"] != "fp32-ieee"
                   for d in r["dots"] if d["m"] is not None and d["m"] < 64 and d["mma"] != "-"}
    assert paper_small == {("_hcnet_bwd_kernel", "dwr", "mma.sync")}
    assert small >= paper_small


# ----------------------------------------------------------------------------- per-dot classification, no compile

SOURCE = ("/src/k.py", 10, ["def k(a, b):\n",
                            "    g = tl.dot(a, b)\n",
                            "    x = 1  # not a tl.dot( call\n",
                            "    acc = tl.dot(c, d, acc)  # dot-m: BD\n",
                            "    u = tl.dot(e, f)\n"])
PTX = """.file 1 "/src/k.py"
.file 2 "/other/lib.py"
.loc 1 11 5
  wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r1}, %rd1, %rd2;
.loc 2 13 1
  fma.rn.f32 %f1, %f2, %f3, %f4;
.loc 1 13 7
  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
.loc 1 20 1
  fma.rn.f32 %f5, %f6, %f7, %f8;
"""


def test_dot_sites_come_from_the_kernel_source():
    from dtn_kernels.sm90_check import dot_sites

    sites = dot_sites(SOURCE)
    assert [(s.line, s.name, s.m_param) for s in sites] == [(11, "g", None), (13, "acc", "BD"), (14, "u", None)]


def test_each_dot_is_classified_from_the_instructions_at_its_line():
    """One kernel, two dots on different MMAs: the kernel-level view (any wgmma in the PTX) would call
    both wgmma; per dot, line 13 is mma.sync, line 14 has no instruction (not in this specialisation),
    and an FMA at the same line number of another file is not counted."""
    from dtn_kernels.sm90_check import classify_dots, dot_sites, mma_kind

    kinds = classify_dots(PTX, dot_sites(SOURCE))
    assert kinds == {11: "wgmma", 13: "mma.sync", 14: "-"}
    assert mma_kind(PTX) == "wgmma"


def test_the_wgmma_rule_judges_each_dot():
    from dtn_kernels.sm90_check import dot_problems

    dots = [{"line": 11, "name": "g", "m": 64, "mma": "wgmma"}, {"line": 13, "name": "acc", "m": 16, "mma": "mma.sync"}]
    assert dot_problems(dots, "bf16", True) == []
    dots[1]["m"] = 64  # a 64-row tile on mma.sync is a finding
    assert dot_problems(dots, "bf16", True) == ["dot acc (line 13, M tile 64) in bf16 lowered to mma.sync, not wgmma"]
    fma = [{"line": 14, "name": "u", "m": 16, "mma": "fma"}]
    assert dot_problems(fma, "fp32-tf32", True) and not dot_problems(fma, "fp32-ieee", False)
    assert dot_problems([{"line": 14, "name": "u", "m": 128, "mma": "-"}], "bf16", True) == []
