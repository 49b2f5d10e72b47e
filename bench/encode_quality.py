#!/usr/bin/env python3
"""What recording each row's PSNR costs an encode, measured in one run.

    python bench/encode_quality.py [--count 4096] [--presets seed compact] [--json]

For each preset (a model trained one epoch on mnist5k, seconds), in one process on the
CPU with this machine's threads, in 1,024-row shards as an encode task works: the encoder
alone (what an encode did before the ``quality`` array), then the encoder plus what
``latentbatch.encode.encode_shard`` adds (decode the latents as stored, float16, and one
PSNR per row). Best of three passes each; the table shows images/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from latentbatch.config import TrainConfig, preset_config
from latentbatch.encode import stored_quality
from latentbatch.engine.kernel import encode_images
from latentbatch.models.weights import load_model
from latentbatch.sources.images import Geometry, open_source
from latentbatch.train import train

SHARD = 1024


def best_rate(work: object, images: np.ndarray, passes: int = 3) -> float:
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        for start in range(0, len(images), SHARD):
            work(images[start : start + SHARD])  # type: ignore[operator]
        rates.append(len(images) / (time.perf_counter() - started))
    return max(rates)


def measure(preset: str, count: int, workdir: Path) -> dict[str, float]:
    model_dir = workdir / f"{preset}-mnist5k"
    train(preset_config(preset), TrainConfig("mnist5k", 1), model_dir, progress=False)
    encoder, _ = load_model(model_dir, "encoder")
    decoder, _ = load_model(model_dir, "decoder")
    cpu = torch.device("cpu")
    source = open_source("mnist5k", Geometry(28, 1))
    images = source.read(0, len(source))[np.arange(count) % len(source)]

    def encode_only(shard: np.ndarray) -> None:
        encode_images(encoder, shard, cpu).astype(np.float16)

    def encode_and_measure(shard: np.ndarray) -> None:
        latents = encode_images(encoder, shard, cpu).astype(np.float16)
        stored_quality(decoder, shard, latents, cpu)

    plain = best_rate(encode_only, images)
    measured = best_rate(encode_and_measure, images)
    return {"encode": plain, "encode_with_psnr": measured, "ratio": measured / plain}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--presets", nargs="+", default=["seed", "compact"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="latentbatch-bench-") as folder:
        numbers = {p: measure(p, args.count, Path(folder)) for p in args.presets}
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), **numbers}, indent=2))
        return
    print(f"\nencode with and without the per-row PSNR, {args.count} digits, "
          f"{torch.get_num_threads()} torch threads (images/s)")  # fmt: skip
    print(f"{'preset':<10}{'encode':>12}{'+ PSNR':>12}  ratio")
    for preset, n in numbers.items():
        print(f"{preset:<10}{n['encode']:>12.0f}{n['encode_with_psnr']:>12.0f}  {n['ratio']:.2f}x")


if __name__ == "__main__":
    main()
