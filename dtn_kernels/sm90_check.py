"""Offline sm_90 check: compile every Triton kernel variant the launchers pick, for an H100/H200,
without a GPU, and read what it compiles to.

    python -m dtn_kernels.sm90_check [--markdown FILE] [--json FILE] [--sms 132]

For each op at the paper's shapes (B 2048 and 4096, D = 624, h = 512, MaskNet 624 -> 640 -> 512
and wider blocks, HCNet over 32 fields with H = 2 and d_c = 16, gates over 4 and 6 experts) and at
the GPU tests' shapes, in fp32 (IEEE and TF32), bf16 and fp16, the real launchers run on ``meta``
tensors inside :func:`dtn_kernels.triton._launch.capture`: every launch compiles with Triton's own
compiler for ``sm_90`` (the installed triton; a stand-in driver reports the target) and is
recorded with its grid instead of running. The bundled ``ptxas -v --gpu-name=sm_90a`` then reports
registers and spills; the PTX's line information (``.loc``) shows, for every ``tl.dot`` of every
kernel (not per kernel), whether it became ``wgmma`` (Hopper tensor cores), ``mma.sync``
(Ampere-style) or FMAs.

It fails (exit status 1) on: a compile error; any spill at the paper's shapes; shared memory
above sm_90's 227 KB per block; atomics that are not relaxed; a bf16 / fp16 / TF32 dot with an M tile of 64 rows or more that does
not lower to wgmma (each dot judged on its own), or any such dot lowered to FMAs; a grid beyond CUDA's limits; and a kernel at the paper's shapes launched on fewer
programs than the card has SMs (``--sms``, 132 on H100 SXM and H200).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

PRECISIONS = {  # name -> (dtype name, allow_tf32)
    "fp32-ieee": ("float32", False),
    "fp32-tf32": ("float32", True),
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
}
SMEM_LIMIT = 232_448

# ----------------------------------------------------------------------------- shapes

# (B, D, gated)
GATED_CROSS_PAPER = [(2048, 624, True), (4096, 624, True), (2048, 624, False)]
# (B, din, hidden, dv, do): the paper block, the serial second block, wider blocks
MASK_BLOCK_PAPER = [(2048, 624, 640, 624, 512), (4096, 624, 640, 624, 512), (2048, 624, 640, 512, 512),
                    (2048, 624, 640, 624, 1024), (2048, 624, 640, 624, 2048)]
# (B, S, H, books, N, d_c, d, deterministic)
HCNET_PAPER = [(2048, 32, 2, 1, 100_000, 16, 16, False), (4096, 32, 2, 1, 100_000, 16, 16, False),
               (2048, 32, 2, 1, 100_000, 16, 16, True)]
HCNET_WIDE = [(64, 400, 2, 1, 100_000, 16, 16, False)]  # 79,800 crosses: past the 65,535 grid-y limit
# (B, din, K, h, masked)
GATE_PAPER = [(2048, 624, 4, 512, False), (2048, 624, 6, 512, True), (4096, 624, 6, 512, False)]

# grouped mode at the paper's DTN configuration (two tasks: 3 MFI modules, 2 HCNets each; gates over 6
# candidates, 9 with the TSN): (G, shape of one member)
GROUPED_PAPER = {
    "gated_cross": [(3, (2048, 624, True)), (3, (4096, 624, True))],
    "mask_block": [(3, (2048, 624, 640, 624, 512)), (3, (4096, 624, 640, 624, 512))],
    "hcnet": [(6, (2048, 32, 2, 1, 100_000, 16, 16, False)), (6, (4096, 32, 2, 1, 100_000, 16, 16, False)),
              (6, (2048, 32, 2, 1, 100_000, 16, 16, True))],
    "softmax_mix": [(1, (2048, 6, 512)), (1, (2048, 9, 512)), (1, (4096, 9, 512))],
}

# the GPU tests' shapes (tests/test_triton_*.py import these)
GPU_TEST_SHAPES = {
    "gated_cross": [(67, 45, True), (67, 45, False)],
    "mask_block": [(129, 96, 80, 96, 64), (33, 40, 24, 40, 1030)],
    "hcnet": [(300, 8, 2, 1, 1000, 16, 16, False), (300, 8, 2, 2, 1000, 16, 16, True)],
    "softmax_gate": [(131, 47, 9, 65, True)],
}


@dataclass
class Case:
    op: str
    shape: tuple
    precision: str
    paper: bool
    run: Callable = field(repr=False)
    group: int = 0  # > 0: a group of that many modules in one launch (grouped mode)

    @property
    def label(self) -> str:
        return f"{self.op}{self.shape}{f' x{self.group} grouped' if self.group else ''} {self.precision}"


def _t(*shape, dtype="float32", group: int = 0):
    if group:
        shape = (group, *shape)
    return _t0(*shape, dtype=dtype)


def _t0(*shape, dtype="float32"):
    import torch

    return torch.empty(shape, device="meta", dtype=getattr(torch, dtype))


def _gated_cross(shape, dt, tf32, G=0):
    """One layer, or (G > 0) a group's first layer (x0 = xl = e shared) and a later one."""
    from .triton.triton_gated_cross import gated_cross_backward, gated_cross_forward

    B, D, gated = shape
    x0, w, b = _t(B, D, dtype=dt), _t(D, D, dtype=dt, group=G), _t(D, dtype=dt, group=G)
    wg = _t(D, D, dtype=dt, group=G) if gated else None
    for xl in ([x0] if not G else [x0, _t(B, D, dtype=dt, group=G)]):
        _, z, a = gated_cross_forward(x0, xl, w, b, wg, tf32)
        gated_cross_backward(_t(B, D, dtype=dt, group=G), x0, xl, w, b, wg, z, a, tf32)


def _mask_block(shape, dt, tf32, G=0):
    from .triton.triton_masknet import mask_block_backward, mask_block_forward

    B, din, hm, dv, do = shape
    e, v = _t(B, din, dtype=dt), _t(B, dv, dtype=dt, group=G)
    w1, b1 = _t(hm, din, dtype=dt, group=G), _t(hm, dtype=dt, group=G)
    w2, b2 = _t(dv, hm, dtype=dt, group=G), _t(dv, dtype=dt, group=G)
    w3, gamma, beta = _t(do, dv, dtype=dt, group=G), _t(do, dtype=dt, group=G), _t(do, dtype=dt, group=G)
    out, hid, mask, z, mean, rstd = mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, 1e-5, tf32)
    mask_block_backward(_t(B, do, dtype=dt, group=G), e, v, w1, w2, w3, gamma, beta, hid, mask, z, mean, rstd,
                        tf32)


def _hcnet(shape, dt, tf32, G=0):
    from .triton.triton_hcnet import hcnet_backward, hcnet_forward

    B, S, H, books, N, dc, d, det = shape
    M = S * (S - 1) // 2
    ids, salts, seeds = _t(B, S, dtype="int64"), _t(S, dtype="int64"), _t(H, dtype="int64", group=G)
    cb, wr = _t(books, N, dc, dtype=dt, group=G), _t(d, H * dc, dtype=dt, group=G)
    attn = _t(B, M, dtype=dt, group=G)
    hcnet_forward(ids, salts, seeds, cb, wr, attn, tf32)
    hcnet_backward(_t(B, S, d, dtype=dt, group=G), ids, salts, seeds, cb, wr, attn, det, tf32)


def _softmax_gate(shape, dt, tf32):
    from .triton.triton_softmax_gate import softmax_gate_backward, softmax_gate_forward

    B, din, K, h, masked = shape
    x, experts, w, b = _t(B, din, dtype=dt), _t(B, K, h, dtype=dt), _t(K, din, dtype=dt), _t(K, dtype=dt)
    mask = _t(K, dtype="bool") if masked else None
    _, wts = softmax_gate_forward(x, experts, w, b, mask, tf32)
    softmax_gate_backward(_t(B, h, dtype=dt), _t(B, K, dtype=dt), x, experts, w, wts, tf32)


def _softmax_mix(shape, dt, tf32, G=0):
    """A gate from given logits: a column slice of every task's logits from one GEMM."""
    from .triton.triton_softmax_gate import softmax_gate_backward, softmax_gate_forward

    B, K, h = shape
    logits, experts = _t(B, 2 * K, dtype=dt)[:, :K], _t(B, K, h, dtype=dt)
    _, wts = softmax_gate_forward(logits, experts, None, None, None, tf32)
    softmax_gate_backward(_t(B, h, dtype=dt), None, logits, experts, None, wts, tf32)


RUNNERS = {"gated_cross": _gated_cross, "mask_block": _mask_block, "hcnet": _hcnet, "softmax_gate": _softmax_gate,
           "softmax_mix": _softmax_mix}


def cases() -> list[Case]:
    out = []
    paper = {"gated_cross": GATED_CROSS_PAPER, "mask_block": MASK_BLOCK_PAPER, "hcnet": HCNET_PAPER,
             "softmax_gate": GATE_PAPER}
    for op, shapes in paper.items():
        for shape in shapes:
            for prec in PRECISIONS:
                out.append(Case(op, shape, prec, True, RUNNERS[op]))
    for op, entries in GROUPED_PAPER.items():
        for G, shape in entries:
            for prec in PRECISIONS:
                out.append(Case(op, shape, prec, True, RUNNERS[op], group=G))
    for shape in HCNET_WIDE:
        out.append(Case("hcnet", shape, "bf16", False, _hcnet))
    for op, shapes in GPU_TEST_SHAPES.items():
        for shape in shapes:
            for prec in PRECISIONS:
                out.append(Case(op, shape, prec, False, RUNNERS[op]))
    return out


# ----------------------------------------------------------------------------- ptxas


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


# ----------------------------------------------------------------------------- the check


@dataclass
class Row:
    case: str
    op: str
    precision: str
    paper: bool
    kernel: str
    config: str
    grid: tuple
    programs: int
    regs: int = 0
    spill: int = 0
    smem: int = 0
    mma: str = "-"
    atomics: str = "-"
    dot_m: int | None = None
    dots: list = field(default_factory=list)  # per tl.dot: {"line", "name", "m", "mma"}
    problems: list = field(default_factory=list)


def _config(rec) -> str:
    keys = ("BM", "BN", "BK", "BB", "BD", "BH", "BDC", "BK")
    parts = [f"{k}={rec.constexprs[k]}" for k in dict.fromkeys(keys) if k in rec.constexprs]
    flags = [k for k in ("FROM_PRE", "GATED", "HAS_A2", "SHARED", "DETERMINISTIC", "HAS_MASK")
             if rec.constexprs.get(k) is True]
    if "EPI" in rec.constexprs:
        flags.append(f"EPI={rec.constexprs['EPI']}")
    return " ".join(parts + flags + [f"w{rec.num_warps}", f"s{rec.num_stages}"])


def run_check(num_sms: int = 132, only: str | None = None, progress=None) -> list[Row]:
    import torch

    from .triton._launch import capture

    rows: list[Row] = []
    stats_cache: dict = {}
    for case in cases():
        if only and case.op != only:
            continue
        dt, tf32 = PRECISIONS[case.precision]
        with capture(num_sms=num_sms) as cap:
            try:
                case.run(case.shape, dt, tf32, case.group) if case.group else case.run(case.shape, dt, tf32)
            except Exception as exc:  # a launcher that refuses the shape (e.g. a grid limit) is a finding
                rows.append(Row(case.label, case.op, case.precision, case.paper, "(launcher)", "", (), 0,
                                problems=[f"{type(exc).__name__}: {exc}"]))
                continue
        for rec in cap.launches:
            programs = 1
            for g in rec.grid:
                programs *= g
            row = Row(case.label, case.op, case.precision, case.paper, rec.kernel, _config(rec), rec.grid, programs,
                      dot_m=rec.dot_m)
            if rec.error or rec.compiled is None:
                row.problems.append(f"compile error: {rec.error}")
                rows.append(row)
                continue
            ptx = rec.compiled.asm["ptx"]
            key = (rec.kernel, hash(ptx))
            if key not in stats_cache:
                stats_cache[key] = ptxas_stats(ptx)
            st = stats_cache[key]
            row.regs, row.spill = st["regs"], st["spill_st"] + st["spill_ld"]
            row.smem = int(rec.compiled.metadata.shared)
            row.mma = mma_kind(ptx)
            row.atomics = atomics(ptx)
            if row.atomics not in ("-",) and any(a != "relaxed" and a != "relaxed.v4" for a in row.atomics.split(",")):
                row.problems.append(f"atomics with {row.atomics} semantics (want relaxed)")
            if case.paper and row.spill:
                row.problems.append(f"spills {row.spill} B at the paper's shapes")
            if row.smem > SMEM_LIMIT:
                row.problems.append(f"shared memory {row.smem} B > {SMEM_LIMIT}")
            tensor_core = dt in ("bfloat16", "float16") or tf32
            sites = dot_sites(rec.source)
            kinds = classify_dots(ptx, sites)
            row.dots = [{"line": d.line, "name": d.name, "mma": kinds.get(d.line, "-"),
                         "m": rec.constexprs.get(d.m_param) if d.m_param else rec.dot_m} for d in sites]
            row.problems += dot_problems(row.dots, case.precision, tensor_core)
            used = sorted({d["mma"] for d in row.dots if d["mma"] != "-"})
            if used:  # the kernel's column lists every kind its dots use, not only the strongest
                row.mma = "+".join(used)
            if case.paper and programs < num_sms:
                row.problems.append(f"{programs} programs < {num_sms} SMs at the paper's shapes")
            rows.append(row)
        if progress:
            progress(case)
    del torch
    return rows


# ----------------------------------------------------------------------------- reporting


def variants(rows: list[Row]) -> list[dict]:
    """One line per compiled kernel variant (kernel, precision, configuration), with the shapes that launch it."""
    table: dict = {}
    for r in rows:
        key = (r.op, r.kernel, r.precision, r.config)
        v = table.setdefault(key, {"op": r.op, "kernel": r.kernel, "precision": r.precision, "config": r.config,
                                   "regs": r.regs, "spill": r.spill, "smem": r.smem, "mma": r.mma,
                                   "atomics": r.atomics, "dots": r.dots,
                                   "min_programs_paper": None, "paper": False, "problems": []})
        if r.paper:
            v["paper"] = True
            mp = v["min_programs_paper"]
            v["min_programs_paper"] = r.programs if mp is None else min(mp, r.programs)
        v["problems"] += [f"{r.case}: {p}" for p in r.problems]
    return list(table.values())


def dot_table(rows: list[Row]) -> list[str]:
    """Markdown lines: every tl.dot of every kernel, per precision, with its M tile(s) and the MMA it
    lowered to (the paper's shapes, and the tests' where only those launch it)."""
    table: dict = {}
    for r in rows:
        for d in r.dots:
            key = (r.op, r.kernel, d["line"], d["name"], r.precision)
            e = table.setdefault(key, {"m": set(), "mma": set(), "paper": False})
            if d["mma"] != "-":
                e["mma"].add(d["mma"])
                if d["m"] is not None:
                    e["m"].add(d["m"])
            e["paper"] |= r.paper
    out = ["| op | kernel | dot (source line) | precision | M tile | MMA |", "|---|---|---|---|---|---|"]
    for (op, kernel, line, name, prec), e in table.items():
        m = "/".join(str(x) for x in sorted(e["m"])) or "-"
        mma = "+".join(sorted(e["mma"])) or "- (not in this specialisation)"
        out.append(f"| {op} | `{kernel}` | `{name}` (line {line}) | {prec} | {m} | {mma} |")
    return out


def markdown(rows: list[Row], num_sms: int, header: str = "") -> str:
    import triton

    lines = [header or f"sm_90 offline check (triton {triton.__version__}, ptxas -v --gpu-name=sm_90a, {num_sms} SMs)",
             "",
             "| op | kernel | precision | tiles | regs | spill B | smem KB | MMA | atomics | min programs (paper) | status |",
             "|---|---|---|---|---:|---:|---:|---|---|---:|---|"]
    for v in variants(rows):
        status = "ok" if not v["problems"] else "FAIL"
        mp = v["min_programs_paper"] if v["min_programs_paper"] is not None else "(tests only)"
        lines.append(f"| {v['op']} | `{v['kernel']}` | {v['precision']} | {v['config']} | {v['regs']} | {v['spill']} | "
                     f"{v['smem'] / 1024:.1f} | {v['mma']} | {v['atomics']} | {mp} | {status} |")
    lines += ["", *dot_table(rows)]
    problems = [p for v in variants(rows) for p in v["problems"]]
    lines.append("")
    lines.append(f"{len(variants(rows))} kernel variants from {len({r.case for r in rows})} cases; "
                 f"{len(problems)} problem(s).")
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table here too")
    ap.add_argument("--json", help="write every launch (case, kernel, grid, registers, ...) as JSON")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the target card (H100 SXM / H200: 132)")
    ap.add_argument("--op", choices=sorted(RUNNERS), help="check one op only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter replaces triton's compiler: run again without it
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DTN_TRITON_ON_CPU")}
        return subprocess.call([sys.executable, "-m", "dtn_kernels.sm90_check", *(argv or sys.argv[1:])], env=env)
    done = []

    def progress(case):
        done.append(case)
        print(f"\r[{len(done)}] {case.label:<70}", end="", file=sys.stderr, flush=True)

    rows = run_check(args.sms, args.op, progress)
    print(file=sys.stderr)
    text = markdown(rows, args.sms)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in rows], fh, indent=1, default=str)
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
