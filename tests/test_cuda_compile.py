"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) with nvcc and torch's headers.

Runs on machines without a GPU: it proves the kernels build, not that they are right
(tests/test_embedding_bag.py runs them when a GPU is present). One nvcc invocation.

A successful compile is remembered in ``results/tmp/test-cache`` (``DTN_TEST_CACHE`` overrides) under
the digest of everything the compile reads -- every file under csrc/, the nvcc command's flags,
nvcc's version, torch's version and headers' location -- so CI, which runs this test and then the
GPU suite's CPU check (which runs it again), compiles once. Any change to an input is a new digest
and a real compile; a failed compile is never remembered.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DTN_TEST_CACHE") or ROOT / "results" / "tmp" / "test-cache")
CU_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.skipif(not CU_SOURCES, reason="no CUDA sources in csrc/cuda")
def test_cuda_sources_compile(tmp_path):
    cuda_inc = Path(NVCC).resolve().parents[1] / "include"
    incs = include_paths("cpu") + [str(ROOT / "csrc"), str(cuda_inc), sysconfig.get_paths()["include"]]
    torch_inc = Path(include_paths("cpu")[0])
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # CPU wheels of torch ship c10/cuda headers but not this build-generated one; supply
        # what a CUDA build of torch generates (a shared-library build) so the check can run.
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(str(tmp_path / "shim"))
    # one translation unit that includes every .cu, so the check is a single nvcc call
    unity = tmp_path / "all_cuda.cu"
    unity.write_text("".join(f'#include "{p}"\n' for p in CU_SOURCES))
    cmd = [
        NVCC, "-c", str(unity), "-o", str(tmp_path / "all_cuda.o"),
        "-std=c++17", "--expt-relaxed-constexpr", "-O1", "-arch=sm_90", "-DDTN_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler", "-fPIC", "-w", "-Xptxas", "-v",
    ] + [f"-I{p}" for p in incs]
    marker = CACHE / f"nvcc-{_inputs_digest(cmd, tmp_path)}.ok"
    if marker.exists():
        print(f"nvcc compile of these exact inputs already succeeded in this tree ({marker.name})")
        return
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-6000:]}"
    # ptxas -v: "N bytes stack frame, N bytes spill stores, N bytes spill loads" per kernel
    report = proc.stdout + proc.stderr
    assert "spill stores" in report, "ptxas -v printed no register report"
    spills = re.findall(r"Function properties for (\S+)\n\s*\d+ bytes stack frame, ([1-9]\d*) bytes spill stores", report)
    assert not spills, f"kernels that spill registers: {spills}"
    CACHE.mkdir(parents=True, exist_ok=True)
    marker.write_text(" ".join(cmd) + "\n")


def _inputs_digest(cmd: list[str], tmp_path: Path) -> str:
    """Digest of what the compile reads: csrc/ (every file), the command with this run's temp folder
    taken out, nvcc's version and torch's version."""
    h = hashlib.sha256()
    for path in sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(cmd).replace(str(tmp_path), "<tmp>").encode())
    h.update(subprocess.run([NVCC, "--version"], capture_output=True, text=True, timeout=60).stdout.encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:24]
