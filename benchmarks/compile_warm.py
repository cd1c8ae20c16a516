"""Warm torch.compile's on-disk caches for the headline stage, while the CUDA extension builds.

    python benchmarks/compile_warm.py [--out compile_warm.json]

The GPU suite's first benchmark stage times the DTN training step (paper config, B = 2048 and 4096,
bf16 and TF32) with a ``compile`` provider: ``torch.compile`` of the reference model, one static-shape
graph per batch size and precision. Compiling a whole model costs about a minute each time, four
times. The reference model does not need the compiled extension, so this script runs the same
compile provider's first step, for every headline group, in its own process while the extension
builds: the FX-graph and AOTAutograd caches (torch's defaults, on disk) then hold the graphs, and the
benchmark's own first call (untimed either way) loads them instead of compiling. Steady-state step
times do not change. Each group's compile seconds go to ``--out``.

On a machine without a GPU (the suite's CPU check) whole-model compiles are off unless
``DTN_BENCH_MODEL_COMPILE=1``, as in bench_model.py: then it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write {group: seconds} here")
    args = ap.parse_args(argv)
    os.environ["DTN_BENCH_SUBSET"] = "headline"
    import bench_model as BM
    from harness import sync

    groups = BM.model_grid()
    result = {"device": str(BM.DEVICE), "groups": []}
    if BM.DEVICE.type == "cpu" and os.environ.get("DTN_BENCH_MODEL_COMPILE") != "1":
        result["skipped"] = ("no whole-model compile on CPU (bench_model.py leaves the compile providers out "
                             "there unless DTN_BENCH_MODEL_COMPILE=1): nothing to warm")
        groups = []
    for name, mode, batch, precision in groups:
        t0 = time.perf_counter()
        case = BM.model_case(name, "compile", mode, batch, precision)
        case.step()
        sync(BM.DEVICE)
        rec = {"group": f"{name} {mode} B={batch} {precision}", "seconds": round(time.perf_counter() - t0, 1),
               **(case.compiled.info if case.compiled is not None else {})}
        result["groups"].append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:  # after every group: a stage cut short keeps what it warmed
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(result.get("skipped") or f"warmed {len(result['groups'])} compile(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
