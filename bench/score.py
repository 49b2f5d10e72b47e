#!/usr/bin/env python3
"""Anomaly scoring at size: a store against a reference of as many rows, measured.

    python bench/score.py [--count 10000 100000] [--workers 2] [--recall-queries 1000]
                          [--json] [--save FILE] [--workdir DIR]

For each --count N, two stores of N rows of seeded latents (64x7x7 float16, the default
seed model's; around 1,000 seeded unit-normal centres with noise of std 0.5, so that
clusters overlap and neighbours are neither trivial nor random; a PSNR per row): a
reference and a store to score. Each ``score`` runs in a
child process (the client) on a fresh cluster of --workers worker processes, started
before the clock; the row is one scoring:

  rows/s          the store's rows over the scoring's wall time, the index build included
                  (the reference has none before)
  client RSS      the child's peak RSS (``VmHWM``)
  read            bytes the workers read (``/proc``'s ``rchar``, summed over them) ÷ the
                  bytes a scoring must read once: the store's latents and PSNRs, the
                  reference's latents (to build its index) and the index once per worker
  index           the index file's size and kind (exact up to 50,000 rows)

Then, in this process, an inverted-file index of the reference (what a reference above
50,000 rows gets) is searched for --recall-queries store rows, and its recall@5 against
exact search is reported: the share of the true 5 nearest it returns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import peak_rss_mib, random_model, read_chars

ROOT = Path(__file__).resolve().parents[1]
CENTRES = 1000
NOISE = 0.5


def build_store(model: Path, path: Path, count: int, seed: int) -> Path:
    """``count`` rows around :data:`CENTRES` seeded centres, with a PSNR each."""
    from latentbatch.models.checkpoint import read_info
    from latentbatch.stores.store import create_store, open_store

    if path.exists() and open_store(str(path)).count == count:
        return path
    shutil.rmtree(path, ignore_errors=True)
    info = read_info(model)
    store = create_store(str(path), model_id=info.model_id, config=info.config, capacity=count)
    centres = np.random.default_rng(0).standard_normal((CENTRES, *store.latent_shape))
    rng = np.random.default_rng(seed)
    for a, b in store.shards(count):
        latents = centres[rng.integers(0, CENTRES, b - a)]
        latents = latents + NOISE * rng.standard_normal(latents.shape)
        ids = [f"s{seed}-{i:08d}" for i in range(a, b)]
        quality = rng.normal(20.0, 2.0, b - a).astype(np.float32)
        store.write_rows(a, latents.astype(np.float16), ids, np.full(b - a, -1), quality)
    store.write_meta(count=count)
    return path


def _warm() -> None:
    import faiss  # noqa: F401

    import latentbatch.uses.anomaly  # noqa: F401


def child(store: str, reference: str, workers: int) -> dict[str, Any]:
    """One scoring on a fresh cluster (this process is the client)."""
    from distributed import Client, LocalCluster

    from latentbatch.uses.anomaly import score

    _warm()
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm)
        before = sum(client.run(read_chars).values())
        started = time.perf_counter()
        result = score(store, reference, client=client)
        seconds = time.perf_counter() - started
        read = sum(client.run(read_chars).values()) - before
    return {
        "scored": result.scored,
        "seconds": seconds,
        "client_rss_mib": peak_rss_mib(),
        "worker_read": read,
        "above": result.above,
    }


def _array_bytes(store: Path, name: str) -> int:
    return sum(p.stat().st_size for p in (store / name).rglob("*") if p.is_file())


def recall(store: Path, reference: Path, queries: int, k: int = 5) -> float:
    """recall@k of an inverted-file index of ``reference`` against exact search: the
    scoring's own index when it built one, else one built here as it would."""
    from latentbatch.stores import neighbours
    from latentbatch.stores.store import open_store

    opened = open_store(str(reference))
    if opened.count > neighbours.EXACT_ROWS:
        ivf = neighbours.load_index(neighbours.index_url(opened), None)
    else:
        ivf = neighbours.make_index(opened, exact=False)
    exact = neighbours.make_index(opened, exact=True)
    rows = open_store(str(store)).read_latents(0, queries).reshape(queries, -1)
    _, found = ivf.search(rows.astype(np.float32), k)
    _, truth = exact.search(rows.astype(np.float32), k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))


def measure(count: int, workdir: Path, workers: int, queries: int) -> dict[str, Any]:
    model = random_model(workdir / "seed-random", "seed")
    reference = build_store(model, workdir / f"reference-{count}.zarr", count, seed=1)
    store = build_store(model, workdir / f"store-{count}.zarr", count, seed=2)
    for old in reference.glob("neighbours-*.faiss"):  # the build is part of the scoring
        old.unlink()
    command = [sys.executable, __file__, "--child", str(store), str(reference), str(workers)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    index = next(reference.glob("neighbours-*.faiss"))
    once = (
        _array_bytes(store, "latents")
        + _array_bytes(store, "quality")
        + _array_bytes(reference, "latents")
        + workers * index.stat().st_size
    )
    from latentbatch.stores.neighbours import EXACT_ROWS

    return {
        "count": count,
        "index_kind": "exact" if count <= EXACT_ROWS else "inverted file",
        "rows_per_second": found["scored"] / found["seconds"],
        "seconds": found["seconds"],
        "client_rss_mib": found["client_rss_mib"],
        "worker_read_bytes": found["worker_read"],
        "read_ratio": found["worker_read"] / once,
        "index_bytes": index.stat().st_size,
        "above": found["above"],
        "ivf_recall_at_5": recall(store, reference, min(queries, count)),
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        store, reference, workers = sys.argv[2:5]
        print(json.dumps(child(store, reference, int(workers))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "latentbatch-bench-score"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [measure(n, workdir, args.workers, args.recall_queries) for n in args.count]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers,
        "command": " ".join(["python", "bench/score.py", *sys.argv[1:]]),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'rows':>9} {'rows/s':>9} {'vs first':>8} {'client RSS':>11} {'vs first':>8} "
              f"{'read/once':>9} {'index':>24} {'IVF recall@5':>12}")  # fmt: skip
        first = rows[0]
        for row in rows:
            print(f"{row['count']:>9,} {row['rows_per_second']:>9,.0f} "
                  f"{row['rows_per_second'] / first['rows_per_second']:>7.2f}x "
                  f"{row['client_rss_mib']:>7,.0f} MiB "
                  f"{row['client_rss_mib'] / first['client_rss_mib']:>7.2f}x "
                  f"{row['read_ratio']:>8.2f}x {row['index_kind']:>13} "
                  f"{row['index_bytes'] / 2**20:>6.0f} MiB "
                  f"{row['ivf_recall_at_5']:>12.3f}")  # fmt: skip
    if args.save:
        args.save.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
