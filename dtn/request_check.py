"""One check of the whole request -- config, data schema, model choice, command-line flags -- before any data is read.

``dtn train``, ``compare``, ``table3`` and ``tune`` call :func:`request_config` (the config from the config file,
``--set`` and the flags) and then :func:`check_request` (the config against the data schema and each model).
Every refusal is a :class:`dtn.config.ConfigError` (or a SchemaError of the data schema file) naming the file,
the key and the value in one line; the CLI's error boundary prints it with exit status 2.

The checks are driven by the definitions, so a key added to the config or the schema is covered as well:

* every ``--set`` is converted and checked on its own, also one that a later ``--set`` of the same key overrides
  (the later one wins, and a note says so) or that a flag would hide; a ``--set`` or flag that contradicts
  another flag is refused (``--epochs 2 --set train.epochs=5``; ``--data-schema`` with ``--set
  data.dataset=census``; ``--dataset`` with ``--data-schema``);
* a key given on the command line that has no effect in this run is refused: config fields carry
  ``metadata["applies"]`` (e.g. ``data.bucketize`` applies to ``data.dataset: census`` only; ``train.min_lr`` to the
  cosine and plateau schedules);
* the data schema (``dtn.data.table_schema``): kind-specific feature keys (``dtn.features.schema.kind_keys``), the
  keys' types, distinct label columns, a file named for two splits; and (here) an empty validation split, refused
  before any row is read, and an empty test split announced;
* each model's needs against the schema: the categorical fields MemoNet's HCNet crosses, ``model.memonet.fields``,
  ``model.task_order``, the experts of PLE / CGC / TFI / SFM, ``train.early_stop_metric`` and
  ``train.task_weights`` against the tasks; then the model is built once on the meta device (no memory), so any
  other need of its modules is reported here, naming the config and the schema, not after the data are read.
"""
from __future__ import annotations

import dataclasses
import os

import yaml

from .config import CONFIG_DIR, Config, ConfigError, Text, config_from_dict, load_config


# ---- the config from the command line ---------------------------------------------------------------
def parse_sets(pairs: list[str] | None) -> list[tuple[str, object, str]]:
    """``section.key=value`` pairs -> [(dotted key, value, the pair as given)] in order; a value stays text
    (:class:`dtn.config.Text`) until the config converts it to its key's type. A mapping given to an option
    mapping (``model.memonet={fields: 2}``) counts as its sub-keys, so two such --set merge key by key."""
    out: list[tuple[str, object, str]] = []
    default = Config()
    mappings = {f"{name}.{f.name}" for name in ("model", "train", "data")
                for f in dataclasses.fields(getattr(default, name)) if isinstance(getattr(getattr(default, name), f.name), dict)}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        parts = key.strip().split(".")
        if not eq or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {pair!r}: expected section.key=value, e.g. train.lr=0.001")
        dotted = ".".join(parts)
        items: list[tuple[str, object]] = [(dotted, Text(value))]
        if dotted in mappings:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None  # the config reports the YAML error with the key
            if isinstance(parsed, dict):
                items = [(f"{dotted}.{k}", v) for k, v in parsed.items()]
        for k, v in items:
            for other, _, other_pair in out:
                if other.startswith(k + ".") or k.startswith(other + "."):
                    raise ConfigError(f"--set {pair!r}: {min(k, other, key=len)} is set to a value and used as a "
                                      f"section (--set {other_pair!r})")
            out.append((k, v, pair))
    return out


def nested(flat: dict[str, object]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *head, last = dotted.split(".")
        for p in head:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _flag_overrides(args) -> list[tuple[str, str, object]]:
    """(flag, config key, value) for every flag given."""
    out = []
    if getattr(args, "data_schema", None):
        schema = args.data_schema
        out.append(("--data-schema", "data.dataset", "table"))
        out.append(("--data-schema", "data.schema", os.path.abspath(schema) if os.path.exists(schema) else schema))
    if getattr(args, "dataset", None):
        out.append(("--dataset", "data.dataset", args.dataset))
    if getattr(args, "data_dir", None):
        out.append(("--data-dir", "data.path", args.data_dir))
    for flag, attr, key in (("--data", "data", "data.path"), ("--valid", "valid", "data.valid_path"),
                            ("--test", "test", "data.test_path")):
        if getattr(args, attr, None):
            out.append((flag, key, os.path.abspath(getattr(args, attr))))
    if getattr(args, "stream", False):
        out.append(("--stream", "data.stream", True))
    for flag, attr, key in (("--chunk-rows", "chunk_rows", "data.chunk_rows"), ("--workers", "workers", "data.num_workers"),
                            ("--epochs", "epochs", "train.epochs"), ("--threads", "threads", "train.num_threads")):
        if getattr(args, attr, None) is not None:
            out.append((flag, key, getattr(args, attr)))
    return out


def _get(cfg: Config, dotted: str):
    section, *rest = dotted.split(".")
    node = getattr(cfg, section)
    for p in rest:
        node = node.get(p) if isinstance(node, dict) else getattr(node, p)
    return node


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str) and a != b and (os.sep in a or os.sep in b):
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return a == b


def config_where(args, config: str | None = None) -> str:
    """The config file a request uses, for messages."""
    name = config or getattr(args, "config", None) or "cpu"
    if os.path.exists(name):
        return name
    return f"config {name!r} ({os.path.join(CONFIG_DIR, name + '.yaml')})"


def request_config(args, config: str | None = None, note=None) -> tuple[Config, dict[str, str]]:
    """(the config from ``config`` (else --config, else ``cpu``), --set and the flags; {dotted key: what set it on
    the command line}). Every --set is checked on its own first; a flag and a --set or another flag that
    contradict each other are refused; ``note`` (e.g. print) is told of a --set overridden by a later one."""
    given = parse_sets(getattr(args, "set", None))
    flags = _flag_overrides(args)
    base = load_config(config or getattr(args, "config", None) or "cpu")
    # 1. every --set converted and checked against its key's type and range, before a later --set or a flag could
    # hide it; a key given twice takes the later value, and a note says so
    sets: dict[str, tuple[object, str]] = {}
    for key, value, pair in given:
        if key in sets and str(sets[key][0]).strip() != str(value).strip():
            config_from_dict(nested({key: sets[key][0]}), base)
            if note is not None:
                note(f"note: --set {sets[key][1]} is overridden by the later --set {pair} ({key} = {value})")
        sets[key] = (value, pair)
    with_sets = config_from_dict(nested({k: v for k, (v, _) in sets.items()}), base) if sets else base
    # 2. flags that contradict each other (--dataset census --data-schema s.yaml; --data-dir with --data)
    by_key: dict[str, tuple[str, object]] = {}
    for flag, key, value in flags:
        if key in by_key and not _same(by_key[key][1], value):
            raise ConfigError(f"{by_key[key][0]} and {flag} both set {key} ({by_key[key][1]!r} vs {value!r}); "
                              "give one of them")
        by_key.setdefault(key, (flag, value))
    # 3. flags applied; a --set of the same key must agree with the flag
    cfg = config_from_dict(nested({k: v for k, (_, v) in by_key.items()}), with_sets) if by_key else with_sets
    for key, (flag, _) in by_key.items():
        if key in sets and not _same(_get(with_sets, key), _get(cfg, key)):
            raise ConfigError(f"--set {sets[key][1]} contradicts {flag}, which sets {key} = {_get(cfg, key)!r}; "
                              "drop one of them")
    explicit = {k: f"--set {pair}" for k, (_, pair) in sets.items()}
    explicit.update({k: flag for k, (flag, _) in by_key.items()})
    if getattr(args, "data", None) and cfg.data.dataset != "table":
        raise ConfigError("--data names a table file: give its data schema with --data-schema too")
    if getattr(args, "data_dir", None) and cfg.data.dataset == "table":
        raise ConfigError(f"--data-dir {args.data_dir}: names the Census-Income folder; a table's train file is given "
                          "with --data (and its data schema with --data-schema)")
    check_applicable(cfg, explicit)
    return cfg, explicit


def check_applicable(cfg: Config, explicit: dict[str, str]) -> None:
    """A key given on the command line must have an effect in this run: its field's ``metadata["applies"]``
    ({other key of the section: allowed values}) must hold."""
    for dotted, origin in explicit.items():
        section, _, name = dotted.partition(".")
        dc = getattr(cfg, section, None)
        fld = next((f for f in dataclasses.fields(dc) if f.name == name), None) if dc is not None else None
        applies = fld.metadata.get("applies") if fld is not None else None
        for other, allowed in (applies or {}).items():
            value = getattr(dc, other)
            if value not in allowed:
                shown = " or ".join(repr(a) for a in allowed)
                via = explicit.get(f"{section}.{other}")
                raise ConfigError(f"{origin}: {dotted} applies only where {section}.{other} is {shown}; here "
                                  f"{section}.{other} = {value!r}{f' ({via})' if via else ''}, so it would be ignored")


# ---- the schema before any data is read ---------------------------------------------------------------
@dataclasses.dataclass
class RequestSchema:
    schema: object  # dtn.features.Schema, cardinalities unknown until the data are read
    where: str  # the schema file (or the data set) for messages
    empty_splits: dict  # split -> why it will be empty


def request_schema(cfg: Config) -> RequestSchema:
    """The feature schema of the configured data, from the data schema file or the data set's definition."""
    from .data import census_schema, synthetic_schema

    d = cfg.data
    if d.dataset == "table":
        from .data.table_schema import load_table_schema

        if not d.schema:
            raise ConfigError("data.dataset = 'table': set data.schema to a data schema YAML (--data-schema)")
        ts = load_table_schema(d.schema, train=d.path, valid=d.valid_path, test=d.test_path, chunk_rows=d.chunk_rows)
        where = ts.path
        empty = {s: f"{where}: split.{s} is 0 and there is no {s} file" for s in ("valid", "test")
                 if not getattr(ts, s) and ts.fractions()[s] == 0}
        if "valid" in empty:
            raise ConfigError(f"the validation split is empty ({empty['valid']}): model selection needs validation "
                              "rows (set split.valid > 0, or give a file with --valid)")
        return RequestSchema(ts.feature_schema(), where, empty)
    if d.dataset == "census":
        return RequestSchema(census_schema(d.bucketize, d.numeric_ids), "the Census-Income data (data.dataset = "
                             "'census')", {})
    return RequestSchema(synthetic_schema(), "the synthetic data (data.dataset = 'synthetic')", {})


def check_data_flags(args, cfg: Config) -> None:
    """--data / --data-dir of a command that reads a checkpoint's data (evaluate, export --trim-threshold) must
    fit the data set the checkpoint was trained on."""
    data, data_dir, dataset = getattr(args, "data", None), getattr(args, "data_dir", None), cfg.data.dataset
    ckpt = getattr(args, "checkpoint", "the checkpoint")
    if data and data_dir:
        raise ConfigError("--data and --data-dir both give the data's place; give one of them")
    if data and dataset != "table":
        raise ConfigError(f"--data {data}: {ckpt} was trained on data.dataset = {dataset!r}, not a table file"
                          + (" (its folder is --data-dir)" if dataset == "census" else ""))
    if data_dir and dataset != "census":
        raise ConfigError(f"--data-dir {data_dir}: {ckpt} was trained on data.dataset = {dataset!r}, not the "
                          "Census-Income folder" + (" (its train file is --data)" if dataset == "table" else ""))


def relaimp_base(args, models: list[str], note=print) -> str | None:
    """The RelaImp base of compare / table3: --base (checked to be among --models by :func:`check_request`), else
    shared_bottom when it is among --models, else none (and a note says so)."""
    if args.base:
        return args.base
    if "shared_bottom" in models:
        return "shared_bottom"
    note(f"note: no RelaImp column: --models ({','.join(models)}) leaves out shared_bottom, the default base; name "
         "one of them with --base")
    return None


def check_split(data_cfg, split: str, context: str, rows: int | None = None) -> None:
    """A split a command works on must hold rows: refused before any data is read where the data schema says it
    will be empty (``split.test: 0`` and no test file), else once read (``rows`` == 0)."""
    from .data import DataError

    if rows is not None:
        if rows == 0:
            raise DataError(f"{context}: the {split} split is empty (0 rows); there is nothing to work on")
        return
    if data_cfg.dataset != "table" or split == "train" or not data_cfg.schema:
        return
    from .data.table_schema import load_table_schema

    ts = load_table_schema(data_cfg.schema, train=data_cfg.path, valid=data_cfg.valid_path, test=data_cfg.test_path)
    if not getattr(ts, split) and ts.fractions()[split] == 0:
        raise ConfigError(f"{context}: the {split} split is empty ({ts.path}: split.{split} is 0 and there is "
                          f"no {split} file); there is nothing to work on")


# ---- each model against the schema --------------------------------------------------------------------
def _memonet_key(name: str, m) -> str | None:
    if name in ("dtn", "sfm") and "memonet" in m.fims:
        return "model.fims"
    if name == "tfi" and m.tfi_fim == "memonet":
        return "model.tfi_fim"
    return None


def _source(key: str, explicit: dict[str, str], cfg_where: str) -> str:
    """Where a key's value came from: the --set or flag that gave it, else the config file."""
    for k in (key, key.rsplit(".", 1)[0]):
        if k in explicit:
            return explicit[k]
    return f"in {cfg_where}"


def _check_memonet(name: str, m, schema, where: str, cfg_where: str, explicit: dict[str, str]) -> None:
    key = _memonet_key(name, m)
    if key is None:
        return
    fields_at = _source("model.memonet.fields", explicit, cfg_where)
    cats = [f.name for f in schema.categorical]
    kinds = {f.name: f.kind for f in schema.features}
    fields = (m.memonet or {}).get("fields")
    if fields is None:
        crossed = cats
    elif isinstance(fields, int):
        crossed = cats[:fields]
    else:
        crossed = []
        for f in fields:
            if isinstance(f, int) and not 0 <= f < len(cats):
                raise ConfigError(f"model.memonet.fields = {fields!r} ({fields_at}): position {f} is not a categorical "
                                  f"feature of {where} (it has {len(cats)}: {cats})")
            if isinstance(f, str) and f not in cats:
                what = f"a {kinds[f]} feature" if f in kinds else "not a feature"
                raise ConfigError(f"model.memonet.fields = {fields!r} ({fields_at}): {f!r} is {what} of {where}; "
                                  f"MemoNet crosses categorical features: {cats}")
            crossed.append(cats[f] if isinstance(f, int) else f)
        dup = sorted({c for c in crossed if crossed.count(c) > 1})
        if dup:
            raise ConfigError(f"model.memonet.fields = {fields!r} ({fields_at}): {dup} listed more than once")
    if len(crossed) < 2:
        if key == "model.fims":
            rest = [k for k in m.fims if k != "memonet"] or ["gdcn"]
            fix = f"--set model.fims=[{', '.join(rest)}]"
        else:
            fix = "--set model.tfi_fim=gdcn"
        raise ConfigError(f"{name}: {key} ({_source(key, explicit, cfg_where)}) includes memonet, whose HCNet "
                          f"crosses pairs of categorical features, but {where} has {len(cats)} categorical feature(s) {cats}: at least 2 are needed; "
                          f"add categorical features to {where}, or change {key} ({fix})")


def check_model(name: str, cfg: Config, schema, where: str, cfg_where: str, explicit: dict[str, str] | None = None
                ) -> None:
    """``name`` with ``cfg`` can be built for ``schema``; else a ConfigError naming both files and the key
    (and the --set or flag that gave it)."""
    from .models import build_model

    explicit = explicit or {}
    m, tasks = cfg.model, list(schema.labels)

    def at(key):
        return _source(key, explicit, cfg_where)

    _check_memonet(name, m, schema, where, cfg_where, explicit)
    if m.task_order is not None and sorted(m.task_order) != sorted(tasks):
        raise ConfigError(f"model.task_order = {m.task_order} ({at('model.task_order')}): allowed: an order of the "
                          f"tasks {tasks} of {where}")
    uses_ple = name in ("ple", "cgc", "tfi") or (name == "sfm" and m.sfm_mtl == "ple")
    if uses_ple and m.num_specific_experts + m.num_shared_experts < 1:
        raise ConfigError(f"{name}: model.num_specific_experts and model.num_shared_experts are both 0 "
                          f"({at('model.num_specific_experts')}; {at('model.num_shared_experts')}); "
                          "allowed: at least one expert per task (set either to >= 1)")
    t = cfg.train
    if t.task_weights is not None and len(t.task_weights) != len(tasks):
        raise ConfigError(f"train.task_weights = {t.task_weights} ({at('train.task_weights')}): "
                          f"{len(t.task_weights)} weight(s) for the {len(tasks)} tasks {tasks} of {where}; allowed: one weight >= 0 per task")
    if t.early_stop_metric != "mean_auc" and t.early_stop_metric[4:] not in tasks:
        raise ConfigError(f"train.early_stop_metric = {t.early_stop_metric!r} ({at('train.early_stop_metric')}): "
                          f"allowed: 'mean_auc' or one of {['auc/' + x for x in tasks]} (the tasks of {where})")
    # anything else a module needs: build the model once without memory (meta tensors), then on the CPU if the
    # meta build is what failed
    from .features import Schema

    placeholder = Schema([dataclasses.replace(f, cardinality=max(f.cardinality, f.hash_buckets, 2))
                          for f in schema.features], labels=tasks, label_columns=schema.label_columns)
    try:
        build_model(name, placeholder, m, device="meta")
    except Exception:  # noqa: BLE001 -- a module that cannot live on the meta device: try the CPU
        try:
            build_model(name, placeholder, m, device="cpu")
        except ValueError as exc:  # what the models raise for a config or schema they cannot take
            raise ConfigError(f"{name} cannot be built with {cfg_where} for {where}: {' '.join(str(exc).split())}") \
                from None
        except Exception:  # noqa: BLE001 -- anything else (e.g. the environment) is for the real build to report
            pass


def check_model_name(cfg: Config, explicit: dict[str, str]) -> None:
    from .models import MODEL_REGISTRY, canonical_name

    if canonical_name(cfg.model.name) not in MODEL_REGISTRY:
        where = explicit.get("model.name", "the config")
        raise ConfigError(f"model.name = {cfg.model.name!r} ({where}): allowed: one of {sorted(MODEL_REGISTRY)}")


def check_request(args, cfg: Config, explicit: dict[str, str], models: list[str], configs: dict | None = None,
                  config_paths: dict | None = None, base: str | None = None, command: str = "train") -> RequestSchema:
    """The config, the schema and every model of a request checked together, before any data is read; returns
    the schema (and the splits that will be empty)."""
    from .models import canonical_name

    if command == "train":
        if "model.name" in explicit and getattr(args, "model", None) and \
                canonical_name(cfg.model.name) != canonical_name(args.model):
            raise ConfigError(f"{explicit['model.name']} contradicts --model {args.model}; drop one of them")
        if getattr(args, "model", None):
            from .models import MODEL_REGISTRY

            if canonical_name(args.model) not in MODEL_REGISTRY:
                raise ConfigError(f"unknown model {args.model!r}; known: {sorted(MODEL_REGISTRY)}")
        else:
            check_model_name(cfg, explicit)
        models = [canonical_name(m) for m in models]
    elif "model.name" in explicit:
        raise ConfigError(f"{explicit['model.name']}: dtn {command} trains the models of --models; model.name is "
                          "not used (drop it)")
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise ConfigError(f"--models lists {dup} more than once")
    if base is not None and canonical_name(base) not in models:
        raise ConfigError(f"--base {base}: the RelaImp base model must be one of --models {models} (add it to "
                          "--models, or choose --base among them)")
    rs = request_schema(cfg)
    for name in models:
        own = (configs or {}).get(name, cfg)
        where = (config_paths or {}).get(name) or config_where(args)
        check_model(name, own, rs.schema, rs.where, where, explicit)
    return rs


__all__ = ["check_data_flags", "relaimp_base", "check_split", "parse_sets", "request_config", "check_applicable", "request_schema", "check_model",
           "check_request", "RequestSchema", "config_where"]
