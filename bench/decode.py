#!/usr/bin/env python3
"""Decode throughput: bare torch loops against the full pipeline, measured in one run.

    python bench/decode.py [--count 20000] [--workers 1 2] [--device auto|cpu|cuda]
                           [--min-seconds S] [--passes 3] [--json] [--save FILE]
                           [--model DIR | --vae sd|sdxl|taesd] [--size 256] [--defaults]
                           [--workdir DIR]

Rows of the table, all on the same model and the same latents:

  bare decode          one process, latents in memory, decoder only (no I/O, no PNG);
                       best of three passes or more, with µs per image
  bare decode + PNG    the same loop, PNG-encoding every image on encoding threads sized
                       as a decode's (this process's cores on CPU, the host's cores per
                       GPU on CUDA)
  encode only          per codec (png, webp, jpeg at quality 90): images/s on those
                       threads and µs per image on one thread; for PNG also Pillow's
                       ``Image.save(format="PNG")``, the reference
  pipeline, N workers  Zarr store → Dask (N worker processes) → decode → PNG → tar shards
                       (default --images-per-shard: 10,240 images per shard and task);
                       best of --passes (3) decodes on one cluster, as for the bare loops
  fp32 matmul          a 4096² float32 matrix product on the same device: the yardstick
                       for the decoder's GFLOP/s

The latents are mnist5k encoded by the model, tiled to --count rows. Without --model a
seed model is trained for one epoch (a few seconds). With a diffusers autoencoder
(``--model`` a diffusers directory, or ``--vae`` one of the published architectures built
from diffusers' configs, randomly initialised with seed 0, so no download is needed: SD's
AutoencoderKL, SDXL's, TAESD's AutoencoderTiny) the latents are seeded N(0, 1) ones, as
scaled latents are, for --size x --size images; the store's shards and the output shards
then hold --count / (2 x the most workers) rows each, so that every worker gets whole
tasks, and the bare loops take the decode's memory-budgeted batch. ``--defaults`` keeps
instead the store layout an import would choose and the decode's default output shards
(as a user who sets neither gets them). The pipeline rows of each worker
count run in a child process so that its peak RSS is the client's alone; cluster
start-up and a warm-up decode of two shards per worker are not timed. On a shared
machine one pass can be 30 % slower than the next: both sides take their best pass. The
pipeline's workers decode on CUDA when the machine has it (the embedded cluster's rule).
``--min-seconds`` repeats the bare loops until they have run that long (to keep a fast
GPU busy long enough to measure); the best pass counts. ``--json`` prints the numbers as
one JSON object, ``--save FILE`` writes it beside the table.
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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import peak_rss_mib
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from latentbatch.config import TrainConfig, preset_config
from latentbatch.decode import ImageEncoding, decode
from latentbatch.encode import encode
from latentbatch.engine.cluster import connect
from latentbatch.engine.kernel import batch_for, decode_latents
from latentbatch.engine.workers import encoder_threads
from latentbatch.models.checkpoint import read_info
from latentbatch.models.weights import load_model
from latentbatch.outputs.codecs import CODECS, PNG, check_codec
from latentbatch.stores.store import (
    DEFAULT_SHARD_ROWS,
    Layout,
    create_store,
    open_store,
    shard_ranges,
)
from latentbatch.train import train

MATMUL_SIZE = 4096
_KL = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
VAES: dict[str, tuple[str, dict[str, Any]]] = {
    # diffusers' configs of stabilityai/sd-vae-ft-mse and of the SDXL VAE; TAESD's
    # (madebyollin/taesd) are AutoencoderTiny's defaults
    "sd": ("AutoencoderKL", {**_KL, "sample_size": 512, "scaling_factor": 0.18215}),
    "sdxl": ("AutoencoderKL", {**_KL, "sample_size": 1024, "scaling_factor": 0.13025}),
    "taesd": ("AutoencoderTiny", {}),
}


def build_vae(name: str, workdir: Path) -> Path:
    """A randomly initialised (seed 0) diffusers autoencoder of a published architecture,
    saved with ``save_pretrained`` (reused when there)."""
    import diffusers

    folder = workdir / f"vae-{name}"
    if (folder / "config.json").exists():
        return folder
    class_name, settings = VAES[name]
    torch.manual_seed(0)
    getattr(diffusers, class_name)(**settings).save_pretrained(str(folder))
    return folder


def build_latents(model_dir: Path, workdir: Path, count: int, size: int, shard: int | None) -> Path:
    """Seeded N(0, 1) latents of a diffusers autoencoder for ``size`` x ``size`` images,
    in store shards of ``shard`` rows (None: the default layout, as an import makes)."""
    info = read_info(model_dir)
    path = workdir / f"bench-{info.short_id}-{size}-{count}-{shard or 'default'}.zarr"
    if path.exists() and open_store(str(path)).count == count:
        return path
    shutil.rmtree(path, ignore_errors=True)
    store = create_store(
        str(path), model_id=info.model_id, config=info.config, capacity=count,
        layout=Layout(shard, 1 if shard else None, "float16"), image=(size, size),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for a, b in shard_ranges(0, count, store.shard_rows):
        latents = rng.standard_normal((b - a, *store.latent_shape), dtype=np.float32)
        store.write_rows(a, latents, [f"bench-{i:08d}" for i in range(a, b)], np.full(b - a, -1))
    store.write_meta(count=count)
    return path


def image_bytes(store: Path) -> int:
    """The memory one image of ``store`` takes through its model's decoder (estimate)."""
    opened = open_store(str(store))
    return opened.model_config.decode_bytes(*opened.image_size)


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
    info = read_info(model_dir)
    store = create_store(
        str(path),
        model_id=info.model_id,
        config=info.config,
        capacity=count,
        layout=Layout(),
        quantization=info.quantization,
    )
    for a, b in shard_ranges(0, count, store.shard_rows):
        rows = np.arange(a, b) % len(latents)
        store.write_rows(a, latents[rows], [f"bench-{i:08d}" for i in range(a, b)], labels[rows])
    store.write_meta(
        count=count, sources=[{"spec": "mnist5k tiled", "description": "bench", "rows": [0, count]}]
    )
    return path


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(
    model_dir: Path, store: Path, device: torch.device, png: bool, min_seconds: float = 0.0
) -> float:
    """Images/s of a single-process loop over latents held in memory: the best of at
    least three passes (more until ``min_seconds`` have run), so that one slow pass on a
    shared machine does not set the yardstick the pipeline is compared with."""
    decoder, _ = load_model(model_dir, "decoder", device)
    data = open_store(str(store))
    latents = data.read_latents(0, data.count)
    batch = batch_for(device, image_bytes(store))
    decode_latents(decoder, latents[:batch], device, batch)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    best, passes = 0.0, 0
    while passes < 3 or time.perf_counter() - started < min_seconds:
        begun = time.perf_counter()
        threads = min(encoder_threads(device), PNG.useful_threads)
        encoding = ImageEncoding(threads) if png else None
        decode_latents(decoder, latents, device, batch, encoding.add if encoding else None)
        if encoding is not None:
            encoding.result()
        _synchronize(device)
        best = max(best, len(latents) / (time.perf_counter() - begun))
        passes += 1
    return best


def encode_costs(model_dir: Path, store: Path, device: torch.device) -> dict[str, float]:
    """Per codec: microseconds per image on one thread (``{codec}_us``, and Pillow's PNG
    as ``pillow_png_us``) and encode-only images/s on the decode workers' encoding
    threads (``encode_only_{codec}``)."""
    decoder, _ = load_model(model_dir, "decoder")
    data = open_store(str(store))
    cpu = torch.device("cpu")
    sample = data.read_latents(0, min(data.count, 4096 if data.image_size[0] <= 64 else 16))
    images = decode_latents(decoder, sample, cpu, batch_for(cpu, image_bytes(store)))

    def pillow(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            buffer, format="PNG", compress_level=6
        )
        return buffer.getvalue()

    costs: dict[str, float] = {}
    started = time.perf_counter()
    for image in images:
        pillow(image)
    costs["pillow_png_us"] = (time.perf_counter() - started) / len(images) * 1e6
    for name in CODECS:
        codec = check_codec(name)
        threads = min(encoder_threads(device), codec.useful_threads)
        started = time.perf_counter()
        for start in range(0, len(images), 256):  # batches, as the engine encodes them
            codec.encode(images[start : start + 256])
        costs[f"{name}_us"] = (time.perf_counter() - started) / len(images) * 1e6
        encoding = ImageEncoding(threads, codec)
        started = time.perf_counter()
        for _ in range(4):
            encoding.add(images)
        encoding.result()
        costs[f"encode_only_{name}"] = 4 * len(images) / (time.perf_counter() - started)
        costs[f"{name}_threads"] = threads
    return costs


def decoder_flops(model_dir: Path, store: Path) -> float:
    """FLOPs (multiply-adds × 2) of one image of ``store`` through the decoder, as torch's
    ``FlopCounterMode`` counts them (convolutions and transposed ones alike)."""
    decoder, _ = load_model(model_dir, "decoder")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        decoder(torch.zeros(1, *open_store(str(store)).latent_shape))
    return float(counter.get_total_flops())


def matmul_gflops(device: torch.device, seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of a 4096² matrix product on ``device`` (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.rand(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.rand(MATMUL_SIZE, MATMUL_SIZE, device=device)
    a @ b  # warm-up
    _synchronize(device)
    started, runs = time.perf_counter(), 0
    while runs == 0 or time.perf_counter() - started < seconds:
        a @ b
        runs += 1
        if runs % 8 == 0:
            _synchronize(device)
    _synchronize(device)
    return 2.0 * MATMUL_SIZE**3 * runs / (time.perf_counter() - started) / 1e9


def pipeline_child(
    model_dir: Path, store: Path, warm: Path, out: Path, workers: int, passes: int,
    images_per_shard: int | None,
) -> None:  # fmt: skip
    """Child process: timed pipeline decodes; prints JSON with the best rate, every
    pass's rate and the peak RSS.

    The workers first decode a small store (two shards each), untimed, as the bare loops
    decode a batch first: the timed runs measure steady throughput, not each worker's
    one-off model load and first convolution. Then ``passes`` decodes of the store, each
    into an empty output, on the same cluster: the best counts, as for the bare loops."""
    rates = []
    with connect(workers=workers) as client:
        shutil.rmtree(out.with_name(out.name + "-warm"), ignore_errors=True)
        warm_out = str(out.with_name(out.name + "-warm"))
        # one task per store shard here, so that every worker gets two
        decode(model_dir, str(warm), warm_out, images_per_shard=1, client=client)
        for _ in range(passes):
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            result = decode(
                model_dir, str(store), str(out), client=client, max_in_flight=2 * workers,
                images_per_shard=images_per_shard,
            )  # fmt: skip
            rates.append(result.decoded / (time.perf_counter() - started))
    print(json.dumps({"rate": max(rates), "rates": rates, "peak_rss_mib": peak_rss_mib()}))


def pipeline(
    model_dir: Path, store: Path, warm: Path, out: Path, workers: int, passes: int,
    images_per_shard: int | None,
) -> dict[str, Any]:  # fmt: skip
    args = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        str(model_dir),
        "--workers",
        str(workers),
        "--passes",
        str(passes),
    ]
    args += ["--store", str(store), "--warm-store", str(warm), "--out", str(out)]
    if images_per_shard is not None:
        args += ["--images-per-shard", str(images_per_shard)]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--vae", choices=sorted(VAES), help="a published diffusers architecture")
    parser.add_argument("--size", type=int, default=256, help="image side for a diffusers model")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--defaults", action="store_true", help="default store layout and output shards"
    )
    parser.add_argument("--pipeline-only", action="store_true", help="skip the bare loops")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--min-seconds", type=float, default=0.0)
    parser.add_argument(
        "--passes", type=int, default=3, help="timed pipeline decodes per worker count"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warm-store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images-per-shard", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pipeline_child(
            args.model, args.store, args.warm_store, args.out, args.workers[0], args.passes,
            args.images_per_shard,
        )  # fmt: skip
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_vae(args.vae, workdir) if args.vae else args.model
    if model_dir is None:
        model_dir = workdir / "seed-mnist5k"
        train(preset_config("seed"), TrainConfig("mnist5k", 1), model_dir, progress=False)
    diffusers_model = read_info(model_dir).config.any_size
    per_shard = None  # the decode's default output shards
    if diffusers_model:
        if not args.defaults:
            per_shard = max(1, args.count // (2 * max(args.workers)))
        store = build_latents(model_dir, workdir, args.count, args.size, per_shard)
    else:
        store = build_store(model_dir, workdir, args.count)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    rows: list[tuple[str, float, str]] = []
    numbers: dict[str, object] = {
        "count": args.count,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "model": args.vae or str(model_dir),
        "image_size": list(open_store(str(store)).image_size),
        "store_shard_rows": open_store(str(store)).shard_rows,
        "images_per_shard": per_shard or "default",
    }
    decode_only = with_png = None
    if not args.pipeline_only:
        decode_only = bare(model_dir, store, device, False, args.min_seconds)
        with_png = bare(model_dir, store, device, True, args.min_seconds)
        flops = decoder_flops(model_dir, store)
        matmul = matmul_gflops(device)
        costs = encode_costs(model_dir, store, device)
        numbers |= costs
        numbers["encode_only"] = {name: costs[f"encode_only_{name}"] for name in CODECS}
        numbers |= {
            "bare_decode": decode_only,
            "bare_decode_encode": with_png,
            "decoder_gflops": decode_only * flops / 1e9,
            "matmul_gflops": matmul,
            "decoder_mflop_per_image": flops / 1e6,
            "decoder_gflop_per_image": flops / 1e9,
        }
        batch = batch_for(device, image_bytes(store))
        how = f"{torch.get_num_threads()} threads, batch {batch}"
        how = how if device.type == "cpu" else f"batch {batch}"
        numbers["decode_us_per_image"] = 1e6 / decode_only
        note = f"{1e6 / decode_only:.1f} us/image (all threads)"
        rows.append((f"bare decode ({device.type}, {how})", decode_only, note))
        threads = int(costs["png_threads"])
        rows.append((f"bare decode + PNG (one process, {threads} encoding threads)", with_png, ""))
        for name in CODECS:
            note = f"{costs[f'{name}_us']:.1f} us/image on one thread"
            if name == "png":
                ratio = costs["pillow_png_us"] / costs["png_us"]
                note += f", Pillow {costs['pillow_png_us']:.1f} ({ratio:.1f}x cheaper)"
            rows.append(
                (
                    f"{name} encode only ({int(costs[f'{name}_threads'])} threads)",
                    costs[f"encode_only_{name}"],
                    note,
                )
            )
        per_image = f"{flops / 1e9:.1f} GFLOP" if flops > 1e9 else f"{flops / 1e6:.1f} MFLOP"
        rows.append(
            (
                f"decoder GFLOP/s ({per_image} per image)",
                decode_only * flops / 1e9,
                f"{decode_only * flops / 1e9 / matmul:.2f}x fp32 matmul",
            )
        )
        rows.append((f"fp32 matmul {MATMUL_SIZE}² GFLOP/s", matmul, ""))
    for workers in args.workers:
        if diffusers_model:  # one image per worker: the model loaded, its first call made
            warm = build_latents(model_dir, workdir, workers, args.size, 1)
        else:
            warm = build_store(model_dir, workdir, 2 * DEFAULT_SHARD_ROWS * workers)
        out = workdir / f"out-{workers}"
        run = pipeline(model_dir, store, warm, out, workers, args.passes, per_shard)
        numbers[f"pipeline_{workers}"] = run["rate"]
        numbers[f"pipeline_{workers}_passes"] = run["rates"]
        numbers[f"pipeline_{workers}_client_peak_rss_mib"] = run["peak_rss_mib"]
        if decode_only:
            numbers[f"pipeline_{workers}_over_bare_decode"] = run["rate"] / decode_only
        ratios = ""
        if decode_only and with_png:
            ratios = f"{run['rate'] / with_png:.2f}x bare+PNG, "
            ratios += f"{run['rate'] / decode_only:.2f}x bare decode"
        plural = "s" if workers > 1 else ""
        name = f"pipeline, {workers} worker{plural} (client peak RSS {run['peak_rss_mib']:.0f} MiB)"
        rows.append((name, run["rate"], ratios))
    model_id = read_info(model_dir).short_id
    numbers["model_id"] = model_id
    if args.save:
        args.save.write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(numbers, indent=2, sort_keys=True))
        return
    device_name = numbers["device"]
    size = "x".join(map(str, numbers["image_size"]))  # type: ignore[arg-type]
    name = f"{args.vae} " if args.vae else ""
    print(
        f"\nlatentbatch decode benchmark: {args.count} images of {size}, model {name}{model_id}, "
        f"{device_name}"
    )
    print(f"{'stage':<58} {'images/s':>10}  ratio")
    print("-" * 100)
    for name, rate, ratio in rows:
        shown = f"{rate:>10.2f}" if rate < 100 else f"{rate:>10.0f}"
        print(f"{name:<58} {shown}  {ratio}")


if __name__ == "__main__":
    main()
