"""Benchmark report: the suite's results -> a Markdown table of speed-ups, targets and roofline fractions.

    python benchmarks/report.py RESULTS [MORE ...] --out DIR [--stages stages.jsonl] [--env env.json]
                                [--history benchmarks/results/history.jsonl] [--commit SHA] [--command CMD]
    python benchmarks/report.py --history benchmarks/results/history.jsonl --out DIR     (history only)

RESULTS: the harness's per-case log (``DTN_BENCH_LOG``, ``.jsonl``; it survives a run cut short) or
pytest-benchmark ``--benchmark-json`` files. Writes ``DIR/report.md`` (also printed) and, when
matplotlib is installed, ``DIR/speedups.png`` (without it the Markdown is complete and says so).

Times are each provider's median over interleaved rounds (CUDA events on GPU, wall clock on CPU;
see benchmarks/harness.py); speed-ups are ratios of medians from the same group: ``eager / fused``,
``compile / fused``, ``compile / compile_fused``. On CUDA the project's targets are marked at the
paper's batch sizes (forward + backward for ops, the training step for DTN), in both precisions:
fused vs eager >= 2x gated cross, 1.8x MaskNet block, 5x HCNet, 3x softmax gate; fused vs
torch.compile >= 1.3x for every op; the DTN training step >= 2x eager and >= 1.25x compile; every
op at >= 50% of its roofline floor.

Roofline: ``benchmarks/roofline.py`` (``floor_ms(op, mode, batch, precision, device_name)``, with
precision ``bf16`` / ``fp32-tf32`` / ``fp32-ieee``) gives each group's floor; the report shows each
measured median as a fraction of it (floor / measured). Without the module, or where it returns
None, the column stays blank.

History: ``--history PATH`` appends one line per group of this run (device, commit, versions,
precision, medians) to PATH, skipping a run already there, and adds a history section when PATH
holds more than one run on this device (``history.png`` too, with matplotlib).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDER_ORDER = ("eager", "compile", "fused", "compile_fused", "fused_cublas", "fused_graph", "grouped", "compile_grouped",
                  "grouped_graph", "loop")
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2, "train": 3, "infer": 4}
PRECISION_ORDER = {"bf16": 0, "fp32": 1}
PAPER_BATCHES = (2048, 4096)
# fused vs eager targets per op (GPU, paper batches, forward + backward, both precisions)
EAGER_TARGETS = {"gated_cross": 2.0, "mask_block": 1.8, "hcnet": 5.0, "softmax_gate": 3.0}
OPS = ("gated_cross", "mask_block", "hcnet", "softmax_gate", "embedding_bag")
OP_COMPILE_TARGET = 1.3  # every op: fused vs torch.compile of the reference
MODEL_TARGETS = {("model:dtn", "train"): (2.0, 1.25)}  # (vs eager, vs compile)
ROOFLINE_TARGET = 0.5  # every op: at least half of its roofline floor's speed


class ReportError(ValueError):
    """Results that are not this suite's."""


# ----------------------------------------------------------------------------- loading


def load(paths: list[str]) -> tuple[list[dict], list[dict], dict]:
    """The cases to report (one record per group and provider), the skipped ones, the environment."""
    records, skipped = [], []
    for path in paths:
        if not os.path.exists(path) and len(paths) > 1:  # e.g. a part of the GPU run that did not finish
            print(f"report: {path} is missing; reporting the other files", file=sys.stderr)
            continue
        try:
            with open(path) as fh:
                data = _from_log(fh, path) if path.endswith(".jsonl") else json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: cannot read benchmark results ({exc})") from exc
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise ReportError(f"{path}: no 'benchmarks' list; is it pytest-benchmark --benchmark-json output?")
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "cases" in info:  # a group (benchmarks/harness.py run_group)
                records += [dict(c, datetime=data.get("datetime")) for c in info["cases"]]
            elif "op" in info and "median_ms" in info:  # one case (the earlier per-case format)
                records.append(dict(info, datetime=data.get("datetime")))
        skipped += data.get("dtn_skipped", [])
    cases = select(records)
    if not cases:
        raise ReportError(f"no suite results in {paths}")
    first = cases[0]
    env = {k: first.get(k) for k in ("device", "device_type", "torch", "triton", "cuda", "fp32_matmul", "threads",
                                     "preset", "commit", "python")}
    env["datetime"] = first.get("datetime") or min(c.get("measured_at") or "" for c in cases) or None
    return cases, _dedupe(skipped), env


def _from_log(fh, path: str) -> dict:
    """A DTN_BENCH_LOG file (one JSON object a line) in the shape of pytest-benchmark's JSON."""
    benchmarks, skipped = [], []
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if n > 1 and not fh.read().strip():  # the last line of a run killed mid-write
                print(f"report: {path}: ignoring a truncated last line {n}", file=sys.stderr)
                break
            raise ReportError(f"{path}: line {n} is not JSON ({exc})") from exc
        kind = rec.pop("kind", None)
        if kind == "case":
            benchmarks.append({"extra_info": rec})
        elif kind in ("skipped", "error"):  # an error record carries "error": true
            skipped.append(rec)
    return {"benchmarks": benchmarks, "dtn_skipped": skipped}


def group_key(c: dict) -> tuple:
    return (c["op"], c["mode"], int(c["batch"]), c.get("precision", "fp32"))


def select(records: list[dict]) -> list[dict]:
    """Per group key, the records of its last finished timing (``final``), else of its last
    partial one (eager / fused before a compile that did not finish)."""
    by_key: dict = defaultdict(list)
    for r in records:
        r.setdefault("precision", "fp32")
        by_key[group_key(r)].append(r)
    out = []
    for recs in by_key.values():
        finals = [r for r in recs if r.get("final", True)]
        pool = finals or recs
        gid = pool[-1].get("group_id")
        chosen = [r for r in pool if r.get("group_id") == gid] if gid else pool
        last = {}
        for r in chosen:  # one record per provider (the last)
            last[r["provider"]] = r
        out += list(last.values())
    return out


def _dedupe(skipped: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in skipped:
        key = (s.get("test"), s.get("provider"), s.get("reason"))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# ----------------------------------------------------------------------------- rows and targets


def _roofline():
    """benchmarks/roofline.py's floor_ms, or (None, why not)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        module = importlib.import_module("roofline")
    except ModuleNotFoundError as exc:
        if exc.name == "roofline":
            return None, "benchmarks/roofline.py is not there"
        return None, f"benchmarks/roofline.py could not be imported ({exc})"
    except Exception as exc:  # noqa: BLE001 -- a broken roofline module must not cost the report
        return None, f"benchmarks/roofline.py could not be imported ({type(exc).__name__}: {exc})"
    fn = getattr(module, "floor_ms", None)
    if fn is None:
        return None, "benchmarks/roofline.py has no floor_ms"
    return fn, None


def numerics_failures(skipped: list[dict]) -> dict:
    """{group key: {provider: reason}} of the providers the harness's numerics gate FAILED."""
    out: dict = defaultdict(dict)
    for s in skipped:
        if s.get("numerics") == "FAILED" and "op" in s:
            out[(s["op"], s["mode"], int(s["batch"]), s.get("precision", "fp32"))][s["provider"]] = s.get("reason", "")
    return out


def table_rows(cases: list[dict], device_name: str | None = None,
               failed: dict | None = None) -> tuple[list[dict], list[str]]:
    """One row per (op, mode, batch, precision): medians per provider, speed-ups, roofline floor.
    ``failed`` (:func:`numerics_failures`): providers whose numerics FAILED -- no time, no ratio."""
    floor_fn, roof_note = _roofline()
    notes = [roof_note] if roof_note else []
    failed = failed or {}
    grouped: dict = defaultdict(dict)
    for c in cases:
        if c.get("numerics") == "FAILED":  # never a speed-up
            failed.setdefault(group_key(c), {})[c["provider"]] = "numerics FAILED"
            continue
        grouped[group_key(c)][c["provider"]] = c
    rows = []
    for (op, mode, batch, precision), by in grouped.items():
        ms = {p: by[p]["median_ms"] for p in by}
        bad = dict(failed.get((op, mode, batch, precision), {}))
        verdicts = {p: by[p].get("numerics") for p in by}
        unchecked = sorted(p for p, v in verdicts.items() if v in (None, "unchecked") and p != "eager")
        numerics = ("FAILED: " + ", ".join(sorted(bad))) if bad else (
            "unchecked: " + ", ".join(unchecked) if unchecked else "ok")
        any_rec = next(iter(by.values()))
        interleaved = all(len(r.get("interleaved_with") or []) >= len(by) for r in by.values()) if len(by) > 1 else True
        row = {"op": op, "mode": mode, "batch": batch, "precision": precision, "ms": ms,
               "mem": {p: by[p].get("peak_mem_mb") for p in by},
               "roofline_precision": any_rec.get("roofline_precision"), "fp32_matmul": any_rec.get("fp32_matmul"),
               "interleaved": interleaved, "final": all(r.get("final", True) for r in by.values()),
               "rounds": {p: by[p].get("rounds") for p in by}, "failed": bad, "numerics": numerics,
               "compile": {p: by[p]["compile"] for p in by if by[p].get("compile")}}
        if "fused" in ms:
            row["vs_eager"] = ms["eager"] / ms["fused"] if "eager" in ms else None
            row["vs_compile"] = ms["compile"] / ms["fused"] if "compile" in ms else None
        if "compile_fused" in ms and "compile" in ms:
            row["cf_vs_compile"] = ms["compile"] / ms["compile_fused"]
        if "grouped" in ms:  # whole models in grouped mode
            row["g_vs_eager"] = ms["eager"] / ms["grouped"] if "eager" in ms else None
            row["g_vs_compile"] = ms["compile"] / ms["grouped"] if "compile" in ms else None
        if "grouped_graph" in ms:  # the grouped step captured in one CUDA graph
            row["gg_vs_eager"] = ms["eager"] / ms["grouped_graph"] if "eager" in ms else None
            row["gg_vs_compile"] = ms["compile"] / ms["grouped_graph"] if "compile" in ms else None
        if "fused_graph" in ms and "fused" in ms:  # > 1: the graph saves host time
            row["graph_vs_fused"] = ms["fused"] / ms["fused_graph"]
        if "fused_cublas" in ms and "fused" in ms:  # > 1: the Triton route of the fused GEMMs is faster
            row["cublas_vs_triton"] = ms["fused_cublas"] / ms["fused"]
        row["floor_ms"] = None
        if floor_fn is not None and row["roofline_precision"]:
            try:
                row["floor_ms"] = floor_fn(op, mode, batch, row["roofline_precision"],
                                           device_name or any_rec.get("device") or "")
            except Exception as exc:  # noqa: BLE001
                note = f"roofline.floor_ms failed ({type(exc).__name__}: {exc})"
                if note not in notes:
                    notes.append(note)
        rows.append(row)
    rows.sort(key=lambda r: (r["op"].startswith("model:"), r["op"], MODE_ORDER.get(r["mode"], 9), r["batch"],
                             PRECISION_ORDER.get(r["precision"], 9)))
    return rows, notes


def targets_for(row: dict, device_type: str) -> dict:
    """The targets that apply to ``row``: {"eager": x, "compile": x, "roofline": fraction}."""
    if device_type != "cuda" or row["batch"] not in PAPER_BATCHES:
        return {}
    if row["op"].startswith("model:"):
        t = MODEL_TARGETS.get((row["op"], row["mode"]))
        return {"eager": t[0], "compile": t[1]} if t else {}
    if row["mode"] != "fwd+bwd" or row["op"] not in OPS:
        return {}
    out = {"compile": OP_COMPILE_TARGET, "roofline": ROOFLINE_TARGET}
    if row["op"] in EAGER_TARGETS:
        out["eager"] = EAGER_TARGETS[row["op"]]
    return out


def _mark(value, target) -> str:
    return "" if target is None or value is None else (" ✓" if value >= target else " ✗")


def _ratio(value, target=None, flag: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.2f}x{flag}{_mark(value, target)}"


def _fraction(floor, ms, target=None) -> str:
    if floor is None or ms is None or ms <= 0:
        return ""
    f = floor / ms
    return f"{f:.0%}{_mark(f, target)}"


def _precision_label(row: dict) -> str:
    if row["precision"] == "bf16":
        return "bf16"
    rp = row.get("roofline_precision") or ""
    return f"fp32 ({rp[5:]})" if rp.startswith("fp32-") else "fp32"


# ----------------------------------------------------------------------------- Markdown


def markdown(rows: list[dict], skipped: list[dict], env: dict, command: str | None = None, notes=(),
             stages: list[dict] | None = None, machine: dict | None = None, history_md: str = "") -> str:
    providers = [p for p in PROVIDER_ORDER if any(p in r["ms"] or p in r.get("failed", {}) for r in rows)]
    dev = env.get("device_type") or "cpu"
    lines = [
        f"**Device:** {env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
        f"CUDA {env.get('cuda')} · fp32 matmul policy `{env.get('fp32_matmul')}` · threads {env.get('threads')} · "
        f"preset {env.get('preset')} · commit {env.get('commit') or 'unknown'} · {env.get('datetime')}",
        "",
        "Median ms per call over interleaved rounds (" + ("CUDA events, L2 flushed" if dev == "cuda" else "wall clock")
        + "); speed-up = reference median / ours, same group. Precision `bf16`: forward under bf16 autocast; "
        "`fp32 (tf32)` / `fp32 (ieee)`: fp32 under the recorded torch matmul policy, on both sides.",
        "",
    ]
    # columns only some runs have: whole models in grouped mode, the fused GEMMs' cuBLAS route
    extra = [(k, title) for k, title in (("g_vs_eager", "grouped vs eager"), ("g_vs_compile", "grouped vs compile"),
                                         ("gg_vs_eager", "grouped+graph vs eager"),
                                         ("gg_vs_compile", "grouped+graph vs compile"),
                                         ("graph_vs_fused", "fused ms / fused+graph ms"),
                                         ("cublas_vs_triton", "cuBLAS route ms / Triton route ms"))
             if any(r.get(k) for r in rows)]
    head = ["op", "mode", "B", "precision"] + [f"{p} ms" for p in providers] + [
        "fused vs eager", "fused vs compile", "compile_fused vs compile"] + [t for _, t in extra] + [
        "floor ms", "fused of floor", "peak MB (eager / fused)", "numerics vs eager"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    flags_used = set()
    for r in rows:
        tgt = targets_for(r, dev)
        flag = ""
        if not r["interleaved"]:
            flag = "†"
        elif not r["final"]:
            flag = "*"
        if flag:
            flags_used.add(flag)
        cells = [r["op"], r["mode"], str(r["batch"]), _precision_label(r)]
        cells += [f"{r['ms'][p]:.3f}" if p in r["ms"] else ("**FAILED**" if p in r.get("failed", {}) else "—")
                  for p in providers]
        cells += [_ratio(r.get("vs_eager"), tgt.get("eager") if not flag else None, flag),
                  _ratio(r.get("vs_compile"), tgt.get("compile") if not flag else None, flag),
                  _ratio(r.get("cf_vs_compile"), None, flag)]
        grouped_tgt = {"g_vs_eager": tgt.get("eager"), "g_vs_compile": tgt.get("compile"),  # the DTN step's targets
                       "gg_vs_eager": tgt.get("eager"), "gg_vs_compile": tgt.get("compile")}
        cells += [_ratio(r.get(k), grouped_tgt.get(k) if not flag else None, flag) for k, _ in extra]
        cells += [f"{r['floor_ms']:.3f}" if r.get("floor_ms") else "",
                  _fraction(r.get("floor_ms"), r["ms"].get("fused"), tgt.get("roofline"))]
        me, mf = r["mem"].get("eager"), r["mem"].get("fused")
        cells.append(f"{me if me is not None else '—'} / {mf if mf is not None else '—'}")
        cells.append(f"**{r['numerics']}**" if r.get("failed") else r.get("numerics", ""))
        lines.append("| " + " | ".join(cells) + " |")
    if dev == "cuda":
        lines += ["", "✓ / ✗: the project's GPU targets at B = 2048 and 4096, both precisions: fused forward + "
                      "backward ≥ 2x eager (gated cross), 1.8x (MaskNet block), 5x (HCNet), 3x (softmax gate); "
                      "≥ 1.3x torch.compile for every op; ≥ 50% of the roofline floor for every op; DTN training "
                      "step ≥ 2x eager and ≥ 1.25x torch.compile."]
    lines += ["", "Numerics: before timing, every provider's forward output and gradients are compared with eager's "
                  "at the group's shape and precision, element-wise: |a - e| <= atol * max|e| + rtol * |e| "
                  "(benchmarks/numerics_gate.py TOLERANCES). **FAILED**: over the bound (or the check raised); no time and "
                  "no speed-up is shown for that provider (its median stays in the log, marked FAILED)."]
    breaks = sorted({(r["op"], p, c.get("fullgraph"), c.get("graph_breaks"), c.get("break_reason"))
                     for r in rows for p, c in r.get("compile", {}).items()}, key=str)
    if breaks:
        lines += ["", "torch.compile (fullgraph=True where the function traces as one graph):"]
        lines += [f"* {op} {p}: " + ("one graph (fullgraph)" if fg else f"{n} graph break(s) ({why})")
                  for op, p, fg, n, why in breaks]
    if "†" in flags_used:
        lines += ["", "† not timed interleaved (a file on the harness's single-provider run_case): the ratio does "
                      "not meet the project's timing rule and no target is marked."]
    if "*" in flags_used:
        lines += ["", "* the group's full interleaved timing did not finish (its compile providers were cut off): "
                      "the other providers come from the interleaved rounds run before compiling; no target marked."]
    floors = [r for r in rows if r.get("floor_ms")]
    if floors:
        lines += ["", "Roofline: every provider's median as a fraction of the floor (floor ms / measured ms).", ""]
        lines.append("| op | mode | B | precision | floor ms | " + " | ".join(providers) + " |")
        lines.append("|---|---|---|---|---:|" + "---:|" * len(providers))
        for r in floors:
            cells = [r["op"], r["mode"], str(r["batch"]), _precision_label(r), f"{r['floor_ms']:.3f}"]
            cells += [_fraction(r["floor_ms"], r["ms"].get(p)) or "—" for p in providers]
            lines.append("| " + " | ".join(cells) + " |")
    for note in notes:
        lines += ["", f"Roofline column blank: {note}." if "roofline" in note else note]
    failed = [s for s in skipped if s.get("error")]
    if failed:
        lines += ["", "**Failed providers** (left out of their group; the other providers were timed):"]
        lines += [f"* {s.get('op', '?')} {s.get('mode', '')} B={s.get('batch', '?')} {s.get('precision', '')}: "
                  f"{s['reason']}" for s in failed]
    skipped = [s for s in skipped if not s.get("error")]
    if skipped:
        reasons: dict = defaultdict(int)
        for s in skipped:
            reasons[s["reason"]] += 1
        lines += ["", "Skipped:"]
        lines += [f"* {n} × {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    lines += stages_markdown(stages, machine)
    if history_md:
        lines += ["", history_md.rstrip()]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def stages_markdown(stages: list[dict] | None, machine: dict | None) -> list[str]:
    lines = []
    if machine:
        missing = [k for k, v in (machine.get("packages") or {}).items() if v is None]
        lines += ["", f"**Machine:** {machine.get('gpu') or machine.get('cpu') or '?'} · {machine.get('nproc')} "
                      f"cores · nvcc {machine.get('nvcc') or 'none'} · ninja {machine.get('ninja') or 'none'} · "
                      f"Python {machine.get('python')}"
                      + (f" · missing packages: {', '.join(missing)}" if missing else "")]
    if stages:
        lines += ["", "Suite stages (`stages.jsonl`):", "", "| stage | status | s | budget s | note |",
                  "|---|---|---:|---:|---|"]
        for s in stages:
            lines.append(f"| {s.get('stage')} | {s.get('status')} | {s.get('seconds', '')} | {s.get('budget_s', '')} | "
                         f"{(s.get('reason') or '').replace('|', '/')} |")
    return lines


def read_jsonl(path: str) -> list[dict]:
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"report: {path}: skipping a line that is not JSON", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- history


def history_lines(rows: list[dict], env: dict, commit: str | None) -> list[dict]:
    """One history record per group of this run."""
    run_id = f"{commit or env.get('commit') or 'unknown'}@{env.get('datetime')}"
    keep = ("device", "device_type", "torch", "triton", "cuda", "fp32_matmul", "preset")
    return [{"run_id": run_id, "datetime": env.get("datetime"), "commit": commit or env.get("commit"),
             **{k: env.get(k) for k in keep}, "op": r["op"], "mode": r["mode"], "batch": r["batch"],
             "precision": r["precision"], "roofline_precision": r.get("roofline_precision"), "ms": r["ms"],
             "floor_ms": r.get("floor_ms"), "interleaved": r["interleaved"], "final": r["final"]} for r in rows]


def append_history(path: str, lines: list[dict]) -> int:
    """Append ``lines`` to the history file unless their run is already there; returns lines written."""
    if not lines:
        return 0
    if any(h.get("run_id") == lines[0]["run_id"] for h in read_jsonl(path)):
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        for rec in lines:
            fh.write(json.dumps(rec, default=str) + "\n")
    return len(lines)


def _headline(h: dict) -> bool:
    return h["batch"] == PAPER_BATCHES[0] and h["mode"] in ("fwd+bwd", "train")


def history_markdown(history: list[dict], device: str | None = None) -> str:
    """Headline groups (B = 2048, forward + backward / training step) across runs on ``device``;
    empty unless there is more than one run."""
    hist = [h for h in history if device is None or h.get("device") == device]
    runs = list(dict.fromkeys(h["run_id"] for h in hist))
    if len(runs) < 2:
        return ""
    lines = [f"History on {device or 'every device'} ({len(runs)} runs; headline groups at B = {PAPER_BATCHES[0]}):",
             "", "| op | mode | precision | run (date · commit) | eager ms | compile ms | fused ms | fused vs eager | "
                 "fused vs compile |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    rows = sorted((h for h in hist if _headline(h)),
                  key=lambda h: (h["op"], h["mode"], h["precision"], runs.index(h["run_id"])))
    for h in rows:
        ms = h["ms"]
        f = ms.get("fused")
        run = f"{(h.get('datetime') or '?')[:16]} · {(h.get('commit') or '?')[:10]}"
        cells = [h["op"], h["mode"], h["precision"], run]
        cells += [f"{ms[p]:.3f}" if p in ms else "—" for p in ("eager", "compile", "fused")]
        cells += [f"{ms['eager'] / f:.2f}x" if f and "eager" in ms else "—",
                  f"{ms['compile'] / f:.2f}x" if f and "compile" in ms else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def history_chart(history: list[dict], device: str | None, path: str) -> str | None:
    """fused vs eager of the headline groups over runs; returns why not drawn, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no history.png"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = [h for h in history if (device is None or h.get("device") == device) and _headline(h)]
    runs = list(dict.fromkeys(h["run_id"] for h in hist))
    if len(runs) < 2:
        return None
    series: dict = defaultdict(dict)
    for h in hist:
        ms = h["ms"]
        if "fused" in ms and "eager" in ms:
            series[f"{h['op']} {h['mode']} {h['precision']}"][runs.index(h["run_id"])] = ms["eager"] / ms["fused"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([r.split("@")[-1][:10] + "\n" + r.split("@")[0][:8] for r in runs], fontsize=7)
    ax.set_ylabel("fused vs eager (x)")
    ax.set_title(f"dtn-kernels history on {device}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- chart


def chart(rows: list[dict], env: dict, path: str) -> str | None:
    """Horizontal bars: speed-up over eager of each non-eager provider, one group per row.
    Returns why no chart was drawn, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no speedups.png (the table above is complete)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "eager" in r["ms"] and len(r["ms"]) > 1]
    if not rows:
        return None
    providers = [p for p in PROVIDER_ORDER if p != "eager" and any(p in r["ms"] for r in rows)]
    colors = {"compile": "#8c8c8c", "fused": "#d62728", "compile_fused": "#ff9896", "loop": "#1f77b4"}
    height = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.5))
    labels = [f"{r['op']} {r['mode']} B={r['batch']} {r['precision']}" for r in rows]
    for j, p in enumerate(providers):
        ys = [i + j * height for i in range(len(rows))]
        xs = [r["ms"]["eager"] / r["ms"][p] if p in r["ms"] else 0 for r in rows]
        ax.barh(ys, xs, height=height, color=colors.get(p), label=p)
    ax.set_yticks([i + height * (len(providers) - 1) / 2 for i in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.1, -0.3)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over eager (median of interleaved rounds, log scale)")
    ax.set_title(f"dtn-kernels on {env.get('device')}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- main


def _read_json(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"report: cannot read {path} ({exc})", file=sys.stderr)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", help="the harness's .jsonl log or pytest-benchmark JSON files of one run")
    ap.add_argument("--out", required=True, help="folder for report.md and speedups.png")
    ap.add_argument("--command", default=None, help="the command that produced the results (quoted in the report)")
    ap.add_argument("--stages", default=None, help="the GPU suite's stages.jsonl (listed in the report)")
    ap.add_argument("--env", default=None, help="the GPU suite's env.json (machine, packages)")
    ap.add_argument("--history", default=None, help="append this run to this history file and report the history")
    ap.add_argument("--commit", default=None, help="commit of the measured code (default: DTN_COMMIT / the records)")
    ap.add_argument("--no-chart", action="store_true", help="skip speedups.png")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    stages = read_jsonl(args.stages) if args.stages else None
    machine = _read_json(args.env)
    commit = args.commit or os.environ.get("DTN_COMMIT") or None
    if not args.results:  # history only
        if not args.history:
            ap.error("give results files, or --history PATH for the history alone")
        hist = read_jsonl(args.history)
        devices = list(dict.fromkeys(h.get("device") for h in hist))
        text = "\n".join(history_markdown(hist, d) for d in devices) or "No history with more than one run yet.\n"
        for d in devices:
            why = history_chart(hist, d, os.path.join(args.out, "history.png"))
            if why:
                text += f"\n{why}\n"
        with open(os.path.join(args.out, "history.md"), "w") as fh:
            fh.write(text)
        print(text)
        return 0
    try:
        cases, skipped, env = load(args.results)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        if stages is not None:  # the GPU suite: still write what is known (stages, machine)
            text = "\n".join([f"**No benchmark results:** {exc}"] + stages_markdown(stages, machine)) + "\n"
            with open(os.path.join(args.out, "report.md"), "w") as fh:
                fh.write(text)
            print(text)
        return 2
    if commit:
        env["commit"] = commit
    rows, notes = table_rows(cases, env.get("device"), numerics_failures(skipped))
    history_md = ""
    if args.history:
        written = append_history(args.history, history_lines(rows, env, commit))
        print(f"report: {written} history lines appended to {args.history}", file=sys.stderr)
        hist = read_jsonl(args.history)
        history_md = history_markdown(hist, env.get("device"))
        if history_md and not args.no_chart:
            why = history_chart(hist, env.get("device"), os.path.join(args.out, "history.png"))
            if why:
                notes.append(why)
    if not args.no_chart:
        why = chart(rows, env, os.path.join(args.out, "speedups.png"))
        if why:
            notes.append(why)
    md = markdown(rows, skipped, env, args.command, notes, stages, machine, history_md)
    launches = os.path.join(args.out, "launches.md")  # benchmarks/count_launches.py --markdown, if the suite ran it
    if os.path.exists(launches):
        with open(launches) as fh:
            md += "\n## Kernel launches per step\n\n" + fh.read()
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
