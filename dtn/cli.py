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
"""
from __future__ import annotations

import argparse
import dataclasses
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
    _own_data_overrides(args, over)
    cfg = load_config(args.config)
    cfg = config_from_dict(over, cfg) if over else cfg
    if getattr(args, "data", None) and cfg.data.dataset != "table":
        raise SystemExit("--data names a table file: give its data schema with --data-schema too")
    return cfg


def _own_data_overrides(args, over: dict) -> None:
    """--data-schema / --data / --valid / --test / --stream / --chunk-rows / --workers -> data.* overrides."""
    data = {}
    if getattr(args, "data_schema", None):
        schema = args.data_schema
        data.update(dataset="table", schema=os.path.abspath(schema) if os.path.exists(schema) else schema)
    for arg, key in (("data", "path"), ("valid", "valid_path"), ("test", "test_path")):
        if getattr(args, arg, None):
            data[key] = os.path.abspath(getattr(args, arg))
    if getattr(args, "stream", False):
        data["stream"] = True
    if getattr(args, "chunk_rows", None):
        data["chunk_rows"] = args.chunk_rows
    if getattr(args, "workers", None) is not None:
        data["num_workers"] = args.workers
    if data:
        over.setdefault("data", {}).update(data)


def _load_data(cfg, quiet: bool = False):
    """The configured data set, with a one-line summary."""
    from .data import load_dataset

    t0 = time.time()
    data = load_dataset(cfg.data, progress=not quiet)
    if not quiet:
        mode = " (streamed)" if cfg.data.dataset == "table" and cfg.data.stream else ""
        print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows{mode}, "
              f"{data.schema.num_fields} fields ({time.time() - t0:.1f}s)")
    return data


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu", help="packaged config name (cpu, paper) or a YAML file [cpu]")
    p.add_argument("--dataset", choices=["census", "synthetic"], help="override data.dataset")
    p.add_argument("--data-dir", help="folder with the Census-Income files (else $DTN_CENSUS_DIR, cache, download)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="any config override (repeatable)")
    own = p.add_argument_group("your own data (a CSV / Parquet table; docs/own-data.md)")
    own.add_argument("--data-schema", metavar="YAML", help="data schema file, or a packaged one: aliexpress, ali_ccp")
    own.add_argument("--data", metavar="FILE", help="train file (overrides the schema's train)")
    own.add_argument("--valid", metavar="FILE", help="validation file (instead of holding out train rows)")
    own.add_argument("--test", metavar="FILE", help="test file (instead of holding out train rows)")
    own.add_argument("--stream", action="store_true", help="read the table chunk by chunk every epoch (larger than memory)")
    own.add_argument("--chunk-rows", type=int, help="rows per chunk (overrides the schema's chunk_rows)")
    own.add_argument("--workers", type=int, help="DataLoader worker processes reading chunks when streaming [0]")


def _table(metrics: dict) -> str:
    return "\n".join(f"  {t:>12}: AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}" for t, m in metrics.items())


def cmd_train(args) -> int:
    """Train one model; under torchrun (WORLD_SIZE > 1) every process joins one DDP job (gloo on CPU,
    NCCL on CUDA), reads its share of the data, and rank 0 writes checkpoints and metrics."""
    from . import distributed as D
    from .train import train_model

    cfg = _config(args)
    device = D.init_from_env(cfg.train.device)
    try:
        if device != cfg.train.device:
            cfg = cfg.replace(train=dataclasses.replace(cfg.train, device=device))
        main = D.is_main()
        world = D.rank_and_world()[1]
        if main and world > 1:
            print(f"distributed: {world} processes, backend {D.dist.get_backend()}, device {device} (rank 0)")
        data = _load_data(cfg, quiet=not main)
        trainer, result = train_model(args.model, data, cfg, out_dir=args.out, resume=args.resume)
        if main:
            print(f"{result['model']}: {result['params']:,} parameters, best epoch {result['best_epoch']}")
            print("test:\n" + _table(result["test"]))
            print(f"checkpoints and metrics in {args.out}")
    finally:
        D.cleanup()
    return 0


def _checkpoint_data_config(cfg, args):
    """The checkpoint's data config with --data-dir / --data (a moved data set) applied."""
    data_cfg = cfg.data
    path = getattr(args, "data", None) or getattr(args, "data_dir", None)
    if path:
        data_cfg = dataclasses.replace(data_cfg, path=os.path.abspath(path) if cfg.data.dataset == "table" else path)
    return data_cfg


def cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .train import Trainer, load_checkpoint, model_from_checkpoint, write_metrics

    ckpt = load_checkpoint(args.checkpoint)
    model, encoder, cfg = model_from_checkpoint(ckpt)
    data = load_dataset(_checkpoint_data_config(cfg, args), encoder=encoder)
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


def cmd_export(args) -> int:
    from .serving import export_model
    from .train import load_checkpoint, model_from_checkpoint

    _threads(args)
    ckpt = load_checkpoint(args.checkpoint)
    model, encoder, cfg = model_from_checkpoint(ckpt)
    extra = {"checkpoint": os.path.abspath(args.checkpoint), "trim": None}
    if args.trim_threshold is not None:
        from .analysis.gates import require_dtn
        from .data import load_dataset

        require_dtn(model, "dtn export --trim-threshold")
        if not 0.0 <= args.trim_threshold < 1.0:
            raise ValueError(f"--trim-threshold must be in [0, 1), got {args.trim_threshold}")
        data = load_dataset(_checkpoint_data_config(cfg, args), encoder=encoder)
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
    from .data.examples import make_example_frame, write_table

    t0 = time.time()
    df = make_example_frame(args.layout, args.rows, args.seed)
    write_table(df, args.out, args.row_group_rows)
    rates = ", ".join(f"{c} {df[c].mean():.3f}" for c in df.columns if c in ("click", "conversion", "purchase"))
    print(f"wrote {args.out}: {len(df)} rows x {df.shape[1]} columns in the {args.layout} layout ({rates}; "
          f"{time.time() - t0:.1f}s)")
    return 0


def _analysis_common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--checkpoint", required=True, help="a best.pt / trimmed.pt written by dtn train, compare or trim")
    p.add_argument("--data-dir", help="override the data path of the checkpoint's config")
    p.add_argument("--out", default=out, help=f"output folder [{out}]")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtn", description="DTN and multi-task baselines: train, evaluate, compare, export; the "
                                "paper's analyses: importance, gates, trim, tsne, table3 (docs/analysis.md); your own "
                                "CSV / Parquet data (docs/own-data.md).")
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
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        from .train import TrainingDivergedError

        if os.environ.get("DTN_DEBUG"):
            raise
        kind = "training diverged" if isinstance(exc, TrainingDivergedError) else type(exc).__name__
        print(f"dtn {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
