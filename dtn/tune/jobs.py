"""Several ``dtn tune`` studies: one per model on the same trial budget, in this process or ``--jobs``
worker processes (each loading the data once), with one progress bar; writes ``tune.json`` and
``tune.md``."""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from ..config import Config, config_from_dict
from ..fileio import atomic_write_text, ensure_writable
from ..models import canonical_name
from .report import tune_markdown
from .space import SearchSpace, SearchSpaceError, load_search_space
from .study import StudySettings, require_optuna, run_study

# ---- several studies -----------------------------------------------------------------------------
def _job(name: str, base_dict: dict, space_path: str, out_dir: str, settings: dict, fresh: bool, queue) -> dict:
    """One study in a worker process (``--jobs`` > 1): loads the data itself, reports through ``queue``."""
    from ..data import load_dataset

    base = config_from_dict(base_dict)
    threads = settings.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    data = _cached_data(base, load_dataset)
    space = load_search_space(space_path)
    return run_study(name, data, base, space, out_dir, StudySettings(**settings), fresh=fresh, on_event=queue.put,
                     log=lambda m: queue.put({"model": name, "event": "log", "message": m}))


_DATA: dict = {}


def _cached_data(base: Config, load):
    from ..train.checkpoint import digest

    key = digest(dataclasses.asdict(base.data))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load(base.data, progress=False)
    return _DATA[key]


class _Progress:
    """One progress bar over every study's remaining trials, and a log line per finished trial."""

    def __init__(self, total: int, log):
        from ..train.trainer import tqdm

        self.log = log
        self.bar = None
        if tqdm is not None and (sys.stderr.isatty() or os.environ.get("DTN_FORCE_PROGRESS")):
            self.bar = tqdm(total=total, desc="tune", unit="trial", dynamic_ncols=True, file=sys.stderr)
        self.best: dict[str, float] = {}

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            self.log(line)

    def __call__(self, e: dict) -> None:
        m = e["model"]
        if e["event"] == "log":
            self.write(e["message"])
        elif e["event"] == "start":
            self.write(f"[{m}] study: {e['done']} trial(s) finished before, {e['remaining']} to run "
                       f"({e['rows']} train rows a trial)")
        elif e["event"] == "trial":
            if e["best"] is not None:
                self.best[m] = e["best"]
            what = {"complete": f"score {e['value']:.5f}" if e["value"] is not None else "complete",
                    "pruned": "diverged" if e["diverged"] else f"pruned after epoch {e['epochs']}"}.get(e["state"], e["state"])
            best = f"best {e['best']:.5f}" if e["best"] is not None else "no complete trial yet"
            self.write(f"[{m}] trial {e['number']}{' (base config)' if e['default'] else ''}: {what}, "
                       f"{e['epochs'] or 0} epoch(s), {e['seconds'] or 0:.0f}s; {best}")
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(" ".join(f"{k} {v:.4f}" for k, v in self.best.items()))
        elif e["event"] == "done":
            self.write(f"[{m}] study finished; best score {e['best']:.5f}" if e["best"] is not None
                       else f"[{m}] study finished without a complete trial")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def tune(models: list[str], base: Config, space: SearchSpace, out_dir: str, settings: StudySettings, jobs: int = 1,
         fresh: bool = False, data=None, log=print) -> dict:
    """One study per model (the same trial budget each), ``jobs`` studies at a time (worker processes when
    ``jobs`` > 1, each loading the data once); writes ``<out>/tune.json`` and ``tune.md``; returns the summary."""
    require_optuna()
    from ..train import write_metrics

    models = [canonical_name(m) for m in models]
    for m in models:
        if not space.for_model(m):
            raise SearchSpaceError(f"search space {space.path}: no parameter applies to {m}")
    ensure_writable(out_dir, "--out")
    t0 = time.perf_counter()
    total = len(models) * settings.trials  # an upper bound; each study says what it has left when it starts
    progress = _Progress(total, log)
    results: dict[str, dict] = {}
    try:
        if jobs <= 1:
            if data is None:
                from ..data import load_dataset

                data = load_dataset(base.data, progress=False)
            for m in models:
                results[m] = run_study(m, data, base, space, out_dir, settings, fresh, on_event=progress, log=progress.write)
        else:
            results = _run_jobs(models, base, space, out_dir, settings, jobs, fresh, progress)
    finally:
        progress.close()
    starts = [r["started"] for r in results.values() if r["started"]]
    ends = [r["finished"] for r in results.values() if r["finished"]]
    span = None
    if starts and ends:
        from datetime import datetime

        span = (datetime.fromisoformat(max(ends)) - datetime.fromisoformat(min(starts))).total_seconds()
    summary = {"models": models, "settings": dataclasses.asdict(settings), "space": space.path, "jobs": jobs,
               "wall_seconds": time.perf_counter() - t0, "trials_span_seconds": span,
               "trials_span": [min(starts) if starts else None, max(ends) if ends else None], "base_config": base.to_dict(),
               "studies": {m: {k: v for k, v in results[m].items() if k != "trials"} for m in models}}
    write_metrics(summary, os.path.join(out_dir, "tune.json"))
    atomic_write_text(tune_markdown(summary), os.path.join(out_dir, "tune.md"))
    return summary


def _run_jobs(models, base, space, out_dir, settings, jobs, fresh, progress) -> dict:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    q = manager.Queue()
    results = {}
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_job, m, base.to_dict(), space.path, out_dir, dataclasses.asdict(settings), fresh, q): m
                       for m in models}
            pending = set(futures)
            while pending:
                try:
                    progress(q.get(timeout=0.5))
                except queue_mod.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    results[futures[f]] = f.result()  # a worker's error is raised here, naming its study
            while not q.empty():
                progress(q.get())
    finally:
        manager.shutdown()
    return results
