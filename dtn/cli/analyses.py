"""The paper's analyses of a checkpoint: importance, gates, trim, tsne (docs/analysis.md)."""
from __future__ import annotations

from .common import _check_flags, _threads


def cmd_importance(args) -> int:
    from ..analysis import load_checkpoint_data
    from ..analysis.importance import run_importance

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
    from ..analysis import get_split, load_checkpoint_data
    from ..analysis.gates import gate_weights, gates_markdown, require_gated, write_gates

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
    from ..analysis import load_checkpoint_data
    from ..analysis.gates import require_dtn, trim_markdown, trim_model, write_trim

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
    from ..analysis import get_split, load_checkpoint_data
    from ..analysis.tsne import run_tsne

    _check_flags(("--samples", args.samples, args.samples >= 5, "an integer >= 5"),
                 ("--perplexity", args.perplexity, 0 < args.perplexity < args.samples,
                  f"a number > 0 and below --samples ({args.samples})"))
    _threads(args)
    model, cfg, data, ckpt = load_checkpoint_data(args.checkpoint, args.data_dir)
    paths = run_tsne(model, get_split(data, args.split), args.out, fim=args.fim, task=args.task, n=args.samples,
                     seed=args.seed, perplexity=args.perplexity)
    print("written " + ", ".join(paths.values()))
    return 0
