"""The ``dtn`` command line: train, evaluate, compare.

  dtn train    --model dtn --config cpu --out runs/dtn [--resume]
  dtn evaluate --checkpoint runs/dtn/best.pt [--split test]
  dtn compare  --models shared_bottom,mmoe,ple,dtn --config cpu --out results/census-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml


def _overrides(pairs: list[str]) -> dict:
    """``section.key=value`` pairs (value parsed as YAML) -> a nested override dict."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects section.key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _config(args):
    from .config import config_from_dict, load_config

    over = _overrides(args.set)
    if getattr(args, "data_dir", None):
        over.setdefault("data", {})["path"] = args.data_dir
    if getattr(args, "dataset", None):
        over.setdefault("data", {})["dataset"] = args.dataset
    if getattr(args, "epochs", None):
        over.setdefault("train", {})["epochs"] = args.epochs
    if getattr(args, "threads", None):
        over.setdefault("train", {})["num_threads"] = args.threads
    cfg = load_config(args.config)
    return config_from_dict(over, cfg) if over else cfg


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu", help="packaged config name (cpu, paper) or a YAML file [cpu]")
    p.add_argument("--dataset", choices=["census", "synthetic"], help="override data.dataset")
    p.add_argument("--data-dir", help="folder with the Census-Income files (else $DTN_CENSUS_DIR, cache, download)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="any config override (repeatable)")


def _table(metrics: dict) -> str:
    return "\n".join(f"  {t:>12}: AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}" for t, m in metrics.items())


def cmd_train(args) -> int:
    from .data import load_dataset
    from .train import train_model

    cfg = _config(args)
    t0 = time.time()
    data = load_dataset(cfg.data)
    print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows, "
          f"{data.schema.num_fields} fields ({time.time() - t0:.1f}s)")
    trainer, result = train_model(args.model, data, cfg, out_dir=args.out, resume=args.resume)
    print(f"{result['model']}: {result['params']:,} parameters, best epoch {result['best_epoch']}")
    print("test:\n" + _table(result["test"]))
    print(f"checkpoints and metrics in {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    import dataclasses

    from .data import load_dataset
    from .train import Trainer, load_checkpoint, model_from_checkpoint, write_metrics

    ckpt = load_checkpoint(args.checkpoint)
    model, encoder, cfg = model_from_checkpoint(ckpt)
    data_cfg = cfg.data
    if args.data_dir:
        data_cfg = dataclasses.replace(data_cfg, path=args.data_dir)
    data = load_dataset(data_cfg, encoder=encoder)
    split = getattr(data, args.split)
    metrics = Trainer(model, cfg).evaluate(split)
    print(f"{ckpt['model_name']} on {args.split} ({len(split)} rows):\n" + _table(metrics))
    if args.out:
        write_metrics({"model": ckpt["model_name"], "split": args.split, "metrics": metrics}, args.out)
        print(f"written {args.out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, to_markdown
    from .data import load_dataset

    cfg = _config(args)
    t0 = time.time()
    data = load_dataset(cfg.data)
    print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows ({time.time() - t0:.1f}s)")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    summary = compare(args.models.split(","), data, cfg, args.out, base=args.base, seeds=seeds, resume=not args.fresh)
    print()
    print(to_markdown(summary))
    print(f"total {time.time() - t0:.0f}s; table in {os.path.join(args.out, 'compare.md')} and compare.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtn", description="DTN and multi-task baselines: train, evaluate, compare.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model")
    _common(t)
    t.add_argument("--model", default="dtn", help="shared_bottom, mmoe, ple, cgc, sfm, tfi, dtn [dtn]")
    t.add_argument("--out", default="runs/train", help="output folder [runs/train]")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=["train", "valid", "test"], default="test")
    e.add_argument("--data-dir")
    e.add_argument("--out", help="write metrics JSON here")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compare", help="train several models and print a Table-3-style table")
    _common(c)
    c.add_argument("--models", default="shared_bottom,mmoe,ple,dtn")
    c.add_argument("--base", default="shared_bottom", help="RelaImp base model [shared_bottom]")
    c.add_argument("--seeds", help="comma-separated seeds (mean ± std); default: the config's seed")
    c.add_argument("--out", default="results/compare", help="output folder [results/compare]")
    c.add_argument("--fresh", action="store_true", help="retrain even where OUT/<model>/metrics.json exists")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        from .train import TrainingDivergedError

        if os.environ.get("DTN_DEBUG"):
            raise
        kind = "training diverged" if isinstance(exc, TrainingDivergedError) else type(exc).__name__
        print(f"dtn {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
