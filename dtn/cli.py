"""The ``dtn`` command line: train, evaluate, compare.

  dtn train    --model dtn --config cpu --out runs/dtn [--resume]
  dtn evaluate --checkpoint runs/dtn/best.pt [--split test]
  dtn compare  --models shared_bottom,mmoe,ple,dtn --config cpu --out results/census-cpu

Analyses (docs/analysis.md):
  dtn importance --checkpoint runs/dtn/best.pt --out results/importance [--repeats 3]
  dtn gates      --checkpoint runs/dtn/best.pt --out results/gates
  dtn trim       --checkpoint runs/dtn/best.pt --threshold 0.08 --out results/trim
  dtn tsne       --checkpoint runs/dtn/best.pt --fim masknet --task income --out results/tsne
  dtn table3     --config cpu --seeds 1,2,3 --trim-threshold 0.08 --out results/table3-cpu
"""
from __future__ import annotations

import argparse
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


def _load_data(cfg):
    """The configured data set, with a one-line summary."""
    from .data import load_dataset

    t0 = time.time()
    data = load_dataset(cfg.data)
    print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows, "
          f"{data.schema.num_fields} fields ({time.time() - t0:.1f}s)")
    return data


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
    from .train import train_model

    cfg = _config(args)
    data = _load_data(cfg)
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

    cfg = _config(args)
    t0 = time.time()
    data = _load_data(cfg)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    summary = compare(args.models.split(","), data, cfg, args.out, base=args.base, seeds=seeds, resume=not args.fresh)
    print()
    print(to_markdown(summary))
    print(f"total {time.time() - t0:.0f}s; table in {os.path.join(args.out, 'compare.md')} and compare.json")
    return 0


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_importance(args) -> int:
    from .analysis import load_checkpoint_data
    from .analysis.importance import run_importance

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
    from .analysis.gates import gate_weights, gates_markdown, require_dtn, write_gates

    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    require_dtn(model, "dtn gates")
    g = gate_weights(model, get_split(data, args.split), cfg.train.eval_batch_size)
    g["split"] = args.split
    paths = write_gates(g, args.out)
    print(f"mean gate weights on {args.split} ({g['rows']} rows):\n" + gates_markdown(g))
    print("written " + ", ".join(paths.values()))
    return 0


def cmd_trim(args) -> int:
    from .analysis import load_checkpoint_data
    from .analysis.gates import require_dtn, trim_markdown, trim_model, write_trim

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

    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    paths = run_tsne(model, get_split(data, args.split), args.out, fim=args.fim, task=args.task, n=args.samples,
                     seed=args.seed, perplexity=args.perplexity)
    print("written " + ", ".join(paths.values()))
    return 0


def cmd_table3(args) -> int:
    from .analysis.table3 import TABLE3_MODELS, table3, table3_markdown

    cfg = _config(args)
    t0 = time.time()
    data = _load_data(cfg)
    seeds = [int(s) for s in args.seeds.split(",")]
    models = args.models.split(",") if args.models else TABLE3_MODELS
    summary = table3(data, cfg, args.out, seeds=seeds, threshold=args.trim_threshold, models=models, base=args.base,
                     resume=not args.fresh)
    print()
    print(table3_markdown(summary))
    print(f"total {time.time() - t0:.0f}s; table in {os.path.join(args.out, 'compare.md')} and compare.json")
    return 0


def _analysis_common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--checkpoint", required=True, help="a best.pt / trimmed.pt written by dtn train, compare or trim")
    p.add_argument("--data-dir", help="override the data path of the checkpoint's config")
    p.add_argument("--out", default=out, help=f"output folder [{out}]")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtn", description="DTN and multi-task baselines: train, evaluate, compare; the paper's analyses: "
                                "importance, gates, trim, tsne, table3 (docs/analysis.md).")
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

    i = sub.add_parser("importance", help="permutation feature importance per task (Table 1, Fig. 2)")
    _analysis_common(i, "results/importance")
    i.add_argument("--split", choices=["train", "valid", "test"], default="test")
    i.add_argument("--repeats", type=int, default=3, help="permutations per field (mean ± std) [3]")
    i.add_argument("--max-rows", type=int, default=20000, help="subsample the split to this many rows; 0 = all [20000]")
    i.add_argument("--tasks", help="the two tasks of the scatter plot, comma-separated [the first two]")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_importance)

    g = sub.add_parser("gates", help="DTN mean gate weight of every candidate FIM per task (Fig. 4)")
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

    b = sub.add_parser("table3", help="Table 3: the baselines, DTN and DTN-trim, mean ± std over seeds")
    _common(b)
    b.add_argument("--models", help="comma-separated [shared_bottom,mmoe,ple,sfm,tfi,dtn]")
    b.add_argument("--base", default="shared_bottom", help="RelaImp base model [shared_bottom]")
    b.add_argument("--seeds", default="1,2,3", help="comma-separated seeds [1,2,3]")
    b.add_argument("--trim-threshold", type=float, default=0.08, help="DTN-trim gate-weight threshold [0.08]")
    b.add_argument("--out", default="results/table3", help="output folder [results/table3]")
    b.add_argument("--fresh", action="store_true", help="retrain even where finished runs exist")
    b.set_defaults(func=cmd_table3)
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
