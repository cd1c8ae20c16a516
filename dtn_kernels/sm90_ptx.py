"""Reading what a kernel compiled to, for the offline sm_90 check: ``ptxas -v`` statistics
(registers, spills, stack), the atomics' memory semantics, and per ``tl.dot`` of the source the MMA
its PTX instructions lowered to (wgmma, mma.sync or FMAs) with the rule each dot must meet.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

def ptxas_path(arch: int = 90) -> str:
    """The ptxas triton itself uses for ``arch`` (it bundles more than one; TRITON_PTXAS_PATH wins)."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    return getattr(tool, "path", tool)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_stats(ptx: str, arch: str = "sm_90a") -> dict:
    """Registers, spill bytes and stack frame of the (single) kernel in ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(proc.stderr)
        out[key] = int(m.group(1)) if m else 0
    return out


def atomics(ptx: str) -> str:
    """The memory semantics of the kernel's atomics ("-" when it has none), e.g. "relaxed.v4"."""
    found = sorted({m.group(1) + (".v4" if m.group(2) else "")
                    for m in re.finditer(r"\b(?:red|atom)\.global\.(?:gpu\.|sys\.)?(relaxed|acq_rel|acquire|release)?"
                                         r"[\w.]*?(\.v4)?\.", ptx)})
    return ",".join(f or "default" for f in found) if found else "-"


def mma_kind(ptx: str) -> str:
    """The strongest MMA anywhere in ``ptx`` (a kernel-level summary; :func:`classify_dots` is per dot)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma" if re.search(r"\bfma\.rn\.f32", ptx) else "-"


_DOT_RE = re.compile(r"\btl\.dot\(")
_DOT_M_RE = re.compile(r"#\s*dot-m:\s*(\w+)")
_ASSIGN_RE = re.compile(r"^\s*(\w+)\s*(?:\+=|=)")


@dataclass
class DotSite:
    """One ``tl.dot`` call of a kernel's source: where it is, what it computes (the name it is assigned
    to), the constexpr holding its M tile if it is not the launch's (``# dot-m: NAME``)."""

    file: str
    line: int
    name: str
    m_param: str | None = None


def dot_sites(source) -> list[DotSite]:
    """The ``tl.dot`` calls in a kernel's source (``(file, first line, lines)``, as ``_launch`` records it)."""
    if not source:
        return []
    file, first, lines = source
    out = []
    for i, text in enumerate(lines):
        if _DOT_RE.search(text.split("#", 1)[0]):
            m = _DOT_M_RE.search(text)
            a = _ASSIGN_RE.match(text)
            out.append(DotSite(file, first + i, a.group(1) if a else "dot", m.group(1) if m else None))
    return out


def dot_problems(dots: list[dict], precision: str, tensor_core: bool) -> list[str]:
    """The wgmma rule, per dot: on tensor cores (bf16 / fp16 / TF32) a dot with an M tile of 64 rows or
    more must lower to wgmma, and no dot may fall back to FMAs. A dot with a smaller M tile may use
    mma.sync (wgmma's smallest M is 64 per warpgroup). A dot absent from this specialisation ("-")
    or of a variant without a GEMM tile (M None) is not judged."""
    out = []
    for d in dots:
        kind, m = d["mma"], d["m"]
        if not tensor_core or kind == "-" or m is None:
            continue
        if kind == "fma":
            out.append(f"dot {d['name']} (line {d['line']}) in {precision} lowered to FMAs")
        elif m >= 64 and kind != "wgmma":
            out.append(f"dot {d['name']} (line {d['line']}, M tile {m}) in {precision} lowered to {kind}, not wgmma")
    return out


def _same_file(ptx_file: str, file: str) -> bool:
    if os.path.realpath(ptx_file) == os.path.realpath(file):
        return True
    return os.path.basename(ptx_file) == os.path.basename(file)


def classify_dots(ptx: str, sites: list[DotSite]) -> dict[int, str]:
    """Per ``tl.dot`` site (its source line): the MMA its instructions lowered to, read from the PTX's
    line information (``.loc FILE LINE COL`` before each instruction): "wgmma" (``wgmma.mma_async``),
    "mma.sync", "fma" (``fma.rn.f32``: an FMA dot) or "-" (no instruction at that line: a dot that a
    constexpr branch removed from this specialisation)."""
    files = {m.group(1): m.group(2) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    want = {s.line: s for s in sites}
    found: dict[int, set] = {line: set() for line in want}
    cur = None
    for text in ptx.splitlines():
        m = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)\s", text)
        if m:
            line = int(m.group(2))
            site = want.get(line)
            cur = line if site is not None and _same_file(files.get(m.group(1), ""), site.file) else None
            continue
        if cur is None:
            continue
        if "wgmma.mma_async" in text:
            found[cur].add("wgmma")
        elif re.search(r"\bmma\.sync", text):
            found[cur].add("mma.sync")
        elif re.search(r"\bfma\.rn\.f32", text):
            found[cur].add("fma")
    out = {}
    for line, kinds in found.items():
        out[line] = next((k for k in ("wgmma", "mma.sync", "fma") if k in kinds), "-")
    return out

