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
    """The rule the check enforces, read back from its output: every bf16/fp16/TF32 GEMM tile of 64+ rows."""
    _, rows = check
    tc = [r for r in rows if r["dot_m"] and r["dot_m"] >= 64 and r["precision"] != "fp32-ieee"]
    assert tc, "no tensor-core GEMM launch recorded"
    assert {r["mma"] for r in tc} == {"wgmma"}
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
