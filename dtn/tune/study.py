"""One ``dtn tune`` study: trials on the train split without its test split, stored in
``<out>/<model>/study.db`` and resumed from there (a study of other settings is refused), its summary
and the best trial's config (``best.yaml``)."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import yaml

from ..compare import StaleRunError
from ..config import Config, ConfigError, load_config
from ..fileio import atomic_write_text, ensure_writable, pid_alive
from ..models import canonical_name
from .space import Param, SearchSpace, SearchSpaceError, apply_params, default_params

class StaleStudyError(StaleRunError):
    """A study folder holds a study of other settings; the message names it and the difference."""


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("dtn tune needs Optuna, which is not installed: pip install 'dtn-kernels[tune]' "
                          "(or pip install optuna)") from None
    return optuna


# ---- one study -------------------------------------------------------------------------------
class _SealedSplit:
    """Stands in for the test split while tuning: any use of it is an error (model selection sees only validation)."""

    def __getattr__(self, name):
        raise RuntimeError("dtn tune must not look at the test split (model selection uses the validation split)")

    def __len__(self):
        raise RuntimeError("dtn tune must not look at the test split (model selection uses the validation split)")


def without_test(data):
    """``data`` with its test split (and test frame) sealed away."""
    kw = {"test": _SealedSplit()}
    if any(f.name == "frames" for f in dataclasses.fields(data)):  # in-memory data; streamed data have none
        kw["frames"] = {k: v for k, v in (data.frames or {}).items() if k != "test"}
    return dataclasses.replace(data, **kw)


def subsample_rows(split, fraction: float, seed: int):
    """A fixed random ``fraction`` of ``split``'s rows (in their original order)."""
    import torch

    if fraction >= 1.0:
        return split
    if not hasattr(split, "take"):
        raise ConfigError(f"--subsample {fraction:g}: a streamed training split cannot be subsampled; load the data "
                          "in memory (without --stream) or tune on the whole split (--subsample 1)")
    n = len(split)
    k = max(1, int(round(fraction * n)))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return split.take(idx)


@dataclass
class StudySettings:
    trials: int
    subsample: float = 1.0
    max_epochs: Optional[int] = None
    seed: int = 0
    threads: Optional[int] = None


def study_key(name: str, base: Config, params: dict[str, Param], data, settings: StudySettings, study: dict) -> dict:
    """What a stored study must match to be resumed (not the trial budget: a study may be extended)."""
    from ..train.checkpoint import data_key, digest, encoder_fingerprint, run_config

    return {"model": name, "space": {k: p.to_dict() for k, p in sorted(params.items())}, "study": study,
            "base_config": digest(run_config(base.to_dict())), "data": data_key(getattr(data, "fingerprint", None)),
            "encoder": encoder_fingerprint(data.encoder), "subsample": settings.subsample,
            "max_epochs": settings.max_epochs, "seed": settings.seed}


def _lock(path: str) -> None:
    """One process per study: a lock file holding its pid (a dead owner's lock is taken over)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            with open(path) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and pid_alive(pid):
            raise StaleStudyError(f"{path}: the study is being run by process {pid}; wait for it or stop it") from None
        os.unlink(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))


def _create_study(optuna, name: str, db: str, study_cfg: dict, seed: int, finished: int):
    s, p = study_cfg["sampler"], study_cfg["pruner"]
    # a resumed session seeds its sampler past the trials already run, so it does not redraw the
    # random startup points of the first session
    sampler = optuna.samplers.TPESampler(n_startup_trials=s["startup_trials"], seed=seed + finished)
    pruner = optuna.pruners.NopPruner() if p["type"] == "none" else optuna.pruners.MedianPruner(
        n_startup_trials=p["startup_trials"], n_warmup_steps=p["warmup_epochs"] + 1)  # epochs are steps 1, 2, ...
    return optuna.create_study(storage=f"sqlite:///{os.path.abspath(db)}", study_name=name, sampler=sampler,
                               pruner=pruner, direction="maximize", load_if_exists=True)


def _prepare(optuna, study, key: dict, base: Config, params: dict[str, Param], db: str, log) -> None:
    """A new study: record its key and queue the base config as trial 0. A stored one: check its key, fail the
    trials an interruption left running and queue their values again."""
    from optuna.trial import TrialState

    have = study.user_attrs.get("dtn")
    if have is None and not study.trials:
        study.set_user_attr("dtn", key)
        study.set_user_attr("requeued", [])
        study.enqueue_trial(default_params(base, params), user_attrs={"default": True})
        return
    if have != key:
        diff = [k for k in sorted(set(key) | set(have or {})) if (have or {}).get(k) != key.get(k)]
        raise StaleStudyError(f"{db} holds a study of {key['model']} with other settings ({', '.join(diff)} differ); "
                              "rerun with --fresh to start it again (deleting it), or choose another --out")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # only this process may run the study (the lock): a RUNNING trial is one an interruption cut off
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    requeued = list(study.user_attrs.get("requeued", []))
    # each failed configuration is tried once more, not a retry of a retry: a configuration that always fails
    # (not an interruption) must not stop every resume; the budget counts finished trials, so none is lost
    again = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
             if t.number not in requeued and "retry_of" not in t.user_attrs]
    for t in again:
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number, "default": t.user_attrs.get("default", False)})
        requeued.append(t.number)
    if again:
        study.set_user_attr("requeued", requeued)
        log(f"[{key['model']}] {len(again)} interrupted trial(s) ({', '.join(str(t.number) for t in again)}) queued "
            "again with the same values")


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {"complete": 0, "pruned": 0, "diverged": 0, "failed": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["diverged" if t.user_attrs.get("diverged") else "pruned"] += 1
        elif t.state == TrialState.FAIL:
            c["failed"] += 1
    c["finished"] = c["complete"] + c["pruned"] + c["diverged"]
    return c


def _objective(optuna, name: str, base: Config, params: dict[str, Param], train, valid, data, settings: StudySettings):
    from ..models import build_model
    from ..train import TrainingDivergedError, Trainer
    from ..train.trainer import seed_everything

    def objective(trial):
        values = {key: p.suggest(trial) for key, p in params.items()}
        cfg = apply_params(base, values)
        tr = dict(progress=False)
        if settings.max_epochs:
            tr["epochs"] = min(cfg.train.epochs, settings.max_epochs)
        if settings.threads:
            tr["num_threads"] = settings.threads
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, **tr))
        seed_everything(cfg.train.seed)
        model = build_model(name, data.schema, cfg.model, device=cfg.train.device)
        trial.set_user_attr("params_count", model.num_parameters())
        warnings: list[str] = []
        trainer = Trainer(model, cfg, encoder=data.encoder, warn=warnings.append)

        def on_epoch(epoch: int, row: dict) -> None:
            trial.report(row["score"], epoch)
            trial.set_user_attr("epochs", epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        t0 = time.perf_counter()
        try:
            trainer.fit(train, valid, log=_quiet, on_epoch=on_epoch)
        except TrainingDivergedError as exc:
            trial.set_user_attr("diverged", str(exc).split(";")[0])
            raise optuna.TrialPruned("diverged") from None
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
        best = trainer.history[trainer.best_epoch - 1]
        trial.set_user_attr("best_epoch", trainer.best_epoch)
        trial.set_user_attr("selection", trainer.selection)
        trial.set_user_attr("val_auc", {k[len("val_auc/"):]: v for k, v in best.items() if k.startswith("val_auc/")})
        if warnings:
            trial.set_user_attr("warnings", warnings[:3])
        return trainer.best_score

    return objective


def _quiet(*_a, **_k) -> None:
    pass


def run_study(name: str, data, base: Config, space: SearchSpace, out_dir: str, settings: StudySettings,
              fresh: bool = False, on_event: Callable[[dict], None] | None = None, log=print) -> dict:
    """Run (or resume) the study of ``name`` in ``out_dir/<name>`` until ``settings.trials`` trials have finished
    (completed, pruned or diverged); write best.yaml and summary.json there; return the summary."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = canonical_name(name)
    params = space.for_model(name)
    if not params:
        raise SearchSpaceError(f"search space {space.path}: no parameter applies to {name}")
    folder = os.path.join(out_dir, name)
    ensure_writable(folder, "--out")
    db, lock = os.path.join(folder, "study.db"), os.path.join(folder, "study.lock")
    _lock(lock)
    try:
        if fresh and os.path.exists(db):
            os.unlink(db)
        data = without_test(data)
        train = subsample_rows(data.train, settings.subsample, settings.seed)
        key = study_key(name, base, params, data, settings, space.study)
        probe = _create_study(optuna, name, db, space.study, settings.seed, 0)
        _prepare(optuna, probe, key, base, params, db, log)
        done = counts(probe)["finished"]
        study = _create_study(optuna, name, db, space.study, settings.seed, done) if done else probe
        remaining = max(0, settings.trials - done)
        emit = on_event or (lambda e: None)
        emit({"model": name, "event": "start", "done": done, "remaining": remaining, "rows": len(train)})
        if remaining:
            def callback(st, ft):
                emit(_trial_event(name, st, ft))

            study.optimize(_objective(optuna, name, base, params, train, data.valid, data, settings),
                           n_trials=remaining, callbacks=[callback], gc_after_trial=True)
        summary = summarize_study(name, study, base, params, settings, db)
        write_best(summary, base, params, os.path.join(folder, "best.yaml"))
        from ..train import write_metrics

        write_metrics(summary, os.path.join(folder, "summary.json"))
        emit({"model": name, "event": "done", "best": summary["best"]["value"] if summary["best"] else None})
        return summary
    finally:
        if os.path.exists(lock):
            os.unlink(lock)


def _trial_event(name: str, study, ft) -> dict:
    try:
        best = study.best_value
    except ValueError:  # no completed trial yet
        best = None
    return {"model": name, "event": "trial", "number": ft.number, "state": ft.state.name.lower(), "value": ft.value,
            "diverged": ft.user_attrs.get("diverged"), "epochs": ft.user_attrs.get("epochs"),
            "seconds": ft.user_attrs.get("seconds"), "best": best, "default": ft.user_attrs.get("default", False)}


def summarize_study(name: str, study, base: Config, params: dict[str, Param], settings: StudySettings, db: str) -> dict:
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    trials = []
    for t in all_trials:
        trials.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                       "params": {k: params[k].decode(v) if k in params else v for k, v in t.params.items()},
                       **{k: t.user_attrs.get(k) for k in ("epochs", "best_epoch", "seconds", "params_count", "val_auc",
                                                           "diverged", "default", "retry_of")}})
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    default = next((t for t in complete if t.user_attrs.get("default")), None)
    c = counts(study)
    starts = [t.datetime_start for t in all_trials if t.datetime_start]
    ends = [t.datetime_complete for t in all_trials if t.datetime_complete]
    return {"model": name, "study": os.path.basename(db), "settings": dataclasses.asdict(settings),
            "space": {k: p.to_dict() for k, p in params.items()}, "counts": c,
            "trial_seconds": sum(t["seconds"] or 0.0 for t in trials),
            # when its first trial started and its last ended (stored in the study: the same on a rerun)
            "started": min(starts).isoformat() if starts else None, "finished": max(ends).isoformat() if ends else None,
            "default": None if default is None else {"number": default.number, "value": default.value,
                                                     "val_auc": default.user_attrs.get("val_auc")},
            "best": None if best is None else {"number": best.number, "value": best.value,
                                               "params": {k: params[k].decode(v) for k, v in best.params.items()},
                                               "val_auc": best.user_attrs.get("val_auc"),
                                               "best_epoch": best.user_attrs.get("best_epoch"),
                                               "params_count": best.user_attrs.get("params_count")},
            "trials": trials}


def best_config(summary: dict, base: Config) -> Config:
    cfg = apply_params(base, summary["best"]["params"])
    return cfg.replace(model=dataclasses.replace(cfg.model, name=summary["model"]))


def write_best(summary: dict, base: Config, params: dict[str, Param], path: str) -> Optional[Config]:
    """The best trial's full configuration as YAML (the base config with its values), with a header saying
    where it came from; checked to load back with :func:`dtn.config.load_config`."""
    if summary["best"] is None:
        return None
    cfg = best_config(summary, base)
    b, s = summary["best"], summary["settings"]
    head = (f"# dtn tune: the best of {summary['counts']['finished']} trials for {summary['model']} (trial {b['number']}, "
            f"validation score {b['value']:.5f}; the base config, trial 0, scored "
            f"{summary['default']['value'] if summary['default'] else float('nan'):.5f}).\n"
            f"# Tuned on {s['subsample']:.0%} of the train split, at most {s['max_epochs'] or cfg.train.epochs} epochs a "
            "trial; train.epochs below is the base config's.\n"
            f"# Tuned keys: {', '.join(sorted(params))}\n"
            f"# Use: dtn train --config {path}   (or dtn table3 --tuned {os.path.dirname(os.path.dirname(path)) or '.'})\n")
    atomic_write_text(head + yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)
    back = load_config(path)
    if back.to_dict() != cfg.to_dict():  # pragma: no cover -- a config that does not survive YAML is a bug
        raise ConfigError(f"{path}: the written config does not load back to the tuned one")
    return cfg
