"""Benchmark report: pytest-benchmark JSON -> a Markdown table of speed-ups and a PNG chart.

    .venv/bin/python benchmarks/report.py RESULTS.json [MORE.json ...] --out DIR

writes ``DIR/report.md`` (also printed) and ``DIR/speedups.png``. Times are each case's
``median_ms`` (CUDA-event medians on GPU, wall-clock medians on CPU; see benchmarks/harness.py).
Speed-ups are ratios of medians measured in the same run: ``eager / fused`` and
``compile / fused`` (and ``compile / compile_fused``). The project's targets on an H100/H200
(every fused op's forward + backward at least 3x eager and 1.3x torch.compile; the DTN training
step at least 2x eager and 1.25x torch.compile) are marked at the paper's batch sizes.
Inputs: pytest-benchmark ``--benchmark-json`` files, or the harness's per-case log
(``DTN_BENCH_LOG``, ``.jsonl``), which survives a run cut short.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

PROVIDER_ORDER = ("eager", "compile", "fused", "compile_fused", "loop")
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2, "train": 3, "infer": 4}
TARGETS = {  # (eager, compile) speed-up targets of the fused provider, on GPU
    "op": (3.0, 1.3),
    "model:dtn/train": (2.0, 1.25),
}


class ReportError(ValueError):
    """A results file that is not pytest-benchmark JSON of this suite."""


def load(paths: list[str]) -> tuple[list[dict], list[dict], dict]:
    """Every case's extra_info, the skipped cases, and the run's environment."""
    cases, skipped, env = [], [], {}
    for path in paths:
        if not os.path.exists(path) and len(paths) > 1:  # e.g. a part of the GPU run that did not finish
            print(f"report: {path} is missing; reporting the other files", file=sys.stderr)
            continue
        try:
            with open(path) as fh:
                if path.endswith(".jsonl"):  # the harness's per-case log (DTN_BENCH_LOG)
                    data = _from_log(fh, path)
                else:
                    data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: cannot read benchmark JSON ({exc})") from exc
        if "benchmarks" not in data:
            raise ReportError(f"{path}: no 'benchmarks' list; is it pytest-benchmark --benchmark-json output?")
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "op" not in info or "median_ms" not in info:
                continue  # a benchmark outside the suite (e.g. the embedding bag's CPU ratio test)
            cases.append(info)
            if not env:
                env = {k: info.get(k) for k in ("device", "device_type", "torch", "triton", "cuda", "dtype",
                                                 "threads", "preset", "tf32")}
                env["datetime"] = data.get("datetime") or info.get("measured_at")
        skipped += data.get("dtn_skipped", [])
    if not cases:
        raise ReportError(f"no suite results in {paths}")
    return cases, skipped, env


def _from_log(fh, path: str) -> dict:
    """A DTN_BENCH_LOG file (one JSON object a line) in the shape of pytest-benchmark's JSON."""
    benchmarks, skipped = [], []
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: line {n} is not JSON ({exc})") from exc
        kind = rec.pop("kind", None)
        if kind == "case":
            benchmarks.append({"extra_info": rec})
        elif kind == "skipped":
            skipped.append(rec)
    return {"benchmarks": benchmarks, "dtn_skipped": skipped}


def table_rows(cases: list[dict]) -> list[dict]:
    """One row per (op, mode, batch): medians per provider, speed-ups, peak memory."""
    grouped: dict = defaultdict(dict)
    for c in cases:
        grouped[(c["op"], c["mode"], int(c["batch"]))][c["provider"]] = c
    rows = []
    for (op, mode, batch), by in grouped.items():
        ms = {p: by[p]["median_ms"] for p in by}
        mem = {p: by[p].get("peak_mem_mb") for p in by}
        row = {"op": op, "mode": mode, "batch": batch, "ms": ms, "mem": mem}
        if "fused" in ms:
            row["vs_eager"] = ms["eager"] / ms["fused"] if "eager" in ms else None
            row["vs_compile"] = ms["compile"] / ms["fused"] if "compile" in ms else None
        if "compile_fused" in ms and "compile" in ms:
            row["cf_vs_compile"] = ms["compile"] / ms["compile_fused"]
        rows.append(row)
    rows.sort(key=lambda r: (r["op"].startswith("model:"), r["op"], MODE_ORDER.get(r["mode"], 9), r["batch"]))
    return rows


def target_for(row: dict, device_type: str):
    if device_type != "cuda" or row["batch"] not in (2048, 4096):  # the targets are at the paper's batches
        return None
    if row["op"].startswith("model:"):
        return TARGETS.get(f"{row['op']}/{row['mode']}")
    return TARGETS["op"] if row["mode"] == "fwd+bwd" else None


def _ratio(value, target=None) -> str:
    if value is None:
        return "—"
    mark = "" if target is None else (" ✓" if value >= target else " ✗")
    return f"{value:.2f}x{mark}"


def markdown(rows: list[dict], skipped: list[dict], env: dict, command: str | None = None) -> str:
    providers = [p for p in PROVIDER_ORDER if any(p in r["ms"] for r in rows)]
    dev = env.get("device_type") or "cpu"
    lines = [
        f"**Device:** {env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
        f"CUDA {env.get('cuda')} · {env.get('dtype')} · threads {env.get('threads')} · preset "
        f"{env.get('preset')} · {env.get('datetime')}",
        "",
        "Median ms per call (" + ("CUDA events" if dev == "cuda" else "wall clock") + "); speed-up = "
        "reference median / ours, same run.",
        "",
    ]
    head = ["op", "mode", "B"] + [f"{p} ms" for p in providers] + ["fused vs eager", "fused vs compile",
                                                                   "compile_fused vs compile", "peak MB (eager / fused)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    for r in rows:
        tgt = target_for(r, dev)
        cells = [r["op"], r["mode"], str(r["batch"])]
        cells += [f"{r['ms'][p]:.3f}" if p in r["ms"] else "—" for p in providers]
        cells += [_ratio(r.get("vs_eager"), tgt[0] if tgt else None),
                  _ratio(r.get("vs_compile"), tgt[1] if tgt else None),
                  _ratio(r.get("cf_vs_compile"))]
        me, mf = r["mem"].get("eager"), r["mem"].get("fused")
        cells.append(f"{me if me is not None else '—'} / {mf if mf is not None else '—'}")
        lines.append("| " + " | ".join(cells) + " |")
    if dev == "cuda":
        lines += ["", "✓ / ✗: the project's GPU targets (fused op forward + backward ≥ 3x eager and ≥ 1.3x "
                      "torch.compile; DTN training step ≥ 2x eager and ≥ 1.25x torch.compile)."]
    if skipped:
        reasons: dict = defaultdict(int)
        for s in skipped:
            reasons[s["reason"]] += 1
        lines += ["", "Skipped cases:"]
        lines += [f"* {n} × {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], env: dict, path: str) -> None:
    """Horizontal bars: speed-up over eager of each non-eager provider, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "eager" in r["ms"] and len(r["ms"]) > 1]
    if not rows:
        return
    providers = [p for p in PROVIDER_ORDER if p != "eager" and any(p in r["ms"] for r in rows)]
    colors = {"compile": "#8c8c8c", "fused": "#d62728", "compile_fused": "#ff9896", "loop": "#1f77b4"}
    height = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.5))
    labels = [f"{r['op']} {r['mode']} B={r['batch']}" for r in rows]
    for j, p in enumerate(providers):
        ys = [i + j * height for i in range(len(rows))]
        xs = [r["ms"]["eager"] / r["ms"][p] if p in r["ms"] else 0 for r in rows]
        ax.barh(ys, xs, height=height, color=colors.get(p), label=p)
    ax.set_yticks([i + height * (len(providers) - 1) / 2 for i in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.1, -0.3)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over eager (median, log scale)")
    ax.set_title(f"dtn-kernels on {env.get('device')} ({env.get('dtype')})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files of one run")
    ap.add_argument("--out", required=True, help="folder for report.md and speedups.png")
    ap.add_argument("--command", default=None, help="the command that produced the JSON (quoted in the report)")
    args = ap.parse_args(argv)
    try:
        cases, skipped, env = load(args.json)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rows = table_rows(cases)
    md = markdown(rows, skipped, env, args.command)
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(md)
    chart(rows, env, os.path.join(args.out, "speedups.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
