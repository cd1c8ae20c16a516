"""Forward bandwidth of the table-batched embedding bag against the device's copy bandwidth.

Bytes moved by one forward = the gathered rows (ids x d x element size) + the ids and offsets
read + the output written; GB/s = bytes / median time. The copy bandwidth is a device-to-device
``Tensor.copy_`` of a 1 GiB buffer (read + write counted), measured in the same process. On CUDA
the times are CUDA-event medians with the L2 flushed before each repetition (so rows come
from HBM, not cache); on CPU wall-clock medians (the script runs there too).

    .venv/bin/python benchmarks/embedding_bag_bandwidth.py --out results/bandwidth.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dtn_kernels
from dtn_kernels.ops import embedding_bag
from harness import bench_device, cuda_event_times, environment


def median_seconds(fn, device, reps: int = 50, warmup: int = 5) -> float:
    """CUDA-event median (L2 flushed before each repetition) on CUDA, wall-clock median on CPU."""
    if device.type == "cuda":
        return statistics.median(cuda_event_times(lambda: None, fn, device, reps=reps, warmup=warmup))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device, reps=20)
    return 2 * nbytes / t / 1e9


def case(device, batch: int, tables: int, rows: int, dim: int, pooling: int, weights: dict, dtype,
         index_dtype=torch.int32):
    """One forward; ``weights[(tables * rows, dim)]`` caches the fp32 table (other dtypes are cast from it)."""
    g = torch.Generator(device=device).manual_seed(0)
    key = (tables * rows, dim)
    if key not in weights:
        weights.clear()  # one table set on the device at a time
        weights[key] = torch.randn(tables * rows, dim, generator=g, device=device)
    weight = weights[key].to(dtype)
    table_offsets = torch.arange(tables + 1, dtype=torch.int64, device=device) * rows
    n = tables * batch * pooling
    indices = torch.randint(0, rows, (n,), generator=g, device=device, dtype=index_dtype)
    offsets = torch.arange(tables * batch + 1, device=device, dtype=index_dtype) * pooling
    fn = lambda: embedding_bag(weight, table_offsets, indices, offsets, "sum")  # noqa: E731
    t = median_seconds(fn, device)
    elem = weight.element_size()
    moved = n * dim * elem + indices.numel() * indices.element_size() + offsets.numel() * offsets.element_size() \
        + batch * tables * dim * elem
    return {"batch": batch, "tables": tables, "rows_per_table": rows, "dim": dim, "ids_per_bag": pooling,
            "dtype": str(dtype).replace("torch.", ""), "median_ms": t * 1e3, "bytes": moved, "gb_per_s": moved / t / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--copy-gib", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (the GPU suite's CPU check)")
    args = ap.parse_args(argv)
    device = bench_device()
    cuda = device.type == "cuda"
    if cuda and not dtn_kernels.HAS_CUDA_EXT:
        raise SystemExit("dtn_kernels._C was built without CUDA: nothing to measure")
    big = 65536 if cuda else 2048
    rows = 200_000 if cuda else 100_000  # 32 tables x 200k rows x d 128 fp32 = 3.3 GB on the device
    if args.smoke:
        big, rows = 256, 1000
    shapes = [(big, 32, rows, 64, 1), (big, 32, rows, 128, 1), (big, 8, rows, 64, 20), (big, 32, rows, 16, 1)]
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if cuda else [])
    copy_bytes = int(args.copy_gib * 2**30) if cuda else 256 * 2**20
    copy = copy_bandwidth(device, 16 * 2**20 if args.smoke else copy_bytes)
    weights: dict = {}
    results = [case(device, *s, weights=weights, dtype=dt) for s in shapes for dt in dtypes]
    for r in results:
        r["fraction_of_copy"] = r["gb_per_s"] / copy
    report = {"environment": environment(device, torch.float32), "copy_gb_per_s": copy, "cases": results}
    print(f"device: {report['environment']['device']}  copy bandwidth: {copy:.1f} GB/s")
    print(f"{'B':>7} {'T':>3} {'d':>4} {'L':>3} {'dtype':>9} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
    for r in results:
        print(f"{r['batch']:>7} {r['tables']:>3} {r['dim']:>4} {r['ids_per_bag']:>3} {r['dtype']:>9} "
              f"{r['median_ms']:>9.3f} {r['gb_per_s']:>8.1f} {r['fraction_of_copy']:>7.0%}")
    best = max(results, key=lambda r: r["gb_per_s"])
    print(f"best forward: {best['gb_per_s']:.1f} GB/s = {best['fraction_of_copy']:.0%} of the copy bandwidth "
          f"({copy:.1f} GB/s; d={best['dim']}, {best['dtype']})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
