"""The commands that train and evaluate models: train, evaluate, compare, table3, tune."""
from __future__ import annotations

import dataclasses
import errno
import os
import time

from .common import (_check_data_source, _check_model_name, _checkpoint_data_config, _load_data, _request, _seeds,
                     _split_table, _table)


def cmd_train(args) -> int:
    """Train one model; under torchrun (WORLD_SIZE > 1) every process joins one DDP job (gloo on CPU,
    NCCL on CUDA), reads its share of the data, and rank 0 writes checkpoints and metrics."""
    from .. import distributed as D
    from ..train import train_model

    from ..request_check import check_request

    cfg, explicit = _request(args)
    request = check_request(args, cfg, explicit, [args.model or cfg.model.name])
    name = _check_model_name(args.model or cfg.model.name)  # a tuned config names its model
    if "test" in request.empty_splits:
        print(f"note: the test split is empty ({request.empty_splits['test']}): there will be no test metrics")
    device = D.init_from_env(cfg.train.device)
    finished = False
    try:
        if device != cfg.train.device:
            cfg = cfg.replace(train=dataclasses.replace(cfg.train, device=device))
        main = D.is_main()
        world = D.rank_and_world()[1]
        if main:
            from ..train.checkpoint import ensure_writable

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
        finished = True
    finally:
        D.cleanup(drain=finished)
    return 0


def _resume_point(args, name: str, cfg):
    """(the loaded OUT/last.pt or False, its encoders or None): the checkpoint is checked against the model
    and the config before any data is read, and its encoders encode the data (never refitted)."""
    from ..data import TabularEncoder
    from ..train.checkpoint import check_encoder, check_resume, load_checkpoint

    path = os.path.join(args.out, "last.pt")
    if not os.path.exists(path):
        print(f"--resume: no {path} yet; starting a new run")
        return False, None
    ckpt = load_checkpoint(path)
    check_resume(ckpt, name, cfg.replace(model=dataclasses.replace(cfg.model, name=name)).to_dict())
    check_encoder(ckpt)
    encoder = TabularEncoder.from_state_dict(ckpt["encoder"]) if ckpt.get("encoder") else None
    return ckpt, encoder


def cmd_evaluate(args) -> int:
    from ..data import load_dataset
    from ..train import Trainer, load_checkpoint, model_from_checkpoint, write_metrics
    from ..train.checkpoint import FileWriteError, ensure_writable
    from ..train.model_file import runnable_config

    from ..request_check import check_split

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
    from ..compare import compare, to_markdown
    from ..request_check import relaimp_base
    from ..train.checkpoint import ensure_writable

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


def cmd_table3(args) -> int:
    from ..analysis.table3 import TABLE3_MODELS, table3, table3_markdown
    from ..config import ConfigError
    from ..request_check import relaimp_base
    from ..train.checkpoint import ensure_writable

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
    from ..config import ConfigError
    from ..request_check import check_request

    if not getattr(args, "tuned", None):
        cfg, explicit = _request(args)
        check_request(args, cfg, explicit, models, base=base, command=command)
        return cfg, None
    if args.config:
        raise ConfigError("give --config or --tuned, not both (--tuned takes each model's config from DIR/<model>/best.yaml)")
    from ..tune import load_tuned

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
    from ..config import ConfigError
    from ..train.checkpoint import ensure_writable
    from ..tune import StudySettings, load_search_space, require_optuna, tune

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
    from ..request_check import check_request

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
