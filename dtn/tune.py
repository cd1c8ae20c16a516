"""``dtn tune``: hyperparameter search with Optuna, one study per model on the same trial budget.

* Search spaces are declared in YAML per model family (``dtn/configs/tune/cpu.yaml``; see
  :func:`load_search_space`); every value a space can produce is checked against the typed config
  before any data is read, and a bad entry is a :class:`SearchSpaceError` naming the key.
* Each trial trains one configuration (the base config with the sampled values) on a fixed random
  subsample of the train split for at most ``max_epochs`` epochs, and is scored by its best mean
  validation AUC (the trainer's own model-selection score). The test split is taken away before
  tuning starts: nothing here can read it.
* TPE samples the trials; a median pruner stops a trial whose validation AUC after an epoch is
  below the median of the finished trials at that epoch (the trainer's per-epoch hook).
* Trial 0 is the base configuration itself (where its values lie in the space).
* Each study lives in ``<out>/<model>/study.db`` (SQLite): an interrupted search resumes where it
  stopped (a trial cut off mid-way is marked failed and run again with the same values); a study
  made with another space, base config, data, subsample, epoch cap or seed is refused.
* The best trial's configuration is written as ``<out>/<model>/best.yaml``, a full config that
  ``dtn train --config`` and ``dtn table3 --config`` / ``--tuned <out>`` take.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from .compare import StaleRunError
from .config import CONFIG_DIR, FIM_OPTIONS, Config, ConfigError, config_from_dict, load_config
from .models import MODEL_REGISTRY, canonical_name
from .train.checkpoint import pid_alive

SPACE_DIR = os.path.join(CONFIG_DIR, "tune")
# config keys that are not hyperparameters: what is trained (model.name), how long (the study's epoch
# cap), where and how it runs, and the seed every model shares
NOT_TUNABLE = {"model.name": "the model is chosen by --models", "train.epochs": "the study caps epochs (--max-epochs)",
               "train.patience": "early stopping is part of the protocol, not of a model",
               "train.seed": "every trial and every model trains with the same seed",
               "train.device": "not a hyperparameter", "train.num_threads": "not a hyperparameter",
               "train.progress": "not a hyperparameter", "train.eval_batch_size": "does not change the model",
               "train.early_stop_metric": "the selection metric is the study's objective",
               "train.deterministic": "not a hyperparameter", "train.shuffle": "not a hyperparameter"}
KINDS = ("float", "int", "categorical")


class SearchSpaceError(ConfigError):
    """A bad search-space file or entry; the message names the file, the entry and the key."""


class StaleStudyError(StaleRunError):
    """A study folder holds a study of other settings; the message names it and the difference."""


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("dtn tune needs Optuna, which is not installed: pip install 'dtn-kernels[tune]' "
                          "(or pip install optuna)") from None
    return optuna


# ---- search spaces ------------------------------------------------------------------------------
@dataclass
class Param:
    """One tuned config key: a float or int range (optionally log-scaled or stepped) or a list of choices."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: Optional[list] = None

    @property
    def encoded(self) -> bool:
        """Optuna's categorical choices are scalars: list choices (hidden sizes) are stored as JSON text."""
        return self.kind == "categorical" and any(isinstance(c, (list, dict)) for c in self.choices)

    def encode(self, value):
        return json.dumps(value) if self.encoded else value

    def decode(self, raw):
        return json.loads(raw) if self.encoded else raw

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return self.decode(trial.suggest_categorical(self.key, [self.encode(c) for c in self.choices]))

    def contains(self, value) -> bool:
        if self.kind == "categorical":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.kind == "int" and value != int(value):
            return False
        k = (value - self.low) / self.step if self.step else 0.0
        return abs(k - round(k)) < 1e-9  # on the step grid

    def values_to_check(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict:
        d = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = self.choices
        else:
            d.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                d["step"] = self.step
        return d


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


@dataclass
class SearchSpace:
    path: str
    study: dict
    common: dict[str, Param]
    families: dict[str, tuple[list[str], dict[str, Param]]]
    models: dict[str, dict[str, Param]]

    def for_model(self, name: str) -> dict[str, Param]:
        """common, then every family listing ``name`` (file order), then the model's own entry."""
        out = dict(self.common)
        for models, params in self.families.values():
            if name in models:
                out.update(params)
        out.update(self.models.get(name, {}))
        return out


STUDY_DEFAULTS = {"sampler": {"type": "tpe", "startup_trials": 6}, "pruner": {"type": "median", "startup_trials": 4,
                                                                             "warmup_epochs": 1}}


def load_search_space(name_or_path: str = "cpu") -> SearchSpace:
    """A search-space YAML file (or a packaged one by name: ``cpu``), checked entry by entry: every key must
    be a tunable config key and every value it can take (a range's ends, each choice) a valid value of it."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(SPACE_DIR, f"{name_or_path}.yaml")
        if not os.path.exists(path):
            known = sorted(p[:-5] for p in os.listdir(SPACE_DIR) if p.endswith(".yaml"))
            raise FileNotFoundError(f"no search-space file {name_or_path!r} and no packaged one of that name; "
                                    f"packaged: {known}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SearchSpaceError(f"search space {path}: not a valid YAML file ({' '.join(str(exc).split())})") from None

    def fail(where: str, msg: str):
        raise SearchSpaceError(f"search space {path}: {where}: {msg}")

    if not isinstance(raw, dict):
        fail("top level", f"a mapping of study, common, families, models is needed, got {raw!r}")
    unknown = sorted(set(raw) - {"study", "common", "families", "models"})
    if unknown:
        fail("top level", f"unknown section(s) {unknown}; known: common, families, models, study")
    study = _study_settings(raw.get("study"), lambda w, m: fail(f"study.{w}", m))
    common = _params(raw.get("common"), "common", fail)
    families = {}
    fams = raw.get("families") or {}
    if not isinstance(fams, dict):
        fail("families", f"a mapping of family name -> {{models: [...], space: {{...}}}}, got {fams!r}")
    for fam, body in fams.items():
        if not isinstance(body, dict) or set(body) - {"models", "space"} or "models" not in body:
            fail(f"families.{fam}", f"needs 'models' (a list of model names) and 'space'; got {body!r}")
        models = body["models"]
        if not isinstance(models, list) or not models:
            fail(f"families.{fam}.models", f"a non-empty list of model names, got {models!r}")
        for m in models:
            _check_model(m, f"families.{fam}.models", fail)
        families[fam] = ([canonical_name(m) for m in models], _params(body.get("space"), f"families.{fam}.space", fail))
    models = {}
    own = raw.get("models") or {}
    if not isinstance(own, dict):
        fail("models", f"a mapping of model name -> space, got {own!r}")
    for m, body in own.items():
        _check_model(m, "models", fail)
        models[canonical_name(m)] = _params(body, f"models.{m}", fail)
    return SearchSpace(path, study, common, families, models)


def _check_model(m, where, fail) -> None:
    if not isinstance(m, str) or canonical_name(m) not in MODEL_REGISTRY:
        fail(where, f"unknown model {m!r}; known: {sorted(MODEL_REGISTRY)}")


def _study_settings(raw, fail) -> dict:
    out = json.loads(json.dumps(STUDY_DEFAULTS))
    if raw is None:
        return out
    if not isinstance(raw, dict) or set(raw) - set(out):
        fail("", f"a mapping with sampler and pruner, got {raw!r}")
    allowed = {"sampler": {"type": ("tpe",), "startup_trials": int},
               "pruner": {"type": ("median", "none"), "startup_trials": int, "warmup_epochs": int}}
    for part, body in raw.items():
        if not isinstance(body, dict):
            fail(part, f"a mapping, got {body!r}")
        for k, v in body.items():
            rule = allowed[part].get(k)
            if rule is None:
                fail(f"{part}.{k}", f"unknown setting; known: {sorted(allowed[part])}")
            if isinstance(rule, tuple) and v not in rule:
                fail(f"{part}.{k}", f"{v!r}; allowed: {', '.join(rule)}")
            if rule is int and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                fail(f"{part}.{k}", f"{v!r}; allowed: an integer >= 0")
            out[part][k] = v
    return out


def _params(body, where: str, fail) -> dict[str, Param]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        fail(where, f"a mapping of config key -> parameter, got {body!r}")
    return {key: _param(key, spec, f"{where}.{key}", fail) for key, spec in body.items()}


def _param(key, spec, where: str, fail) -> Param:
    _check_key(key, where, fail)
    if not isinstance(spec, dict):
        fail(where, f"a parameter mapping such as {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in KINDS:
        fail(where, f"type {kind!r}; allowed: {', '.join(KINDS)}")
    known = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
             "categorical": {"type", "choices"}}[kind]
    extra = sorted(set(spec) - known)
    if extra:
        fail(where, f"unknown setting(s) {extra} for a {kind} parameter; known: {sorted(known)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            fail(where, f"choices must be a non-empty list, got {choices!r}")
        p = Param(key, kind, choices=choices)
    else:
        num = (int,) if kind == "int" else (int, float)
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        for name, v in (("low", low), ("high", high)):
            if not isinstance(v, num) or isinstance(v, bool) or not math.isfinite(v):
                fail(where, f"{name} = {v!r}; allowed: {'an integer' if kind == 'int' else 'a number'}")
        if not low < high:
            fail(where, f"low = {low!r} must be < high = {high!r}")
        if not isinstance(log, bool):
            fail(where, f"log = {log!r}; allowed: true or false")
        if log and low <= 0:
            fail(where, f"log: true needs low > 0, got low = {low!r}")
        if step is not None and (not isinstance(step, num) or isinstance(step, bool) or step <= 0 or log):
            fail(where, f"step = {step!r}; allowed: a positive {'integer' if kind == 'int' else 'number'}, "
                        "and not with log: true")
        p = Param(key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high,
                  log, step)
    for v in p.values_to_check():
        try:
            apply_params(Config(), {key: v})
        except ConfigError as exc:
            fail(where, f"the value {v!r} is not valid for the config ({exc})")
    return p


def _check_key(key, where: str, fail) -> None:
    from .config import ModelConfig, TrainConfig

    parts = key.split(".") if isinstance(key, str) else []
    if len(parts) not in (2, 3) or parts[0] not in ("model", "train", "data"):
        fail(where, f"{key!r} is not a config key; expected section.field (model.* or train.*) or "
                    "model.<fim>.<option>, e.g. train.lr, model.gdcn.num_layers")
    if parts[0] == "data":
        fail(where, "data.* cannot be tuned: every trial and every model must see the same data")
    if key in NOT_TUNABLE:
        fail(where, f"{key} cannot be tuned: {NOT_TUNABLE[key]}")
    cls = {"model": ModelConfig, "train": TrainConfig}[parts[0]]
    names = [f.name for f in dataclasses.fields(cls)]
    if parts[1] not in names:
        fail(where, f"unknown config key {parts[0]}.{parts[1]}; known keys of {parts[0]}: {sorted(names)}")
    if len(parts) == 3:
        if parts[1] not in FIM_OPTIONS:
            fail(where, f"{parts[0]}.{parts[1]} has no options; options exist for {sorted(FIM_OPTIONS)}")
        if parts[2] not in FIM_OPTIONS[parts[1]]:
            fail(where, f"unknown option {parts[2]!r} of model.{parts[1]}; known: {sorted(FIM_OPTIONS[parts[1]])}")
    elif parts[1] in FIM_OPTIONS:
        fail(where, f"tune the options of model.{parts[1]} one by one, e.g. model.{parts[1]}."
                    f"{sorted(FIM_OPTIONS[parts[1]])[0]}")


def apply_params(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with ``{"train.lr": 1e-3, "model.gdcn.num_layers": 2, ...}`` applied and checked."""
    over: dict = {}
    for key, value in values.items():
        node = over
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(over, cfg)


def config_value(cfg: Config, key: str):
    node = cfg
    for p in key.split("."):
        node = node[p] if isinstance(node, dict) else getattr(node, p)
    return node


def default_params(cfg: Config, params: dict[str, Param]) -> dict[str, Any]:
    """The base config's values of the tuned keys that lie in the space, as Optuna stores them (trial 0)."""
    out = {}
    for key, p in params.items():
        v = config_value(cfg, key)
        if p.contains(v):
            out[key] = p.encode(next(c for c in p.choices if _same(v, c)) if p.kind == "categorical" else v)
    return out


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
    from .train.checkpoint import data_key, digest, encoder_fingerprint, run_config

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
    from .models import build_model
    from .train import TrainingDivergedError, Trainer
    from .train.trainer import seed_everything

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
    from .train.checkpoint import ensure_writable

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
        from .train import write_metrics

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
    from .train.checkpoint import atomic_write_text

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


# ---- several studies -----------------------------------------------------------------------------
def _job(name: str, base_dict: dict, space_path: str, out_dir: str, settings: dict, fresh: bool, queue) -> dict:
    """One study in a worker process (``--jobs`` > 1): loads the data itself, reports through ``queue``."""
    from .data import load_dataset

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
    from .train.checkpoint import digest

    key = digest(dataclasses.asdict(base.data))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load(base.data, progress=False)
    return _DATA[key]


class _Progress:
    """One progress bar over every study's remaining trials, and a log line per finished trial."""

    def __init__(self, total: int, log):
        from .train.trainer import tqdm

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
    from .train import write_metrics
    from .train.checkpoint import atomic_write_text, ensure_writable

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
                from .data import load_dataset

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


def tune_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"Studies: {s['trials']} trials per model (TPE, median pruning on the per-epoch validation AUC), each "
             f"trial on {s['subsample']:.0%} of the train split for at most {s['max_epochs'] or 'the config'} epochs; "
             f"score: the best mean validation AUC over the trial's epochs. {_span(summary)}\n",
             "| Model | trials (complete / pruned / diverged) | base config score | best score | gain | best trial | "
             "trial time (min) | best parameters |", "|---|---|---|---|---|---|---|---|"]
    for m, st in summary["studies"].items():
        c, b, d = st["counts"], st["best"], st["default"]
        params = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in (b["params"] if b else {}).items())
        cells = [m, f"{c['finished']} ({c['complete']} / {c['pruned']} / {c['diverged']})",
                 f"{d['value']:.5f}" if d else "-", f"{b['value']:.5f}" if b else "-",
                 f"{b['value'] - d['value']:+.5f}" if b and d else "-", str(b["number"]) if b else "-",
                 f"{st['trial_seconds'] / 60:.1f}", params or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _span(summary: dict) -> str:
    span, (first, last) = summary.get("trials_span_seconds"), summary.get("trials_span") or (None, None)
    if span is None:
        return "No trial ran."
    return (f"The trials ran from {first[:16].replace('T', ' ')} to {last[:16].replace('T', ' ')} (machine clock): "
            f"{span / 60:.0f} min wall, pauses between sessions included; this invocation ran "
            f"{summary['jobs']} study(ies) at a time for {summary['wall_seconds'] / 60:.1f} min.")


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v).replace(" ", "")


def load_tuned(folder: str, models: list[str]) -> dict[str, str]:
    """``{model: <folder>/<model>/best.yaml}`` for ``models``; a missing one is an error naming it."""
    out = {canonical_name(m): os.path.join(folder, canonical_name(m), "best.yaml") for m in models}
    missing = [p for p in out.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--tuned {folder}: no tuned config {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; run dtn tune for that model first")
    return out
