#!/usr/bin/env python3
"""An npz output larger than the client's memory: the client's peak RSS while the decode
assembles ``samples.npz`` from its parts.

    python bench/npz.py [--count 2000] [--size 256] [--formats npz tar] [--workers 2]
                        [--json] [--save FILE] [--workdir DIR]

The model is a small random-init diffusers AutoencoderKL (seed 0; 4 latent channels, 8x
down-sampling), the store --count seeded N(0, 1) latents of --size/8 pixels a side with
labels. The decode (``--format npz``, --workers worker processes started before the
clock) runs in a child process, which is the client: its peak RSS is compared with the
npz's size, and the npz's ``arr_0`` header is read back through zipfile to check its
shape. ``--formats npz tar`` also decodes the same store to tar shards: the pipeline's
rate without the assembly.
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
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from common import peak_rss_mib, small_kl

ROOT = Path(__file__).resolve().parents[1]


def build(workdir: Path, count: int, size: int) -> tuple[Path, Path]:
    """The model and the store (built once)."""
    model = small_kl(workdir / "kl-small", size)
    store = workdir / f"store-{count}-{size}.zarr"
    if not store.exists():
        from latentbatch.uses.import_latents import import_latents

        rng = np.random.default_rng(0)
        latents = rng.standard_normal((count, 4, size // 8, size // 8), dtype=np.float32)
        source = workdir / f"latents-{count}-{size}.npz"
        np.savez(source, latents=latents, labels=rng.integers(0, 1000, count))
        import_latents(model, str(source), str(store), workers=2)
    return model, store


def child(model: str, store: str, out: str, fmt: str, workers: int) -> dict[str, Any]:
    """One decode on a fresh cluster (this process is the client)."""
    from distributed import Client, LocalCluster

    from latentbatch.decode import decode

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        started = time.perf_counter()
        result = decode(model, store, out, fmt=fmt, client=client)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
    return {"images": result.decoded, "seconds": seconds, "client_rss_mib": peak_rss_mib()}


def run(model: Path, store: Path, fmt: str, workers: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"out-{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", str(model), str(store), str(out), fmt,
               str(workers)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    found["format"] = fmt
    found["images_per_second"] = found["images"] / found["seconds"]
    if fmt == "npz":
        path = out / "samples.npz"
        found["npz_mib"] = path.stat().st_size / 2**20
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
            np.lib.format.read_magic(stream)
            found["arr_0_shape"] = list(np.lib.format.read_array_header_1_0(stream)[0])
    shutil.rmtree(out, ignore_errors=True)
    return found


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        model, store, out, fmt, workers = sys.argv[2:7]
        print(json.dumps(child(model, store, out, fmt, int(workers))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--formats", nargs="+", default=["npz"], choices=["npz", "tar"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "latentbatch-bench-npz"
    workdir.mkdir(parents=True, exist_ok=True)
    model, store = build(workdir, args.count, args.size)
    rows = [run(model, store, fmt, args.workers, workdir) for fmt in args.formats]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers,
        "count": args.count,
        "size": args.size,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'format':<7} {'images':>7} {'images/s':>9} {'client RSS':>11} {'npz':>10}")
        for row in rows:
            npz = f"{row['npz_mib']:,.0f} MiB" if "npz_mib" in row else ""
            print(f"{row['format']:<7} {row['images']:>7,} {row['images_per_second']:>9,.1f} "
                  f"{row['client_rss_mib']:>7,.0f} MiB {npz:>10}")  # fmt: skip
    if args.save:
        args.save.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
