#!/usr/bin/env python3
"""Decode throughput: bare torch loops against the full pipeline, measured in one run.

    python bench/decode.py [--count 20000] [--workers 2] [--model DIR] [--workdir DIR]

Rows of the table, all on the same model and the same latents:

  bare decode          one process, latents in memory, decoder only (no I/O, no PNG)
  bare decode + PNG    the same loop, PNG-encoding every image in a 2-thread pool
  pipeline, N workers  Zarr store → Dask (N worker processes) → decode → PNG → tar shards

The latents are mnist5k encoded by the model, tiled to --count rows. Without --model a
seed model is trained for one epoch (a few seconds). Each pipeline run happens in a child
process so that its peak RSS is the client's alone; cluster start-up is not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from latentbatch.checkpoint import load_model, read_info
from latentbatch.cluster import connect
from latentbatch.config import TrainConfig, preset_config
from latentbatch.decode import DECODE_BATCH, _png_pool, decode, decode_latents
from latentbatch.encode import encode
from latentbatch.shards import encode_png
from latentbatch.store import Layout, create_store, open_store, shard_ranges
from latentbatch.train import train


def build_store(model_dir: Path, workdir: Path, count: int) -> Path:
    """mnist5k latents of the model, tiled to ``count`` rows with unique ids."""
    path = workdir / f"bench-{count}.zarr"
    if path.exists() and open_store(str(path)).count == count:
        return path
    shutil.rmtree(path, ignore_errors=True)
    base = workdir / "mnist5k.zarr"
    if not base.exists():
        encode(model_dir, "mnist5k", str(base), workers=2)
    source = open_store(str(base))
    latents = source.read_latents(0, source.count)
    labels = source.read_labels(0, source.count)
    store = create_store(str(path), read_info(model_dir), count, layout=Layout())
    for a, b in shard_ranges(0, count, store.shard_rows):
        rows = np.arange(a, b) % len(latents)
        store.write_rows(a, latents[rows], [f"bench-{i:08d}" for i in range(a, b)], labels[rows])
    store.write_meta(
        count=count, sources=[{"spec": "mnist5k tiled", "description": "bench", "rows": [0, count]}]
    )
    return path


def bare(model_dir: Path, store: Path, device: torch.device, png: bool) -> float:
    """Images/s of a single-process loop over latents held in memory."""
    decoder, _ = load_model(model_dir, "decoder", device)
    data = open_store(str(store))
    latents = data.read_latents(0, data.count)
    futures: list = []

    def queue(batch: np.ndarray) -> None:
        futures.extend(_png_pool().submit(encode_png, image) for image in batch)

    decode_latents(decoder, latents[:DECODE_BATCH], device)  # warm-up
    started = time.perf_counter()
    decode_latents(decoder, latents, device, DECODE_BATCH, queue if png else None)
    for future in futures:
        future.result()
    return len(latents) / (time.perf_counter() - started)


def pipeline_child(model_dir: Path, store: Path, out: Path, workers: int) -> None:
    """Child process: one timed pipeline decode; prints JSON with rate and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    with connect(workers=workers) as client:
        started = time.perf_counter()
        result = decode(model_dir, str(store), str(out), client=client, max_in_flight=2 * workers)
        seconds = time.perf_counter() - started
    print(json.dumps({"rate": result.decoded / seconds, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss) does not carry the parent's
    high-water mark over fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pipeline(model_dir: Path, store: Path, out: Path, workers: int) -> dict[str, float]:
    args = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        str(model_dir),
        "--workers",
        str(workers),
    ]
    args += ["--store", str(store), "--out", str(out)]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--pipeline-only", action="store_true", help="skip the bare loops")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pipeline_child(args.model, args.store, args.out, args.workers[0])
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        model_dir = workdir / "seed-mnist5k"
        train(preset_config("seed"), TrainConfig("mnist5k", 1), model_dir, progress=False)
    store = build_store(model_dir, workdir, args.count)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[tuple[str, float, str]] = []
    decode_only = with_png = None
    if not args.pipeline_only:
        decode_only = bare(model_dir, store, device, png=False)
        with_png = bare(model_dir, store, device, png=True)
        rows.append(
            (f"bare decode ({device.type}, {torch.get_num_threads()} threads)", decode_only, "")
        )
        rows.append(("bare decode + PNG (one process)", with_png, ""))
    for workers in args.workers:
        run = pipeline(model_dir, store, workdir / f"out-{workers}", workers)
        ratios = ""
        if decode_only and with_png:
            ratios = f"{run['rate'] / with_png:.2f}x bare+PNG, "
            ratios += f"{run['rate'] / decode_only:.2f}x bare decode"
        plural = "s" if workers > 1 else ""
        name = f"pipeline, {workers} worker{plural} (client peak RSS {run['peak_rss_mib']:.0f} MiB)"
        rows.append((name, run["rate"], ratios))
    model_id = read_info(model_dir).short_id
    print(f"\nlatentbatch decode benchmark: {args.count} images, model {model_id}")
    print(f"{'stage':<58} {'images/s':>10}  ratio")
    print("-" * 100)
    for name, rate, ratio in rows:
        print(f"{name:<58} {rate:>10.0f}  {ratio}")


if __name__ == "__main__":
    main()
