"""Train several models on one data set and tabulate them like the paper's Table 3."""
from __future__ import annotations

import json
import os

import numpy as np

from .models import canonical_name
from .train import rela_imp, train_model, write_metrics
from .train.checkpoint import atomic_write_text

DISPLAY = {"shared_bottom": "Shared-Bottom", "mmoe": "MMoE", "ple": "PLE", "cgc": "CGC", "sfm": "SFM", "tfi": "TFI",
           "dtn": "DTN"}


def compare(models, data, config, out_dir: str, base: str = "shared_bottom", seeds=(None,), resume: bool = True,
            log=print) -> dict:
    """Train each model (per seed) into ``out_dir/<model>[/seed<k>]``; a finished run's metrics.json is reused
    when ``resume`` (so a crashed compare picks up where it stopped). Returns the summary dict."""
    import dataclasses

    models = [canonical_name(m) for m in models]
    runs: dict[str, list[dict]] = {}
    for name in models:
        for seed in seeds:
            cfg = config if seed is None else dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
            run_dir = os.path.join(out_dir, name if seed is None else os.path.join(name, f"seed{seed}"))
            done = os.path.join(run_dir, "metrics.json")
            if resume and os.path.exists(done):
                with open(done) as fh:
                    result = json.load(fh)
                log(f"[{name}{'' if seed is None else f' seed {seed}'}] reusing {done}")
            else:
                log(f"[{name}{'' if seed is None else f' seed {seed}'}] training")
                _, result = train_model(name, data, cfg, out_dir=run_dir, resume=resume, log=log)
            runs.setdefault(name, []).append(result)
    summary = summarize(runs, list(data.schema.labels), base=canonical_name(base) if base else None)
    summary["config"] = config.to_dict()
    write_metrics(summary, os.path.join(out_dir, "compare.json"))
    atomic_write_text(to_markdown(summary), os.path.join(out_dir, "compare.md"))
    return summary


def summarize(runs: dict[str, list[dict]], tasks: list[str], base: str | None) -> dict:
    rows = {}
    for name, results in runs.items():
        row = {"params": results[0]["params"], "n_runs": len(results),
               "train_seconds": float(np.mean([r["train_seconds"] for r in results]))}
        for t in tasks:
            for m in ("auc", "logloss"):
                vals = np.array([r["test"][t][m] for r in results])
                row[f"{m}/{t}"] = float(vals.mean())
                row[f"{m}_std/{t}"] = float(vals.std()) if len(vals) > 1 else 0.0
        rows[name] = row
    if base and base in rows:
        for row in rows.values():
            for t in tasks:
                row[f"relaimp/{t}"] = rela_imp(row[f"auc/{t}"], rows[base][f"auc/{t}"])
    return {"tasks": tasks, "base": base if base in rows else None, "rows": rows}


def to_markdown(summary: dict) -> str:
    tasks, rows, base = summary["tasks"], summary["rows"], summary["base"]
    multi = any(r["n_runs"] > 1 for r in rows.values())
    head = "| Model | " + " | ".join(f"{t} AUC | {t} LogLoss | {t} RelaImp" for t in tasks) + " | params | train s |"
    sep = "|---" * (1 + 3 * len(tasks) + 2) + "|"
    lines = [head, sep]
    for name, r in rows.items():
        cells = [DISPLAY.get(name, name)]
        for t in tasks:
            pm = (lambda k: f" ± {r[f'{k}_std/{t}']:.4f}") if multi else (lambda k: "")
            cells.append(f"{r[f'auc/{t}']:.4f}{pm('auc')}")
            cells.append(f"{r[f'logloss/{t}']:.4f}{pm('logloss')}")
            ri = r.get(f"relaimp/{t}")
            cells.append("-" if ri is None or name == base else f"{ri:+.2f}%")
        cells += [f"{r['params']:,}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\nRelaImp against {DISPLAY.get(base, base)}, on the test split." if base else ""
    if multi:
        note += " Mean ± std over seeds."
    return "\n".join(lines) + "\n" + note.strip() + "\n"
