"""The commands around training: export (a model folder for serving), example-data (a generated
table in a published layout), env (what this installation will run).
"""
from __future__ import annotations

import errno
import os
import time

from .common import _check_data_source, _checkpoint_data_config, _threads


def cmd_export(args) -> int:
    from ..config import ConfigError
    from ..request_check import check_split
    from ..serving import export_model
    from ..train import load_checkpoint, model_from_checkpoint
    from ..train.checkpoint import CheckpointError, ensure_writable
    from ..train.model_file import runnable_config

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
        from ..analysis.gates import require_dtn

        require_dtn(model, "dtn export --trim-threshold")
        data_cfg = _checkpoint_data_config(cfg, args)
        check_split(data_cfg, "valid", "--trim-threshold (measured on the validation split)")
    if encoder is None or not encoder.fitted:
        raise CheckpointError(f"{args.checkpoint}: holds no fitted feature encoders; export needs them")
    ensure_writable(args.out, "--out", keep=False)
    extra = {"checkpoint": os.path.abspath(args.checkpoint), "trim": None,
             "fingerprint": ckpt.get("fingerprint"), "code_version": ckpt.get("code_version")}
    if args.trim_threshold is not None:
        from ..data import load_dataset

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
    from ..config import ConfigError
    from ..data.examples import make_example_frame, write_table
    from ..train.checkpoint import FileWriteError, ensure_writable

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

        from ..config import ConfigError

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok = d == "cpu" or (n and (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit() and int(d[5:]) < n)))
        if not ok:
            raise ConfigError(f"--device {d!r}: allowed here: 'cpu'" + (f", 'cuda' or 'cuda:0'..'cuda:{n - 1}'" if n else
                              f" (this torch, {torch.__version__}, sees no CUDA device)"))
    info = report(d)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
