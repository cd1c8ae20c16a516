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

One module per job: :mod:`~dtn.cli.parser` builds the arguments, :mod:`~dtn.cli.training` (train,
evaluate, compare, table3, tune), :mod:`~dtn.cli.analyses` (importance, gates, trim, tsne) and
:mod:`~dtn.cli.tools` (export, example-data, env) hold the commands, :mod:`~dtn.cli.common` what they
share, and :mod:`~dtn.cli.boundary` the error boundary.
"""
from __future__ import annotations

from .boundary import EXPECTED, describe_error, run_command  # noqa: F401  (EXPECTED: also importable from here)
from .common import _config  # noqa: F401  (imported from here by the tests)
from .parser import build_parser

__all__ = ["main", "build_parser", "describe_error"]


def main(argv=None) -> int:
    """The ``dtn`` entry point: parse ``argv`` (else sys.argv) and run the command; its exit status."""
    return run_command(build_parser().parse_args(argv))
