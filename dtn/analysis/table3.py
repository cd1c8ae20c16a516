"""The paper's Table 3: Shared-Bottom, MMoE, PLE, SFM, TFI, DTN and DTN-trim, mean ± std over seeds.

The trained models come from :func:`dtn.compare.compare` (finished runs are reused); the DTN-trim
row is each seed's trained DTN (``<out>/dtn/seed<k>/best.pt``) trimmed with gate weights measured
on the validation split and re-evaluated on test, written to ``<out>/dtn_trim/seed<k>/``.

With several seeds the table says whether DTN's differences are significant
(:mod:`dtn.analysis.significance`): paired tests over seeds on the per-seed test AUCs, and a paired
bootstrap over test rows on every run's test predictions (``<run>/test_predictions.npz``, made from
its best.pt and kept beside it while the run's fingerprint matches).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..compare import compare, summarize, to_markdown
from ..train import write_metrics
from ..fileio import atomic_write_text

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


def test_predictions(data, run_dir: str, result: dict, log=print) -> np.ndarray:
    """[N, T] test probabilities of the run in ``run_dir`` (its best.pt), cached in test_predictions.npz under
    the run's fingerprint; checked to reproduce the test AUCs of its metrics.json."""
    from ..train import Trainer, model_from_checkpoint
    from ..fileio import atomic_write_bytes
    from ..train.checkpoint import digest
    from ..train.metrics import auc
    from ..train.model_file import runnable_config

    key = digest(result.get("fingerprint"))
    path = os.path.join(run_dir, "test_predictions.npz")
    probs = None
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                if str(z["key"]) == key and z["probs"].shape == (len(data.test), len(data.schema.labels)):
                    probs = z["probs"]
        except (OSError, ValueError, KeyError):
            probs = None
    labels = data.test.labels.numpy()
    tasks = list(data.schema.labels)

    def mismatch(p):  # the first task whose test AUC differs from the run's metrics.json, as (task, want, got)
        for t, task in enumerate(tasks):
            want, got = result["test"][task]["auc"], auc(labels[:, t], p[:, t])
            if want is not None and not abs(want - got) <= 1e-4:
                return task, want, got
        return None

    if probs is not None and mismatch(probs) and os.path.exists(os.path.join(run_dir, "best.pt")):
        probs = None  # a stale cache (the run was retrained under the same fingerprint): recompute from best.pt
    if probs is None:
        model, _, cfg = model_from_checkpoint(os.path.join(run_dir, "best.pt"))
        labels, probs = Trainer(model, runnable_config(cfg)).predict_with_labels(data.test)
        import io

        buf = io.BytesIO()
        np.savez(buf, probs=probs, key=np.array(key))
        atomic_write_bytes(buf.getvalue(), path)
    bad = mismatch(probs)
    if bad:
        task, want, got = bad
        raise ValueError(f"{run_dir}: its best.pt predicts a test AUC of {got:.6f} for {task}, its metrics.json "
                         f"says {want:.6f}; the run folder was altered (rerun with --fresh)")
    return probs


def significance(data, out_dir: str, runs: dict[str, list[dict]], seeds: list, target: str = "dtn",
                 resamples: int = 1000, seed: int = 0, log=print) -> dict | None:
    """DTN against every other trained model (not DTN-trim): paired tests over ``seeds`` and a paired bootstrap
    over the test rows (:func:`dtn.analysis.significance.compare_to`). None with fewer than 2 seeds."""
    import time

    from .significance import bootstrap_aucs, compare_to

    if len(seeds) < 2 or target not in runs:
        return None
    tasks = list(data.schema.labels)
    models = [m for m in runs if m != "dtn_trim"]
    aucs = {m: np.array([[r["test"][t]["auc"] for t in tasks] for r in runs[m]], dtype=float) for m in models}
    t0 = time.perf_counter()
    preds = {m: np.stack([test_predictions(data, _run_dir(out_dir, m, s), r, log) for s, r in zip(seeds, runs[m])])
             for m in models} if resamples else None
    if preds is not None:
        boot = bootstrap_aucs(data.test.labels.numpy(), preds, resamples=resamples, seed=seed)
    else:  # no bootstrap: intervals are n/a
        boot = {m: np.full((len(seeds), 1, len(tasks)), np.nan) for m in models}
    sig = compare_to(target, aucs, boot, tasks)
    sig["resamples"], sig["bootstrap_seed"], sig["seconds"] = resamples, seed, time.perf_counter() - t0
    log(f"significance: {len(models) - 1} baselines x {len(tasks)} tasks, {resamples} bootstrap resamples "
        f"({sig['seconds']:.0f}s)")
    return sig


def table3(data, config, out_dir: str, seeds=(1, 2, 3), threshold: float = 0.08, models=None,
           base: str = "shared_bottom", resume: bool = True, log=print, configs: dict | None = None,
           resamples: int = 1000) -> dict:
    """Train (or reuse) every model for every seed (``configs``: per-model configs, e.g. tuned ones), trim each
    seed's DTN, tabulate, and with >= 2 seeds test DTN's differences (``resamples``: bootstrap resamples)."""
    models = list(models or TABLE3_MODELS)
    if "dtn" not in models:
        raise ValueError("table3 needs 'dtn' among the models (DTN-trim is made from it)")
    seeds = list(seeds)
    compare(models, data, config, out_dir, base=base, seeds=seeds, resume=resume, log=log, configs=configs)
    from ..models import canonical_name

    runs: dict[str, list[dict]] = {}
    for name in [canonical_name(m) for m in models]:
        for seed in seeds:
            with open(os.path.join(_run_dir(out_dir, name, seed), "metrics.json")) as fh:
                runs.setdefault(name, []).append(json.load(fh))
    runs["dtn_trim"] = [trim_run(data, out_dir, seed, threshold, resume=resume, log=log) for seed in seeds]
    summary = summarize(runs, list(data.schema.labels), base=canonical_name(base) if base else None)
    summary["config"] = config.to_dict()
    if configs:
        summary["configs"] = {m: c.to_dict() for m, c in configs.items()}
    summary["seeds"] = seeds
    summary["trim"] = {"threshold": threshold,
                       "per_seed": [{"seed": s, "removed": r["removed"], "params_before": r["params_before"],
                                     "params_after": r["params"], "latency_ms_before": r["latency_ms_before"],
                                     "latency_ms_after": r["latency_ms_after"],
                                     "latency_batch": r.get("latency_batch")}
                                    for s, r in zip(seeds, runs["dtn_trim"])]}
    summary["significance"] = significance(data, out_dir, runs, seeds, resamples=resamples, log=log)
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
    sig = summary.get("significance")
    if sig:
        from ..compare import DISPLAY
        from .significance import significance_markdown

        text += "\nSignificance of DTN's test AUC differences:\n\n" + significance_markdown(sig, DISPLAY)
    if summary.get("configs"):
        text += ("\nEach model trained with its own (tuned) configuration; compare.json holds them under "
                 "\"configs\".\n")
    return text
