#!/usr/bin/env python3
"""Does the engine's cost per run stay flat as a collection grows? Measured in one run.

    python bench/scale.py [--count 100000 2000000] [--formats tar zarr] [--workers 2]
                          [--model DIR] [--workdir DIR] [--listing-only] [--json]

For each ``--count`` a store of compact (4×7×7) latents is built directly (mnist5k's
latents under the model, tiled, with unique ids: no encode run), then decoded with
``latentbatch decode --scheduler`` (the real command-line client, in its own process)
on a cluster started from the command line (``dask scheduler`` and ``--workers``
``dask worker`` processes with one thread each, fresh for every decode), once per output
format. Without ``--model`` a compact model is trained for one epoch (seconds).

One row per decode: rows, images/s (from a ready cluster, the decode's own figure), the
client's and the scheduler's peak RSS (VmHWM, read from /proc while they run),
``manifest.json``'s bytes and the number of objects the output holds; then, per format,
the ratios of the largest count's figures to the smallest's. Then, per store, the wall
time of ``latentbatch inspect STORE`` and ``latentbatch stores ROOT`` (each in a fresh
process, best of 3; ``inspect --bytes``, which lists every object, beside them), which
should not grow with the store. ``--listing-only`` skips the decodes. ``--json`` prints
``{"decodes": [...], "listings": [...]}``: the decode rows with the keys ``count``,
``format``, ``images_per_second``, ``client_rss_mib``, ``scheduler_rss_mib``,
``manifest_bytes`` and ``objects``, and the listing rows with ``count``, ``inspect_s``,
``stores_s`` and ``inspect_bytes_s``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import best_seconds
from distributed import Client

from latentbatch.config import TrainConfig, preset_config
from latentbatch.engine.kernel import encode_images
from latentbatch.models.checkpoint import read_info
from latentbatch.models.weights import load_model
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import create_store, open_store, shard_ranges
from latentbatch.train import train

BIN = Path(sys.executable).parent
KEYS = (
    "count",
    "format",
    "images_per_second",
    "client_rss_mib",
    "scheduler_rss_mib",
    "manifest_bytes",
    "objects",
)


def base_latents(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """mnist5k's latents under the model (float16, as a store holds them) and labels."""
    encoder, info = load_model(model_dir, "encoder")
    source = open_source("mnist5k", Geometry.of(info.config))
    latents = encode_images(encoder, source.read(0, len(source)), torch.device("cpu"))
    return latents.astype(np.float16), np.asarray(source.labels, dtype=np.int32)


def build_store(model_dir: Path, workdir: Path, count: int, base: tuple[np.ndarray, ...]) -> Path:
    """A store of ``count`` rows, written shard by shard (memory stays at one shard)."""
    path = workdir / f"root-{count}" / "scale.zarr"  # alone under its root, for `stores`
    if path.exists() and open_store(str(path)).count == count:
        return path
    shutil.rmtree(path, ignore_errors=True)
    latents, labels = base
    info = read_info(model_dir)
    store = create_store(str(path), model_id=info.model_id, config=info.config, capacity=count)
    for a, b in shard_ranges(0, count, store.shard_rows):
        rows = np.arange(a, b) % len(latents)
        store.write_rows(a, latents[rows], [f"row-{i:010d}" for i in range(a, b)], labels[rows])
    store.write_meta(
        count=count,
        labels=True,
        sources=[{"spec": "mnist5k tiled", "description": "bench/scale.py", "rows": [0, count]}],
    )
    return path


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak RSS so far (VmHWM), or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


class PeakWatch:
    """Polls the peak RSS of some processes every ``interval`` seconds, keeping the last
    value read for each (VmHWM only grows)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def _poll(self) -> None:
        for name, pid in list(self.pids.items()):
            peak = peak_rss_mib(pid)
            if peak is not None:
                self.peaks[name] = peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poll()
        self._stop.set()
        self._thread.join()


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def decode_run(
    model_dir: Path, store: Path, out: Path, fmt: str, workers: int, logs: Path
) -> dict[str, Any]:
    """One decode on a fresh command-line cluster; the row of the table."""
    shutil.rmtree(out, ignore_errors=True)
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = str(BIN / "dask")
    local = ["--host", "127.0.0.1", "--dashboard-address", ":0"]
    port = ["--port", address.rsplit(":", 1)[1]]
    scheduler = _start([dask, "scheduler", *local, *port], logs / f"scheduler-{out.name}.log")
    processes = [scheduler]
    try:
        for i in range(workers):
            args = [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", *local]
            log = logs / f"worker-{out.name}-{i}.log"
            processes.append(_start([*args, "--name", f"w{i}"], log))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=120)
        with PeakWatch() as watch:
            watch.watch("scheduler", scheduler.pid)
            command = [str(BIN / "latentbatch"), "decode", "--model", str(model_dir)]
            command += ["--store", str(store), "--out", str(out), "--format", fmt]
            command += ["--scheduler", address, "--json", "--no-progress"]
            client_process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            watch.watch("client", client_process.pid)
            stdout, _ = client_process.communicate()
        if client_process.returncode != 0:
            raise SystemExit(f"latentbatch decode failed ({client_process.returncode})")
        result = json.loads(stdout)
    finally:
        for process in reversed(processes):
            _stop(process)
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "count": result["count"],
        "format": fmt,
        "images_per_second": result["images_per_second"],
        "client_rss_mib": watch.peaks["client"],
        "scheduler_rss_mib": watch.peaks["scheduler"],
        "manifest_bytes": (out / "manifest.json").stat().st_size,
        "objects": len(files),
    }


def listing_run(store: Path, count: int) -> dict[str, Any]:
    """Wall times of the quick commands on ``store`` (alone under its root)."""
    cli = str(BIN / "latentbatch")
    return {
        "count": count,
        "inspect_s": best_seconds([cli, "inspect", str(store)], 3)[0],
        "stores_s": best_seconds([cli, "stores", str(store.parent)], 3)[0],
        "inspect_bytes_s": best_seconds([cli, "inspect", str(store), "--bytes"], 3)[0],
    }


def print_listings(rows: list[dict[str, Any]]) -> None:
    print("\nquick commands on each store (fresh process, best of 3)")
    header = f"{'rows':>10} {'inspect':>9} {'stores':>9} {'inspect --bytes':>16}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['count']:>10,} {r['inspect_s']:>8.3f}s {r['stores_s']:>8.3f}s "
            f"{r['inspect_bytes_s']:>15.3f}s"
        )
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        print(
            f"{large['count'] / small['count']:>9.0f}x "
            f"{large['inspect_s'] / small['inspect_s']:>8.2f}x "
            f"{large['stores_s'] / small['stores_s']:>8.2f}x "
            f"{large['inspect_bytes_s'] / small['inspect_bytes_s']:>15.2f}x   (largest / smallest)"
        )


def print_table(rows: list[dict[str, Any]], model_id: str, workers: int) -> None:
    print(f"\nlatentbatch scale benchmark: model {model_id} (compact), {workers} workers")
    header = f"{'rows':>10} {'format':<6} {'images/s':>9} {'client RSS':>11} "
    header += f"{'scheduler RSS':>14} {'manifest':>9} {'objects':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['count']:>10,} {r['format']:<6} {r['images_per_second']:>9,.0f} "
            f"{r['client_rss_mib']:>7.0f} MiB {r['scheduler_rss_mib']:>10.0f} MiB "
            f"{r['manifest_bytes']:>7,} B {r['objects']:>8,}"
        )
    for fmt in dict.fromkeys(r["format"] for r in rows):
        mine = [r for r in rows if r["format"] == fmt]
        small, large = min(mine, key=lambda r: r["count"]), max(mine, key=lambda r: r["count"])
        if small is large:
            continue
        ratio = {key: large[key] / small[key] for key in KEYS if key != "format"}
        print(
            f"{ratio['count']:>9.0f}x {fmt:<6} {ratio['images_per_second']:>8.2f}x "
            f"{ratio['client_rss_mib']:>10.3f}x {ratio['scheduler_rss_mib']:>13.3f}x "
            f"{ratio['manifest_bytes']:>8.2f}x {ratio['objects']:>7.1f}x"
            "   (largest / smallest)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--formats", nargs="+", choices=("tar", "zarr", "png"),
                        default=["tar", "zarr"])  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a compact model (default: train one)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--listing-only", action="store_true", help="skip the decodes")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        model_dir = workdir / "compact-mnist5k"
        if not (model_dir / "config.json").is_file():
            train(preset_config("compact"), TrainConfig("mnist5k", 1), model_dir, progress=False)
    base = base_latents(model_dir)
    rows = []
    listings = []
    for count in sorted(args.count):
        store = build_store(model_dir, workdir, count, base)
        listings.append(listing_run(store, count))
        for fmt in [] if args.listing_only else args.formats:
            out = workdir / f"out-{count}-{fmt}"
            rows.append(decode_run(model_dir, store, out, fmt, args.workers, workdir))
            shutil.rmtree(out)
            if not args.json:
                print(f"  decoded {count:,} rows to {fmt}", file=sys.stderr)
    if args.json:
        print(json.dumps({"decodes": rows, "listings": listings}, indent=2))
        return
    if rows:
        print_table(rows, read_info(model_dir).short_id, args.workers)
    print_listings(listings)


if __name__ == "__main__":
    main()
