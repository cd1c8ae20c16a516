"""The ``dtn`` command line: train, evaluate, compare, export.

  dtn train    --model dtn --config cpu --out runs/dtn [--resume]
  dtn evaluate --checkpoint runs/dtn/best.pt [--split test]
  dtn compare  --models shared_bottom,mmoe,ple,dtn --config cpu --out results/census-cpu

Your own data (docs/own-data.md):
  dtn example-data --layout aliexpress --rows 20000 --out data/ae.csv
  dtn train    --data-schema aliexpress --data data/ae.csv --out runs/ae [--stream] [--chunk-rows N]
  torchrun --nproc_per_node 2 -m dtn train --data-schema aliexpress --data data/ae.csv --out runs/ae-ddp
  dtn export   --checkpoint runs/ae/best.pt --out models/ae [--trim-threshold 0.08]

Analyses (docs/analysis.md):
  dtn importance --checkpoint runs/dtn/best.pt --out results/importance [--repeats 3]
  dtn gates      --checkpoint runs/dtn/best.pt --out results/gates
  dtn trim       --checkpoint runs/dtn/best.pt --threshold 0.08 --out results/trim
  dtn tsne       --checkpoint runs/dtn/best.pt --fim masknet --task income --out results/tsne
  dtn table3     --config cpu --seeds 1,2,3 --trim-threshold 0.08 --out results/table3-cpu

Tuning (docs/tuning.md; needs optuna: pip install 'dtn-kernels[tune]'):
  dtn tune       --models shared_bottom,mmoe,ple,sfm,tfi,dtn --config cpu --trials 16 --subsample 0.25 \
                 --max-epochs 4 --jobs 2 --out results/tune-cpu
  dtn train      --config results/tune-cpu/dtn/best.yaml --out runs/dtn-tuned
  dtn table3     --tuned results/tune-cpu --seeds 1,2,3,4,5 --out results/table3-tuned

Environment:
  dtn env [--device cuda] [--json]   versions, the compiled extension, the device, which kernels run

Errors: an expected failure (bad data, schema, config value or checkpoint; a file that cannot be read
or written) ends with one line on stderr naming the file, key or value, and exit status 2; ``--debug``
(or DTN_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import time


def _config(args, config: str | None = None):
    """The configuration from ``config`` (else --config, else ``cpu``), --set and the flags; every value
    converted and checked, contradictions and settings without effect refused (dtn.request_check), and the
    device checked to exist, before any data is read."""
    return _request(args, config)[0]


def _request(args, config: str | None = None, notes: bool = True):
    """(config, {key: the --set or flag that set it}) -- see :func:`dtn.request_check.request_config`."""
    from .request_check import request_config

    cfg, explicit = request_config(args, config, note=print if notes else None)
    _check_device(cfg.train.device)
    if cfg.model.embeddings == "torchrec":  # an optional package: say how to install it before any data is read
        from .features.torchrec_input import require_torchrec

        require_torchrec()
        from . import distributed as D
        from .train.sharded import check_request

        check_request(cfg, D.env_world_size())  # the tables' optimizer fits the sharding
    if cfg.train.log == "tensorboard":  # an optional package: say so before any data is read
        from .train.tblog import require_tensorboard

        require_tensorboard()
    return cfg, explicit


def _check_device(device: str) -> None:
    from .config import ConfigError

    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device!r}: this torch ({torch.__version__}) sees no CUDA device; "
                          "allowed here: 'cpu'")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"train.device = {device!r}: there are {torch.cuda.device_count()} CUDA device(s); "
                          f"allowed: 'cpu', 'cuda' or 'cuda:0'..'cuda:{torch.cuda.device_count() - 1}'")


def _check_model_name(name: str) -> str:
    from .models import MODEL_REGISTRY, canonical_name

    key = canonical_name(name)
    if key not in MODEL_REGISTRY:
        from .config import ConfigError

        raise ConfigError(f"unknown model {name!r}; known: {sorted(MODEL_REGISTRY)}")
    return key


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_data_source(ckpt: dict, data) -> None:
    """Warn when the data a checkpoint is applied to are not the data it was trained on."""
    from .train.checkpoint import source_diff

    diff = source_diff((ckpt.get("fingerprint") or {}).get("data"), getattr(data, "fingerprint", None))
    if diff:
        _warn(f"{ckpt.get('_path', 'the checkpoint')} was trained on other data: {'; '.join(diff[:3])}; "
              "using the checkpoint's encoders")


def _load_data(cfg, quiet: bool = False, encoder=None):
    """The configured data set (encoded with ``encoder`` when given, else with encoders fitted on it),
    with a one-line summary."""
    from .data import load_dataset

    t0 = time.time()
    data = load_dataset(cfg.data, encoder=encoder, progress=not quiet)
    if not quiet:
        mode = " (streamed)" if cfg.data.dataset == "table" and cfg.data.stream else ""
        print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows{mode}, "
              f"{data.schema.num_fields} fields ({time.time() - t0:.1f}s)")
    return data


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="packaged config name (cpu, paper) or a YAML file [cpu]")
    p.add_argument("--dataset", choices=["census", "synthetic"], help="override data.dataset")
    p.add_argument("--data-dir", help="folder with the Census-Income files (else $DTN_CENSUS_DIR, cache, download)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="any config override (repeatable); the value is converted to the key's type and checked")
    own = p.add_argument_group("your own data (a CSV / Parquet table; docs/own-data.md)")
    own.add_argument("--data-schema", metavar="YAML", help="data schema file, or a packaged one: aliexpress, ali_ccp")
    own.add_argument("--data", metavar="FILE", help="train file (overrides the schema's train)")
    own.add_argument("--valid", metavar="FILE", help="validation file (instead of holding out train rows)")
    own.add_argument("--test", metavar="FILE", help="test file (instead of holding out train rows)")
    own.add_argument("--stream", action="store_true", help="read the table chunk by chunk every epoch (larger than memory)")
    own.add_argument("--chunk-rows", type=int, help="rows per chunk (overrides the schema's chunk_rows)")
    own.add_argument("--workers", type=int, help="DataLoader worker processes reading chunks when streaming [0]")


def _num(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"  # an AUC is undefined where a split has one class


def _split_table(split: str, rows: int, metrics: dict) -> str:
    """The metrics of a split; an empty split says so in one line instead of a table of n/a."""
    if rows == 0:
        return f"{split}: AUC n/a, LogLoss n/a: the {split} split is empty (0 rows)"
    return f"{split}:\n" + _table(metrics)


def _table(metrics: dict) -> str:
    return "\n".join(f"  {t:>12}: AUC {_num(m['auc'])}  LogLoss {_num(m['logloss'])}" for t, m in metrics.items())


def cmd_train(args) -> int:
    """Train one model; under torchrun (WORLD_SIZE > 1) every process joins one DDP job (gloo on CPU,
    NCCL on CUDA), reads its share of the data, and rank 0 writes checkpoints and metrics."""
    from . import distributed as D
    from .train import train_model

    from .request_check import check_request

    cfg, explicit = _request(args)
    request = check_request(args, cfg, explicit, [args.model or cfg.model.name])
    name = _check_model_name(args.model or cfg.model.name)  # a tuned config names its model
    if "test" in request.empty_splits:
        print(f"note: the test split is empty ({request.empty_splits['test']}): there will be no test metrics")
    device = D.init_from_env(cfg.train.device)
    try:
        if device != cfg.train.device:
            cfg = cfg.replace(train=dataclasses.replace(cfg.train, device=device))
        main = D.is_main()
        world = D.rank_and_world()[1]
        if main:
            from .train.checkpoint import ensure_writable

            ensure_writable(args.out, "--out", keep=False)  # before any work that a failing first write would lose
        if main and world > 1:
            print(f"distributed: {world} processes, backend {D.dist.get_backend()}, device {device} (rank 0)")
        resume, encoder = _resume_point(args, name, cfg) if args.resume else (False, None)
        data = _load_data(cfg, quiet=not main, encoder=encoder)
        trainer, result = train_model(name, data, cfg, out_dir=args.out, resume=resume)
        if main:
            print(f"{result['model']}: {result['params']:,} parameters, best epoch {result['best_epoch']}"
                  + (" (selected on validation LogLoss)" if result.get("selection") == "logloss" else ""))
            print(_split_table("test", len(data.test), result["test"]))
            print(f"checkpoints and metrics in {args.out}")
    finally:
        D.cleanup()
    return 0


def _resume_point(args, name: str, cfg):
    """(the loaded OUT/last.pt or False, its encoders or None): the checkpoint is checked against the model
    and the config before any data is read, and its encoders encode the data (never refitted)."""
    from .data import TabularEncoder
    from .train.checkpoint import check_encoder, check_resume, load_checkpoint

    path = os.path.join(args.out, "last.pt")
    if not os.path.exists(path):
        print(f"--resume: no {path} yet; starting a new run")
        return False, None
    ckpt = load_checkpoint(path)
    check_resume(ckpt, name, cfg.replace(model=dataclasses.replace(cfg.model, name=name)).to_dict())
    check_encoder(ckpt)
    encoder = TabularEncoder.from_state_dict(ckpt["encoder"]) if ckpt.get("encoder") else None
    return ckpt, encoder


def _checkpoint_data_config(cfg, args):
    """The checkpoint's data config with --data-dir / --data (a moved data set) applied."""
    from .request_check import check_data_flags

    check_data_flags(args, cfg)
    data_cfg = cfg.data
    path = getattr(args, "data", None) or getattr(args, "data_dir", None)
    if path:
        data_cfg = dataclasses.replace(data_cfg, path=os.path.abspath(path) if cfg.data.dataset == "table" else path)
    return data_cfg


def cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .train import Trainer, load_checkpoint, model_from_checkpoint, write_metrics
    from .train.checkpoint import FileWriteError, ensure_writable
    from .train.model_file import runnable_config

    from .request_check import check_split

    ckpt = load_checkpoint(args.checkpoint)
    model, encoder, cfg = model_from_checkpoint(ckpt)
    cfg = runnable_config(cfg)
    data_cfg = _checkpoint_data_config(cfg, args)
    check_split(data_cfg, args.split, f"--split {args.split}")  # an empty split is refused before any data is read
    if args.out:
        if os.path.isdir(args.out):
            raise FileWriteError(f"--out {args.out}: a folder; --out names the metrics JSON file to write", errno.EISDIR)
        ensure_writable(os.path.dirname(os.path.abspath(args.out)), "--out folder", keep=False)
    data = load_dataset(data_cfg, encoder=encoder)
    _check_data_source(ckpt, data)
    split = getattr(data, args.split)
    check_split(data_cfg, args.split, f"--split {args.split}", rows=len(split))
    metrics = Trainer(model, cfg).evaluate(split)
    print(f"{ckpt['model_name']} on {args.split} ({len(split)} rows):\n" + _table(metrics))
    if args.out:
        write_metrics({"model": ckpt["model_name"], "split": args.split, "metrics": metrics}, args.out)
        print(f"written {args.out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, to_markdown
    from .request_check import relaimp_base
    from .train.checkpoint import ensure_writable

    models = [_check_model_name(m) for m in args.models.split(",")]
    seeds = _seeds(args.seeds) if args.seeds else [None]
    cfg, configs = _table_configs(args, models, base=args.base, command="compare")
    base = relaimp_base(args, models)
    ensure_writable(args.out, "--out", keep=False)
    t0 = time.time()
    data = _load_data(cfg)
    summary = compare(models, data, cfg, args.out, base=base, seeds=seeds, resume=not args.fresh, configs=configs)
    print()
    print(to_markdown(summary))
    print(f"total {time.time() - t0:.0f}s; table in {os.path.join(args.out, 'compare.md')} and compare.json")
    return 0


def _seeds(text: str) -> list[int]:
    from .config import ConfigError

    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: allowed: distinct comma-separated integers >= 0, e.g. 1,2,3")
    return seeds


def _check_flags(*rules) -> None:
    """(flag, value, ok, allowed) for each numeric flag: one that is not ok is refused before anything is read."""
    from .config import ConfigError

    for flag, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{flag} {value}: allowed: {allowed}")


def _threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        from .config import ConfigError

        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: allowed: an integer >= 1")
        import torch

        torch.set_num_threads(args.threads)


def cmd_importance(args) -> int:
    from .analysis import load_checkpoint_data
    from .analysis.importance import run_importance

    _check_flags(("--repeats", args.repeats, args.repeats >= 1, "an integer >= 1"),
                 ("--max-rows", args.max_rows, args.max_rows >= 0, "an integer >= 0 (0 = all rows)"))
    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    tasks = args.tasks.split(",") if args.tasks else None
    res, paths = run_importance(model, data, args.out, split=args.split, repeats=args.repeats, max_rows=args.max_rows,
                                seed=args.seed, tasks=tasks, batch_size=cfg.train.eval_batch_size)
    print(open(paths["md"]).read())
    print("written " + ", ".join(paths.values()))
    return 0


def cmd_gates(args) -> int:
    from .analysis import get_split, load_checkpoint_data
    from .analysis.gates import gate_weights, gates_markdown, require_gated, write_gates

    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    require_gated(model, "dtn gates")
    g = gate_weights(model, get_split(data, args.split), cfg.train.eval_batch_size)
    g["split"] = args.split
    paths = write_gates(g, args.out)
    print(f"mean gate weights on {args.split} ({g['rows']} rows):\n" + gates_markdown(g))
    print("written " + ", ".join(paths.values()))
    return 0


def cmd_trim(args) -> int:
    from .analysis import load_checkpoint_data
    from .analysis.gates import require_dtn, trim_markdown, trim_model, write_trim

    _check_flags(("--threshold", args.threshold, 0.0 <= args.threshold < 1.0, "a gate weight in [0, 1)"),
                 ("--latency-batch", args.latency_batch, args.latency_batch >= 1, "an integer >= 1"),
                 ("--repeats", args.repeats, args.repeats >= 1, "an integer >= 1"))
    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    require_dtn(model, "dtn trim")
    r = trim_model(model, data, args.threshold, latency_batch=args.latency_batch, latency_repeats=args.repeats,
                   eval_batch_size=cfg.train.eval_batch_size)
    r["checkpoint"] = args.checkpoint
    paths = write_trim(r, model, data.encoder, cfg, args.out)
    print(trim_markdown(r))
    print("written " + ", ".join(paths.values()))
    return 0


def cmd_tsne(args) -> int:
    from .analysis import get_split, load_checkpoint_data
    from .analysis.tsne import run_tsne

    _check_flags(("--samples", args.samples, args.samples >= 5, "an integer >= 5"),
                 ("--perplexity", args.perplexity, 0 < args.perplexity < args.samples,
                  f"a number > 0 and below --samples ({args.samples})"))
    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    paths = run_tsne(model, get_split(data, args.split), args.out, fim=args.fim, task=args.task, n=args.samples,
                     seed=args.seed, perplexity=args.perplexity)
    print("written " + ", ".join(paths.values()))
    return 0


def cmd_table3(args) -> int:
    from .analysis.table3 import TABLE3_MODELS, table3, table3_markdown
    from .config import ConfigError
    from .request_check import relaimp_base
    from .train.checkpoint import ensure_writable

    seeds = _seeds(args.seeds)
    models = [_check_model_name(m) for m in args.models.split(",")] if args.models else TABLE3_MODELS
    if not 0.0 <= args.trim_threshold < 1.0:
        raise ConfigError(f"--trim-threshold {args.trim_threshold}: allowed: a gate weight in [0, 1)")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap {args.bootstrap}: allowed: an integer >= 0 (0 = no significance test)")
    cfg, configs = _table_configs(args, models, base=args.base, command="table3")
    base = relaimp_base(args, models)
    ensure_writable(args.out, "--out", keep=False)
    t0 = time.time()
    data = _load_data(cfg)
    summary = table3(data, cfg, args.out, seeds=seeds, threshold=args.trim_threshold, models=models, base=base,
                     resume=not args.fresh, configs=configs, resamples=args.bootstrap)
    print()
    print(table3_markdown(summary))
    print(f"total {time.time() - t0:.0f}s; table in {os.path.join(args.out, 'compare.md')} and compare.json")
    return 0


def _table_configs(args, models: list[str], base: str | None = None, command: str = "compare"):
    """(the config, per-model configs or None): with --tuned DIR every model trains with DIR/<model>/best.yaml
    (--set and the flags applied to each); their data sections must agree, since the data are read once.
    The whole request (every model against the data schema, --base among --models) is checked here, before
    any data is read."""
    from .config import ConfigError
    from .request_check import check_request

    if not getattr(args, "tuned", None):
        cfg, explicit = _request(args)
        check_request(args, cfg, explicit, models, base=base, command=command)
        return cfg, None
    if args.config:
        raise ConfigError("give --config or --tuned, not both (--tuned takes each model's config from DIR/<model>/best.yaml)")
    from .tune import load_tuned

    paths = load_tuned(args.tuned, models)
    first = next(iter(paths))
    requests = {m: _request(args, path, notes=m == first) for m, path in paths.items()}
    configs = {m: r[0] for m, r in requests.items()}
    for m, c in configs.items():
        if dataclasses.asdict(c.data) != dataclasses.asdict(configs[first].data):
            raise ConfigError(f"{paths[m]}: its data section differs from {paths[first]}'s; every model of a table "
                              "must be trained on the same data")
    check_request(args, configs[first], requests[first][1], models, configs=configs, config_paths=paths, base=base,
                  command=command)
    return configs[first], configs


def cmd_tune(args) -> int:
    from .config import ConfigError
    from .train.checkpoint import ensure_writable
    from .tune import StudySettings, load_search_space, require_optuna, tune

    require_optuna()
    for flag, value, ok, allowed in (("--trials", args.trials, args.trials >= 1, "an integer >= 1"),
                                     ("--subsample", args.subsample, 0 < args.subsample <= 1, "a fraction in (0, 1]"),
                                     ("--max-epochs", args.max_epochs, args.max_epochs is None or args.max_epochs >= 1,
                                      "an integer >= 1"),
                                     ("--jobs", args.jobs, args.jobs >= 1, "an integer >= 1"),
                                     ("--threads", args.threads, args.threads is None or args.threads >= 1,
                                      "an integer >= 1")):
        if not ok:
            raise ConfigError(f"{flag} {value}: allowed: {allowed}")
    threads, args.threads = args.threads, None  # trial threads are not part of the tuned config
    models = [_check_model_name(m) for m in args.models.split(",")]
    cfg, explicit = _request(args)
    from .request_check import check_request

    check_request(args, cfg, explicit, models, command="tune")
    space = load_search_space(args.space)
    if threads is None and args.jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
    settings = StudySettings(trials=args.trials, subsample=args.subsample, max_epochs=args.max_epochs, seed=args.seed,
                             threads=threads)
    ensure_writable(args.out, "--out", keep=False)
    t0 = time.time()
    data = None if args.jobs > 1 else _load_data(cfg)
    tune(models, cfg, space, args.out, settings, jobs=args.jobs, fresh=args.fresh, data=data)
    print()
    with open(os.path.join(args.out, "tune.md"), encoding="utf-8") as fh:
        print(fh.read())
    print(f"total {time.time() - t0:.0f}s; best configs in {os.path.join(args.out, '<model>', 'best.yaml')}; "
          f"table: dtn table3 --tuned {args.out}")
    return 0


def cmd_export(args) -> int:
    from .config import ConfigError
    from .request_check import check_split
    from .serving import export_model
    from .train import load_checkpoint, model_from_checkpoint
    from .train.checkpoint import CheckpointError, ensure_writable
    from .train.model_file import runnable_config

    _threads(args)
    ckpt = load_checkpoint(args.checkpoint)
    model, encoder, cfg = model_from_checkpoint(ckpt)
    cfg = runnable_config(cfg)
    if args.trim_threshold is not None and not 0.0 <= args.trim_threshold < 1.0:
        raise ConfigError(f"--trim-threshold {args.trim_threshold}: allowed: a gate weight in [0, 1)")
    if args.trim_threshold is None and (args.data or args.data_dir):
        raise ConfigError(f"{'--data' if args.data else '--data-dir'} is read only with --trim-threshold (an export "
                          "without it reads no data); drop it, or add --trim-threshold")
    if args.trim_threshold is not None:
        from .analysis.gates import require_dtn

        require_dtn(model, "dtn export --trim-threshold")
        data_cfg = _checkpoint_data_config(cfg, args)
        check_split(data_cfg, "valid", "--trim-threshold (measured on the validation split)")
    if encoder is None or not encoder.fitted:
        raise CheckpointError(f"{args.checkpoint}: holds no fitted feature encoders; export needs them")
    ensure_writable(args.out, "--out", keep=False)
    extra = {"checkpoint": os.path.abspath(args.checkpoint), "trim": None,
             "fingerprint": ckpt.get("fingerprint"), "code_version": ckpt.get("code_version")}
    if args.trim_threshold is not None:
        from .data import load_dataset

        data = load_dataset(data_cfg, encoder=encoder)
        _check_data_source(ckpt, data)
        model.eval()
        weights = model.mean_gate_weights(b for b, _ in data.valid.batches(cfg.train.eval_batch_size))
        info = model.trim(weights, args.trim_threshold)
        extra["trim"] = {"threshold": args.trim_threshold, **info}
        print(f"trimmed at gate weight {args.trim_threshold} (measured on {len(data.valid)} validation rows): removed "
              f"{', '.join(info['removed']) or 'no FIM'}; {info['params_before']:,} -> {info['params_after']:,} parameters")
    t0 = time.time()
    paths = export_model(model, encoder, args.out, ckpt["model_name"], extra)
    print(f"exported {ckpt['model_name']} ({model.num_parameters():,} parameters) to {args.out} in {time.time() - t0:.1f}s: "
          + ", ".join(os.path.basename(p) for p in paths.values()))
    print(f"predict: python {os.path.join(args.out, 'predict.py')} rows.csv --out predictions.csv")
    return 0


def cmd_example_data(args) -> int:
    from .config import ConfigError
    from .data.examples import make_example_frame, write_table
    from .train.checkpoint import FileWriteError, ensure_writable

    for flag, value, ok, allowed in (("--rows", args.rows, args.rows >= 1, "an integer >= 1"),
                                     ("--seed", args.seed, args.seed >= 0, "an integer >= 0"),
                                     ("--row-group-rows", args.row_group_rows,
                                      args.row_group_rows is None or args.row_group_rows >= 1, "an integer >= 1")):
        if not ok:
            raise ConfigError(f"{flag} {value}: allowed: {allowed}")
    if not args.out.lower().endswith((".csv", ".parquet", ".pq")):
        raise ConfigError(f"--out {args.out}: allowed: a file name ending in .csv or .parquet (the format)")
    if args.row_group_rows is not None and not args.out.lower().endswith((".parquet", ".pq")):
        raise ConfigError(f"--row-group-rows {args.row_group_rows}: applies to a Parquet --out only; {args.out} is CSV")
    if os.path.isdir(args.out):
        raise FileWriteError(f"--out {args.out}: a folder; --out names the file to write", errno.EISDIR)
    ensure_writable(os.path.dirname(os.path.abspath(args.out)), "--out folder", keep=False)
    t0 = time.time()
    df = make_example_frame(args.layout, args.rows, args.seed)
    write_table(df, args.out, args.row_group_rows)
    rates = ", ".join(f"{c} {df[c].mean():.3f}" for c in df.columns if c in ("click", "conversion", "purchase"))
    print(f"wrote {args.out}: {len(df)} rows x {df.shape[1]} columns in the {args.layout} layout ({rates}; "
          f"{time.time() - t0:.1f}s)")
    return 0


def cmd_env(args) -> int:
    """What this installation will run: the report of ``python -m dtn_kernels`` (dtn_kernels.env)."""
    import json

    from dtn_kernels.env import format_report, report

    d = args.device
    if d is not None:
        import torch

        from .config import ConfigError

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok = d == "cpu" or (n and (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit() and int(d[5:]) < n)))
        if not ok:
            raise ConfigError(f"--device {d!r}: allowed here: 'cpu'" + (f", 'cuda' or 'cuda:0'..'cuda:{n - 1}'" if n else
                              f" (this torch, {torch.__version__}, sees no CUDA device)"))
    info = report(d)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _analysis_common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--checkpoint", required=True, help="a best.pt / trimmed.pt written by dtn train, compare or trim")
    p.add_argument("--data-dir", help="override the data path of the checkpoint's config")
    p.add_argument("--out", default=out, help=f"output folder [{out}]")
    p.add_argument("--threads", type=int, help="torch CPU threads")


class _Parser(argparse.ArgumentParser):
    """An argument error is one line and exit status 2, like every other error (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: argument error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dtn", description="DTN and multi-task baselines: train, evaluate, compare, export; the "
                                "paper's analyses: importance, gates, trim, tsne, table3 (docs/analysis.md); your own "
                                "CSV / Parquet data (docs/own-data.md). An expected failure prints one line and exits "
                                "with status 2 (README, Errors).")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(*a, **kw):  # every subcommand takes --debug too (SUPPRESS: `dtn --debug train` keeps it)
        sp = _add_parser(*a, **kw)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
        return sp

    sub.add_parser = add_parser

    t = sub.add_parser("train", help="train one model")
    _common(t)
    t.add_argument("--model", help="shared_bottom, mmoe, ple, cgc, sfm, tfi, dtn [the config's model.name: dtn, "
                   "or the model a dtn tune config was tuned for]")
    t.add_argument("--out", default="runs/train", help="output folder [runs/train]")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=["train", "valid", "test"], default="test")
    e.add_argument("--data-dir", help="Census-Income folder (if it moved)")
    e.add_argument("--data", metavar="FILE", help="the table's train file (if it moved)")
    e.add_argument("--out", help="write metrics JSON here")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="the model and its encoders as one folder for serving (torch.export)")
    x.add_argument("--checkpoint", required=True, help="a best.pt / trimmed.pt written by dtn train or trim")
    x.add_argument("--out", default="export", help="artifact folder [export]")
    x.add_argument("--trim-threshold", type=float, help="DTN only: trim gate candidates under this mean validation "
                   "weight before exporting (reads the checkpoint's validation data)")
    x.add_argument("--data-dir", help="Census-Income folder for --trim-threshold (if it moved)")
    x.add_argument("--data", metavar="FILE", help="the table's train file for --trim-threshold (if it moved)")
    x.add_argument("--threads", type=int, help="torch CPU threads")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("example-data", help="write a generated table in the AliExpress or Ali-CCP layout")
    d.add_argument("--layout", choices=["aliexpress", "ali_ccp"], required=True)
    d.add_argument("--rows", type=int, default=20000, help="rows [20000]")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True, help="output file: .csv or .parquet")
    d.add_argument("--row-group-rows", type=int, help="Parquet row group size [65536]")
    d.set_defaults(func=cmd_example_data)

    c = sub.add_parser("compare", help="train several models and print a Table-3-style table")
    _common(c)
    c.add_argument("--models", default="shared_bottom,mmoe,ple,dtn")
    c.add_argument("--base", help="RelaImp base model, one of --models [shared_bottom when among --models, else no "
                   "RelaImp]")
    c.add_argument("--seeds", help="comma-separated seeds (mean ± std); default: the config's seed")
    c.add_argument("--out", default="results/compare", help="output folder [results/compare]")
    c.add_argument("--fresh", action="store_true", help="retrain every model from scratch, replacing the runs in OUT "
                   "(without it a finished run of the same config, data and code is reused and any other run refused)")
    c.add_argument("--tuned", metavar="DIR", help="train each model with its tuned config DIR/<model>/best.yaml "
                   "(written by dtn tune) instead of --config")
    c.set_defaults(func=cmd_compare)

    i = sub.add_parser("importance", help="permutation feature importance per task (Table 1, Fig. 2)")
    _analysis_common(i, "results/importance")
    i.add_argument("--split", choices=["train", "valid", "test"], default="test")
    i.add_argument("--repeats", type=int, default=3, help="permutations per field (mean ± std) [3]")
    i.add_argument("--max-rows", type=int, default=20000, help="subsample the split to this many rows; 0 = all [20000]")
    i.add_argument("--tasks", help="the two tasks of the scatter plot, comma-separated [the first two]")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_importance)

    g = sub.add_parser("gates", help="mean gate weight per task and expert (MMoE, PLE / CGC, SFM, TFI) or candidate "
                       "FIM (DTN, Fig. 4)")
    _analysis_common(g, "results/gates")
    g.add_argument("--split", choices=["train", "valid", "test"], default="valid")
    g.set_defaults(func=cmd_gates)

    r = sub.add_parser("trim", help="DTN-trim a checkpoint; params, latency and AUC before and after")
    _analysis_common(r, "results/trim")
    r.add_argument("--threshold", type=float, required=True, help="switch off gate candidates under this mean weight")
    r.add_argument("--latency-batch", type=int, default=2048, help="rows per timed forward pass [2048]")
    r.add_argument("--repeats", type=int, default=30, help="timed forward passes (median reported) [30]")
    r.set_defaults(func=cmd_trim)

    s = sub.add_parser("tsne", help="t-SNE of FIM representations (Fig. 5)")
    _analysis_common(s, "results/tsne")
    s.add_argument("--split", choices=["train", "valid", "test"], default="test")
    s.add_argument("--fim", default="masknet", help="FIM kind for the per-task plot (Fig. 5a) [masknet]")
    s.add_argument("--task", help="task for the per-FIM-kind plot (Fig. 5b) [the first task]")
    s.add_argument("--samples", type=int, default=1000, help="rows embedded [1000]")
    s.add_argument("--perplexity", type=float, default=30.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_tsne)

    v = sub.add_parser("env", help="torch, triton and CUDA versions, the compiled extension, the device and which "
                       "kernels will run (as python -m dtn_kernels)")
    v.add_argument("--device", help="cpu, cuda or cuda:N [cuda when available, else cpu]")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=cmd_env)

    b = sub.add_parser("table3", help="Table 3: the baselines, DTN and DTN-trim, mean ± std over seeds")
    _common(b)
    b.add_argument("--models", help="comma-separated [shared_bottom,mmoe,ple,sfm,tfi,dtn]")
    b.add_argument("--base", help="RelaImp base model, one of --models [shared_bottom when among them, else no RelaImp]")
    b.add_argument("--seeds", default="1,2,3", help="comma-separated seeds [1,2,3]")
    b.add_argument("--trim-threshold", type=float, default=0.08, help="DTN-trim gate-weight threshold [0.08]")
    b.add_argument("--out", default="results/table3", help="output folder [results/table3]")
    b.add_argument("--fresh", action="store_true", help="retrain every model from scratch, replacing the runs in OUT")
    b.add_argument("--tuned", metavar="DIR", help="train each model with its tuned config DIR/<model>/best.yaml "
                   "(written by dtn tune) instead of --config")
    b.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the test rows for the "
                   "significance of DTN's AUC differences; 0 = none [1000]")
    b.set_defaults(func=cmd_table3)

    u = sub.add_parser("tune", help="hyperparameter search (Optuna TPE + median pruning), one study per model, "
                       "same trial budget; writes OUT/<model>/best.yaml")
    _common(u)
    u.add_argument("--models", default="shared_bottom,mmoe,ple,sfm,tfi,dtn", help="comma-separated, one study each "
                   "[shared_bottom,mmoe,ple,sfm,tfi,dtn]")
    u.add_argument("--space", default="cpu", help="search-space YAML, or a packaged one: cpu [cpu]")
    u.add_argument("--trials", type=int, default=16, help="finished trials per model (completed, pruned or diverged) "
                   "[16]; rerunning with more extends a study")
    u.add_argument("--subsample", type=float, default=1.0, help="fraction of the train split each trial trains on "
                   "(a fixed random subset) [1.0]")
    u.add_argument("--max-epochs", type=int, help="epoch cap per trial [the config's train.epochs]")
    u.add_argument("--jobs", type=int, default=1, help="studies run at once, in worker processes [1]")
    u.add_argument("--seed", type=int, default=0, help="sampler and subsample seed [0]")
    u.add_argument("--out", default="results/tune", help="output folder: OUT/<model>/{study.db,best.yaml,summary.json}, "
                   "OUT/tune.md [results/tune]")
    u.add_argument("--fresh", action="store_true", help="delete the stored studies and start again (without it an "
                   "interrupted study resumes)")
    u.set_defaults(func=cmd_tune)
    return p


# what a user can cause (bad input, config, checkpoint, files, the environment): one line, exit 2;
# anything else is a bug in dtn and keeps its traceback
EXPECTED = (ValueError, OSError, KeyError, RuntimeError, ImportError)


def describe_error(exc: BaseException) -> str:
    """One line for an expected failure: its kind, then the message that names the file, key or value."""
    from .compare import StaleRunError
    from .config import ConfigError
    from .data import DataError, SchemaError
    from .train import TrainingDivergedError
    from .train.checkpoint import CheckpointError, FileWriteError

    kinds = ((TrainingDivergedError, "training diverged"), (ConfigError, "config error"), (StaleRunError, "stale run"),
             (SchemaError, "data schema error"), (DataError, "data error"), (CheckpointError, "checkpoint error"),
             (FileWriteError, "write error"), (FileNotFoundError, "not found"), (PermissionError, "permission denied"))
    # never an exception's class name: a failure without a kind of its own is an "error" (a missing optional
    # package says which one to install)
    generic = ((ImportError, "missing package"), (OSError, "file error"), (Exception, "error"))
    kind = next((k for cls, k in kinds + generic if isinstance(exc, cls)), "error")
    if isinstance(exc, OSError) and not isinstance(exc, FileWriteError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        msg = f"{where}{exc.strerror}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]
    else:
        msg = str(exc) or "failed without a message (rerun with --debug for the traceback)"
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the original error's own line
        last = [ln for ln in msg.splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() else last
    return f"{kind}: {' '.join(msg.split())}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or bool(os.environ.get("DTN_DEBUG"))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"dtn {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as exc:
        if debug:
            raise
        print(f"dtn {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
