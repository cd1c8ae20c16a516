"""The ``dtn`` argument parser: one subcommand per command, each bound to its handler."""
from __future__ import annotations

import argparse

from .analyses import cmd_gates, cmd_importance, cmd_trim, cmd_tsne
from .tools import cmd_env, cmd_example_data, cmd_export
from .training import cmd_compare, cmd_evaluate, cmd_table3, cmd_train, cmd_tune


def _common_flags(p: argparse.ArgumentParser) -> None:
    """The config, data and override flags of the commands that train (train, compare, table3, tune)."""
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


def _analysis_flags(p: argparse.ArgumentParser, out: str) -> None:
    """The flags of the analyses of a checkpoint (importance, gates, trim, tsne)."""
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
    _common_flags(t)
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
    _common_flags(c)
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
    _analysis_flags(i, "results/importance")
    i.add_argument("--split", choices=["train", "valid", "test"], default="test")
    i.add_argument("--repeats", type=int, default=3, help="permutations per field (mean ± std) [3]")
    i.add_argument("--max-rows", type=int, default=20000, help="subsample the split to this many rows; 0 = all [20000]")
    i.add_argument("--tasks", help="the two tasks of the scatter plot, comma-separated [the first two]")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_importance)

    g = sub.add_parser("gates", help="mean gate weight per task and expert (MMoE, PLE / CGC, SFM, TFI) or candidate "
                       "FIM (DTN, Fig. 4)")
    _analysis_flags(g, "results/gates")
    g.add_argument("--split", choices=["train", "valid", "test"], default="valid")
    g.set_defaults(func=cmd_gates)

    r = sub.add_parser("trim", help="DTN-trim a checkpoint; params, latency and AUC before and after")
    _analysis_flags(r, "results/trim")
    r.add_argument("--threshold", type=float, required=True, help="switch off gate candidates under this mean weight")
    r.add_argument("--latency-batch", type=int, default=2048, help="rows per timed forward pass [2048]")
    r.add_argument("--repeats", type=int, default=30, help="timed forward passes (median reported) [30]")
    r.set_defaults(func=cmd_trim)

    s = sub.add_parser("tsne", help="t-SNE of FIM representations (Fig. 5)")
    _analysis_flags(s, "results/tsne")
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
    _common_flags(b)
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
    _common_flags(u)
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
