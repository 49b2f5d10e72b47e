#!/usr/bin/env python3
"""Nearest-neighbour search over a large store: time and peak memory, measured in one run.

    python bench/query.py [--count 1000000] [--k 10] [--workdir DIR]

Builds (once) a store of --count seeded random latents of the `compact` preset's shape
(4x7x7, float16) and times exact L2 and cosine searches in a child process, whose peak
RSS (VmHWM) is the search's alone. The search streams the store shard by shard through
Dask, so memory should not grow with --count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mib, random_store

from latentbatch.stores.query import nearest
from latentbatch.stores.store import Layout, open_store


def build(workdir: Path, count: int) -> Path:
    started = time.perf_counter()
    path = random_store(workdir / f"random-{count}.zarr", count, Layout(8192, 1024))
    print(f"store {path} ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def child(store_url: str, k: int) -> None:
    store = open_store(store_url)
    query = store.read_latents(12345, 12346)[0].astype(np.float32)
    baseline = peak_rss_mib()
    results = {}
    for metric in ("l2", "cosine"):
        started = time.perf_counter()
        found = nearest(store, query, k=k, metric=metric)  # type: ignore[arg-type]
        results[metric] = {"seconds": time.perf_counter() - started, "first": found[0].row}
    print(json.dumps({"results": results, "baseline_mib": baseline, "peak_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.k)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-query-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = build(workdir, args.count)
    command = [sys.executable, __file__, "--child", str(store), "--k", str(args.k)]
    run = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    mib = size / 2**20
    print()
    print(
        f"nearest neighbours over {args.count:,} latents (4x7x7 float16, {mib:.0f} MiB), k={args.k}"
    )
    print(f"{'metric':<8} {'seconds':>8} {'latents/s':>12}  first hit")
    for metric, result in run["results"].items():
        rate = args.count / result["seconds"]
        print(f"{metric:<8} {result['seconds']:>8.2f} {rate:>12,.0f}  row {result['first']}")
    peak, baseline = run["peak_mib"], run["baseline_mib"]
    print(f"peak RSS of the searching process: {peak:.0f} MiB (after opening: {baseline:.0f} MiB)")


if __name__ == "__main__":
    main()
