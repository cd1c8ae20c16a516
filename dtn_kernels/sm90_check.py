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
import subprocess
import sys
from dataclasses import dataclass, field

# the cases (the GPU tests import their shape lists from here) and the PTX readers
from .sm90_cases import (GATE_PAPER, GATED_CROSS_PAPER, GPU_TEST_SHAPES, GROUPED_PAPER,  # noqa: F401
                         HCNET_PAPER, HCNET_WIDE, MASK_BLOCK_PAPER, PRECISIONS, RUNNERS, Case, cases)
from .sm90_ptx import (DotSite, atomics, classify_dots, dot_problems, dot_sites, mma_kind,  # noqa: F401
                       ptxas_path, ptxas_stats)

SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KB)


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
