"""``dtn tune``'s search spaces: the YAML file of tuned keys per model family, checked entry by entry
against the typed config (:func:`load_search_space`), and the values of a trial applied to a config."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional


from ..config import CONFIG_DIR, FIM_OPTIONS, Config, ConfigError, ModelConfig, TrainConfig, config_from_dict
from ..fileio import find_named_file, read_yaml
from ..models import MODEL_REGISTRY, canonical_name

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
    path = find_named_file(name_or_path, SPACE_DIR, "search-space", "one")
    raw = read_yaml(path, SearchSpaceError, "search space ")

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
