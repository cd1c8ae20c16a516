"""Train several models on one data set and tabulate them like the paper's Table 3.

Runs go to ``out_dir/<model>[/seed<k>]``. Before training anything, every run folder is checked:

* a finished run (``metrics.json`` and ``best.pt``) of the same config, data, encoders and code
  (its fingerprint, :func:`dtn.train.run.run_fingerprint`) is reused, and the log says so;
* an unfinished one (``last.pt`` only) is resumed if its checkpoint matches this run;
* any other run (other settings, other data, other code, or results without a fingerprint, such
  as copied or committed ones) is stale: ``compare`` refuses with a message naming the folder and
  what differs, unless ``resume=False`` (``--fresh``), which retrains every run from scratch.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .models import canonical_name
from .train import rela_imp, train_model, write_metrics
from .fileio import atomic_write_text
from .train.checkpoint import (CheckpointError, code_version, encoder_fingerprint, load_checkpoint, run_config, run_key,
                               source_diff)
from .train.resume import check_resume

DISPLAY = {"shared_bottom": "Shared-Bottom", "mmoe": "MMoE", "ple": "PLE", "cgc": "CGC", "sfm": "SFM", "tfi": "TFI",
           "dtn": "DTN"}


class StaleRunError(ValueError):
    """An output folder holds a run of other settings, data or code; the message names it and the difference."""


def expected_fingerprint(name: str, config, data) -> dict:
    """The fingerprint a run of ``name`` with ``config`` on ``data`` records (see run_fingerprint)."""
    cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, name=name))
    return run_key(cfg.to_dict(), getattr(data, "fingerprint", None), encoder_fingerprint(data.encoder), code_version())


def _why_stale(run_dir: str, have: dict | None, want: dict, ckpt: dict | None, config_dict: dict, data) -> str:
    """What differs between a finished run and the one asked for, in words."""
    from .config import config_diff

    if not have:
        return "its metrics.json has no run fingerprint (results copied or committed, or written by an older dtn)"
    parts = []
    if have.get("config") != want["config"]:
        diff = config_diff(run_config(ckpt["config"]), run_config(config_dict)) if ckpt else []
        parts.append("other settings: " + ("; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff[:4]) if diff else
                                           "config differs"))
    if have.get("data") != want["data"]:
        diff = source_diff((ckpt.get("fingerprint") or {}).get("data"), getattr(data, "fingerprint", None)) if ckpt else []
        parts.append("other data: " + ("; ".join(diff[:3]) if diff else "the data source differs"))
    elif have.get("encoder") != want["encoder"]:
        parts.append("other feature encoders")
    if have.get("code") != want["code"]:
        parts.append(f"other code: {have.get('code')} -> {want['code']}")
    return "; ".join(parts) or "its best.pt does not match its metrics.json"


def run_status(run_dir: str, name: str, config, data) -> tuple[str, object]:
    """("reuse", result) | ("resume", last.pt dict) | ("train", None) | ("stale", reason) for one run folder."""
    want = expected_fingerprint(name, config, data)
    cfg_dict = dataclasses.replace(config, model=dataclasses.replace(config.model, name=name)).to_dict()
    done, best, last = (os.path.join(run_dir, f) for f in ("metrics.json", "best.pt", "last.pt"))
    if os.path.exists(done):
        try:
            with open(done) as fh:
                result = json.load(fh)
        except (OSError, ValueError) as exc:
            return "stale", f"its metrics.json cannot be read ({exc})"
        have = result.get("fingerprint") if isinstance(result, dict) else None
        ckpt = None
        if have and os.path.exists(best):
            try:
                ckpt = load_checkpoint(best)
            except (CheckpointError, OSError) as exc:
                return "stale", f"its best.pt cannot be read ({exc})"
        if have == want and ckpt is not None:
            fp = ckpt.get("fingerprint") or {}
            if run_key(ckpt["config"], fp.get("data"), fp.get("encoder"), ckpt.get("code_version")) == want:
                return "reuse", result
            return "stale", "its best.pt is not the checkpoint its metrics.json describes"
        if have == want:
            return "stale", "its best.pt is missing (reuse needs the run's own checkpoint)"
        return "stale", _why_stale(run_dir, have, want, ckpt, cfg_dict, data)
    if os.path.exists(last):
        try:
            ckpt = load_checkpoint(last)
            check_resume(ckpt, name, cfg_dict, getattr(data, "fingerprint", None), want["encoder"])
        except (CheckpointError, OSError) as exc:
            return "stale", f"its unfinished run cannot be resumed: {exc}"
        return "resume", ckpt
    return "train", None


def compare(models, data, config, out_dir: str, base: str = "shared_bottom", seeds=(None,), resume: bool = True,
            log=print, configs: dict | None = None) -> dict:
    """Train each model (per seed) into ``out_dir/<model>[/seed<k>]``. With ``resume`` a finished run of the
    same config, data and code is reused and an unfinished one resumed; a run folder holding anything else
    stops everything, before any training, with a StaleRunError. ``resume=False`` retrains every run from
    scratch. ``configs``: a model's own config (e.g. tuned by ``dtn tune``) instead of ``config``.
    Returns the summary dict."""
    models = [canonical_name(m) for m in models]
    configs = {canonical_name(k): v for k, v in (configs or {}).items()}
    plan = []
    for name in models:
        own = configs.get(name, config)
        for seed in seeds:
            cfg = own if seed is None else dataclasses.replace(own, train=dataclasses.replace(own.train, seed=seed))
            run_dir = os.path.join(out_dir, name if seed is None else os.path.join(name, f"seed{seed}"))
            status = run_status(run_dir, name, cfg, data) if resume else ("fresh", None)
            plan.append((name, seed, cfg, run_dir, status))
    stale = [(run_dir, st[1]) for *_, run_dir, st in plan if st[0] == "stale"]
    if stale:
        more = f" (and {len(stale) - 1} more run folder(s))" if len(stale) > 1 else ""
        raise StaleRunError(f"{stale[0][0]} holds a run that is not this one: {stale[0][1]}{more}; rerun with --fresh to "
                            "retrain there (replacing those runs), or choose another --out")
    runs: dict[str, list[dict]] = {}
    reused = 0
    for name, seed, cfg, run_dir, (what, arg) in plan:
        tag = f"[{name}{'' if seed is None else f' seed {seed}'}]"
        if what == "reuse":
            result, reused = arg, reused + 1
            log(f"{tag} reusing {run_dir}: a finished run of the same config, data and code (its metrics.json and "
                "best.pt); not retrained (--fresh retrains)")
        else:
            if what == "fresh":
                # a stopped fresh run must not look finished or resumable, nor keep the old run's test predictions
                for f in ("metrics.json", "last.pt", "test_predictions.npz"):
                    if os.path.exists(os.path.join(run_dir, f)):
                        os.unlink(os.path.join(run_dir, f))
            log(f"{tag} {'resuming' if what == 'resume' else 'training'} in {run_dir}")
            _, result = train_model(name, data, cfg, out_dir=run_dir, resume=arg if what == "resume" else False, log=log)
        result = dict(result, run_dir=run_dir, reused=what == "reuse")
        runs.setdefault(name, []).append(result)
    if reused:
        log(f"reused {reused} of {len(plan)} run(s) from earlier runs in {out_dir} (not retrained)")
    summary = summarize(runs, list(data.schema.labels), base=canonical_name(base) if base else None)
    summary["config"] = config.to_dict()
    if configs:
        summary["configs"] = {name: c.to_dict() for name, c in configs.items()}
    summary["code_version"] = code_version()
    summary["data"] = getattr(data, "fingerprint", None)
    summary["runs"] = {name: [{"dir": r["run_dir"], "reused": r["reused"]} for r in rs] for name, rs in runs.items()}
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
                vals = np.array([np.nan if r["test"][t][m] is None else r["test"][t][m] for r in results], dtype=float)
                row[f"{m}/{t}"] = float(vals.mean())
                row[f"{m}_std/{t}"] = float(vals.std()) if len(vals) > 1 else 0.0
        rows[name] = row
    if base and base in rows:
        for row in rows.values():
            for t in tasks:
                row[f"relaimp/{t}"] = rela_imp(row[f"auc/{t}"], rows[base][f"auc/{t}"])
    return {"tasks": tasks, "base": base if base in rows else None, "rows": rows}


def _num(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


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
            cells.append(f"{_num(r[f'auc/{t}'])}{pm('auc')}")
            cells.append(f"{_num(r[f'logloss/{t}'])}{pm('logloss')}")
            ri = r.get(f"relaimp/{t}")
            cells.append("-" if ri is None or ri != ri or name == base else f"{ri:+.2f}%")
        cells += [f"{r['params']:,}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\nRelaImp against {DISPLAY.get(base, base)}, on the test split." if base else ""
    if multi:
        note += " Mean ± std over seeds."
    return "\n".join(lines) + "\n" + note.strip() + "\n"
