"""The paper's Table 3: Shared-Bottom, MMoE, PLE, SFM, TFI, DTN and DTN-trim, mean ± std over seeds.

The trained models come from :func:`dtn.compare.compare` (finished runs are reused); the DTN-trim
row is each seed's trained DTN (``<out>/dtn/seed<k>/best.pt``) trimmed with gate weights measured
on the validation split and re-evaluated on test, written to ``<out>/dtn_trim/seed<k>/``.
"""
from __future__ import annotations

import json
import os

from ..compare import compare, summarize, to_markdown
from ..train import write_metrics
from ..train.checkpoint import atomic_write_text

TABLE3_MODELS = ["shared_bottom", "mmoe", "ple", "sfm", "tfi", "dtn"]


def _run_dir(out_dir: str, name: str, seed) -> str:
    return os.path.join(out_dir, name if seed is None else os.path.join(name, f"seed{seed}"))


def trim_run(data, out_dir: str, seed, threshold: float, resume: bool = True, log=print) -> dict:
    """DTN-trim of one seed's trained DTN; returns a metrics dict shaped like train_model's result."""
    from ..train import model_from_checkpoint
    from .gates import split_metrics, trim_model, write_trim

    run_dir = _run_dir(out_dir, "dtn_trim", seed)
    done = os.path.join(run_dir, "metrics.json")
    dtn_dir = _run_dir(out_dir, "dtn", seed)
    with open(os.path.join(dtn_dir, "metrics.json")) as fh:
        dtn_result = json.load(fh)
    if resume and os.path.exists(done):
        with open(done) as fh:
            result = json.load(fh)
        # reused only when made from this very DTN run (its fingerprint) at this threshold
        if result.get("threshold") == threshold and result.get("dtn_fingerprint") == dtn_result.get("fingerprint") \
                and result.get("dtn_fingerprint"):
            log(f"[dtn_trim{'' if seed is None else f' seed {seed}'}] reusing {done}: made from this DTN run at "
                f"threshold {threshold}")
            return result
    model, encoder, cfg = model_from_checkpoint(os.path.join(dtn_dir, "best.pt"))
    log(f"[dtn_trim{'' if seed is None else f' seed {seed}'}] trimming {dtn_dir}/best.pt at threshold {threshold}")
    r = trim_model(model, data, threshold, eval_batch_size=cfg.train.eval_batch_size, log=log)
    write_trim(r, model, encoder, cfg, run_dir)
    result = {"model": "dtn_trim", "params": r["after"]["params"], "params_before": r["before"]["params"],
              "threshold": threshold, "removed": r["removed"], "candidates_off": r["candidates_off"],
              # the trimmed model is the trained DTN: its training time is the DTN's (trimming itself: trim_seconds)
              "train_seconds": dtn_result["train_seconds"], "trim_seconds": r["trim_seconds"],
              "latency_ms_before": r["before"]["latency"]["median_ms"],
              "latency_ms_after": r["after"]["latency"]["median_ms"],
              "latency_batch": r["before"]["latency"]["batch_size"],
              "valid": split_metrics(model, data.valid, cfg.train.eval_batch_size), "test": r["after"]["test"],
              "dtn_fingerprint": dtn_result.get("fingerprint")}
    write_metrics(result, done)
    return result


def table3(data, config, out_dir: str, seeds=(1, 2, 3), threshold: float = 0.08, models=None,
           base: str = "shared_bottom", resume: bool = True, log=print) -> dict:
    models = list(models or TABLE3_MODELS)
    if "dtn" not in models:
        raise ValueError("table3 needs 'dtn' among the models (DTN-trim is made from it)")
    seeds = list(seeds)
    compare(models, data, config, out_dir, base=base, seeds=seeds, resume=resume, log=log)
    from ..models import canonical_name

    runs: dict[str, list[dict]] = {}
    for name in [canonical_name(m) for m in models]:
        for seed in seeds:
            with open(os.path.join(_run_dir(out_dir, name, seed), "metrics.json")) as fh:
                runs.setdefault(name, []).append(json.load(fh))
    runs["dtn_trim"] = [trim_run(data, out_dir, seed, threshold, resume=resume, log=log) for seed in seeds]
    summary = summarize(runs, list(data.schema.labels), base=canonical_name(base) if base else None)
    summary["config"] = config.to_dict()
    summary["seeds"] = seeds
    summary["trim"] = {"threshold": threshold,
                       "per_seed": [{"seed": s, "removed": r["removed"], "params_before": r["params_before"],
                                     "params_after": r["params"], "latency_ms_before": r["latency_ms_before"],
                                     "latency_ms_after": r["latency_ms_after"],
                                     "latency_batch": r.get("latency_batch")}
                                    for s, r in zip(seeds, runs["dtn_trim"])]}
    write_metrics(summary, os.path.join(out_dir, "compare.json"))
    atomic_write_text(table3_markdown(summary), os.path.join(out_dir, "compare.md"))
    return summary


def table3_markdown(summary: dict) -> str:
    text = to_markdown(summary).replace("| dtn_trim |", "| DTN-trim |")
    trim = summary.get("trim")
    if trim:
        lines = [f"\nDTN-trim: each seed's DTN trimmed at gate-weight threshold {trim['threshold']} "
                 "(validation gate weights), no retraining; its params are those after trimming "
                 "(the table shows the first seed's); its train s is the DTN's. Per seed:\n"]
        for r in trim["per_seed"]:
            lines.append(f"- seed {r['seed']}: removed {', '.join(r['removed']) if r['removed'] else 'nothing'}; "
                         f"params {r['params_before']:,} -> {r['params_after']:,}; median latency per batch of {r['latency_batch']} "
                         f"{r['latency_ms_before']:.1f} -> {r['latency_ms_after']:.1f} ms")
        text += "\n".join(lines) + "\n"
    return text
