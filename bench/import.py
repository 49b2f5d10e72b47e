#!/usr/bin/env python3
"""Import at size: each layout built with seeded latents, imported, measured.

    python bench/import.py [--layout edm2-zip edm2-folder npz safetensors wds]
                           [--count 10000 100000] [--size 16] [--workers 2] [--json]
                           [--save FILE] [--workdir DIR]

Each source holds --count rows of 8x16x16 float32 latents (the mean and std of a 4-channel
autoencoder's 16x16 latents, as edm2 stores them; --size 1 makes them 8x1x1, for a run
where the member count is what costs) with labels:

  edm2-folder   one .npy per row in folders of 1,000, and dataset.json's labels
  edm2-zip      the same files in one stored (uncompressed) zip, as edm2 writes it
  npz           one uncompressed .npz of latents and labels
  safetensors   one file of latents and labels
  wds           WebDataset tars of 1,000 samples, each a .npy and a .cls member

The model is a small random-init diffusers AutoencoderKL (seed 0; 4 latent channels, 8x
down-sampling). Each import runs in a child process on a fresh cluster of --workers
worker processes (started before the clock), so the row of a table is one import:
rows/s and the client's peak RSS. Then the same process lists the source and makes every
store shard's rows as the import's tasks do, one after another, and ``/proc``'s
``rchar`` gives the bytes that read, ÷ the source's bytes. Sources are built once in
--workdir and reused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from common import peak_rss_mib, read_chars, small_kl

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("edm2-zip", "edm2-folder", "npz", "safetensors", "wds")
PER_FOLDER = 1000


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def build_source(layout: str, count: int, size: int, workdir: Path) -> Path:
    """The source of ``layout`` with ``count`` seeded rows of ``(8, size, size)`` (built
    once)."""
    names = {"edm2-zip": "edm2.zip", "npz": "latents.npz", "safetensors": "latents.safetensors"}
    folder = f"{layout}-{count}" if size == 16 else f"{layout}-{count}-size{size}"
    path = workdir / folder / names.get(layout, "source")
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.with_name(path.name + ".partial")
    rng = np.random.default_rng(0)
    labels = (np.arange(count) % 1000).astype(np.int64)

    def rows(a: int, b: int) -> np.ndarray:
        return rng.standard_normal((b - a, 8, size, size), dtype=np.float32)

    def member(i: int) -> str:
        return f"{i // PER_FOLDER:05d}/img{i:08d}.npy"

    dataset = json.dumps({"labels": [[member(i), int(labels[i])] for i in range(count)]})
    if layout == "edm2-folder":
        building.mkdir()
        for a in range(0, count, PER_FOLDER):
            block = rows(a, min(a + PER_FOLDER, count))
            (building / f"{a // PER_FOLDER:05d}").mkdir()
            for i, row in enumerate(block, a):
                np.save(building / member(i), row)
        (building / "dataset.json").write_text(dataset)
    elif layout == "edm2-zip":
        with zipfile.ZipFile(building, "w", zipfile.ZIP_STORED) as archive:
            for a in range(0, count, PER_FOLDER):
                for i, row in enumerate(rows(a, min(a + PER_FOLDER, count)), a):
                    archive.writestr(member(i), _npy(row))
            archive.writestr("dataset.json", dataset)
    elif layout == "npz":
        np.savez(building.with_suffix(".npz"), latents=rows(0, count), labels=labels)
        building.with_suffix(".npz").rename(building)
    elif layout == "safetensors":
        from safetensors.numpy import save_file

        save_file({"latents": rows(0, count), "labels": labels}, str(building))
    elif layout == "wds":
        building.mkdir()
        for a in range(0, count, PER_FOLDER):
            with tarfile.open(building / f"shard-{a // PER_FOLDER:06d}.tar", "w") as archive:
                for i, row in enumerate(rows(a, min(a + PER_FOLDER, count)), a):
                    for suffix, data in ((".npy", _npy(row)), (".cls", str(labels[i]).encode())):
                        info = tarfile.TarInfo(f"sample{i:08d}{suffix}")
                        info.size = len(data)
                        archive.addfile(info, io.BytesIO(data))
    else:
        raise SystemExit(f"unknown layout {layout}; choose from {', '.join(LAYOUTS)}")
    building.rename(path)
    return path


def source_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


WARM = ("torch", "diffusers", "zarr", "latentbatch.uses.import_latents", "latentbatch.models.vae")
"""Modules every process imports before the clock (their files are not the source's)."""


def _warm() -> None:
    import importlib

    for name in WARM:
        importlib.import_module(name)


def child(source: str, model: str, store: str, workers: int) -> dict[str, Any]:
    """One import on a fresh cluster (this process is the client)."""
    from distributed import Client, LocalCluster

    _warm()
    from latentbatch.stores.store import open_store
    from latentbatch.uses.import_latents import import_latents

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm)
        started = time.perf_counter()
        result = import_latents(model, source, store, latents="raw", client=client)
        seconds = time.perf_counter() - started
    return {
        "rows": result.derived.rows,
        "seconds": seconds,
        "client_rss_mib": peak_rss_mib(),
        "read": bytes_read(source, open_store(store).shard_rows, store + ".listing"),
    }


def bytes_read(source: str, shard_rows: int, listing: str) -> int:
    """The bytes this process reads listing ``source`` (its blocks written to the folder
    ``listing``) and making every store shard's rows as the import's tasks do, one after
    another (no Dask: ``rchar`` then counts the source's files and the listing's)."""
    from latentbatch.config import Convention
    from latentbatch.sources.listing import list_source
    from latentbatch.uses.import_latents import ImportPart, Scaling

    before = read_chars()
    found = list_source(source, listing)
    plain = Convention(formula="scale-shift")  # as found: the bytes read are what count
    scaling = Scaling(raw=True, source=plain, target=plain)
    for a in range(0, found.rows, shard_rows):
        ImportPart(
            segments=found.segments(a, min(a + shard_rows, found.rows)), shape=found.shape,
            channels=found.shape[0] // 2, scaling=scaling, options={},
        ).make()  # fmt: skip
    read = read_chars() - before
    shutil.rmtree(listing, ignore_errors=True)  # an array has no blocks
    return read


def measure(layout: str, count: int, size: int, workdir: Path, workers: int) -> dict[str, Any]:
    model = small_kl(workdir / "kl-small", 128)
    source = build_source(layout, count, size, workdir)
    store = workdir / f"{source.parent.name}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, __file__, "--child", str(source), str(model), str(store),
               str(workers)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(store, ignore_errors=True)
    size = source_bytes(source)
    return {
        "layout": layout,
        "count": count,
        "rows_per_second": found["rows"] / found["seconds"],
        "seconds": found["seconds"],
        "client_rss_mib": found["client_rss_mib"],
        "source_bytes": size,
        "read_ratio": found["read"] / size,
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        source, model, store, workers = sys.argv[2:6]
        print(json.dumps(child(source, model, store, int(workers))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--count", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--size", type=int, default=16, help="the latents' height and width")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "latentbatch-bench-import"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [
        measure(layout, n, args.size, workdir, args.workers)
        for layout in args.layout
        for n in args.count
    ]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers,
        "shape": [8, args.size, args.size],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'layout':<12} {'rows':>9} {'rows/s':>9} {'vs first':>8} {'client RSS':>11} "
              f"{'read/source':>11}")  # fmt: skip
        first: dict[str, float] = {}
        for row in rows:
            base = first.setdefault(row["layout"], row["rows_per_second"])
            print(f"{row['layout']:<12} {row['count']:>9,} {row['rows_per_second']:>9,.0f} "
                  f"{row['rows_per_second'] / base:>7.2f}x {row['client_rss_mib']:>8,.0f} MiB "
                  f"{row['read_ratio']:>10.2f}x")  # fmt: skip
    if args.save:
        args.save.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
