#!/usr/bin/env python3
"""The per-label fit behind ``generate`` and ``shift`` at SD's latent size: memory and time.

    python bench/fit.py [--count 1000 10000] [--shape 4 64 64] [--labels 10] [--json]
                        [--workdir DIR]

For each --count N, a store of N seeded latents of --shape (float16, labels 0..L-1, the
default layout: 512-row shards at 4x64x64) is fitted (``fit_latents``) in this process
under ``tracemalloc`` (numpy reports its arrays to it). The row: seconds, the peak of
Python-tracked memory, and the bound ``docs/uses.md`` states for it,

    4 x shard rows x D x 8  +  4 x D x (RANK + OVERSAMPLE) x 8  +  (L + 6) x D x 8 bytes

(a shard's rows as float64, one temporary of their size, and the float16 rows and
zarr's buffers they came from; the range finder's directions, their product and two QR
temporaries; each label's sum and the mean, range and sums of squares), which does not
grow with N. The peak over the bound must stay below 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from latentbatch.config import ModelConfig
from latentbatch.stores.store import Layout, create_store, open_store
from latentbatch.uses.fit import OVERSAMPLE, RANK, fit_latents


def bound(shard_rows: int, values: int, labels: int) -> int:
    """The stated bound (module docstring), in bytes."""
    return 8 * values * (4 * shard_rows + 4 * (RANK + OVERSAMPLE) + labels + 6)


def build_store(path: Path, count: int, shape: tuple[int, int, int], labels: int) -> Path:
    """``count`` seeded latents of ``shape`` around one seeded mean per label."""
    if path.exists() and open_store(str(path)).count == count:
        return path
    shutil.rmtree(path, ignore_errors=True)
    channels, height, _ = shape
    config = ModelConfig("compact", 1, height * 4, (4, 4), channels)  # latents of shape
    store = create_store(str(path), model_id="0" * 64, config=config, capacity=count,
                         layout=Layout(latent_dtype="float16"))  # fmt: skip
    rng = np.random.default_rng(0)
    means = rng.standard_normal((labels, *shape))
    for a, b in store.shards(count):
        label = np.arange(a, b) % labels
        latents = means[label] + rng.standard_normal((b - a, *shape))
        store.write_rows(a, latents.astype(np.float16), [f"r{i}" for i in range(a, b)], label)
    store.write_meta(count=count, labels=True)
    return path


def measure(count: int, shape: tuple[int, int, int], labels: int, workdir: Path) -> dict[str, Any]:
    path = build_store(workdir / f"fit-{count}.zarr", count, shape, labels)
    store = open_store(str(path))
    tracemalloc.start()
    started = time.perf_counter()
    fit_latents(store)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    values = int(np.prod(shape))
    limit = bound(store.shard_rows, values, labels)
    return {
        "count": count,
        "shape": list(shape),
        "shard_rows": store.shard_rows,
        "seconds": seconds,
        "peak_mib": peak / 2**20,
        "bound_mib": limit / 2**20,
        "peak_over_bound": peak / limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", nargs="+", type=int, default=[1000, 10_000])
    parser.add_argument("--shape", nargs=3, type=int, default=[4, 64, 64])
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-fit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape = (args.shape[0], args.shape[1], args.shape[2])
    rows = [measure(n, shape, args.labels, workdir) for n in args.count]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'rows':>8} {'shape':>10} {'shard rows':>10} {'seconds':>8} {'peak':>10} "
          f"{'bound':>10} {'peak/bound':>10}")  # fmt: skip
    for row in rows:
        print(f"{row['count']:>8,} {'x'.join(map(str, row['shape'])):>10} "
              f"{row['shard_rows']:>10} {row['seconds']:>8.1f} {row['peak_mib']:>6.0f} MiB "
              f"{row['bound_mib']:>6.0f} MiB {row['peak_over_bound']:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
