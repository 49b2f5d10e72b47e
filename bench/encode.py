#!/usr/bin/env python3
"""Image encoding alone: images/s per codec and thread count, from one run.

    python bench/encode.py [--count 4096] [--threads 1 2 4 8 16] [--json]

The images are decoded-digit-like 28×28 greys (a seeded blob per image), encoded the way
a decode task encodes them (:class:`latentbatch.decode.ImageEncoding`: one chunk per
thread) four times over. The table shows whether more encoding threads help on this
machine: the PNG writer and the lossy codecs release the GIL only inside the codec, so
the Python around each image call bounds how far threads scale.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from latentbatch.decode import ImageEncoding
from latentbatch.outputs.codecs import CODECS, check_codec


def digits(count: int) -> np.ndarray:
    """Digit-like images: dark background, one bright smooth blob each."""
    y, x = np.mgrid[:28, :28]
    rng = np.random.default_rng(0)
    centre = rng.uniform(8, 20, (count, 2, 1, 1))
    radius = rng.uniform(4, 8, (count, 1, 1))
    distance = np.hypot(y - centre[:, 0], x - centre[:, 1]) / radius
    return np.clip(255 * (1.5 - distance), 0, 255).astype(np.uint8)[..., None]


def rate(images: np.ndarray, codec: str, threads: int, rounds: int = 4) -> float:
    encoding = ImageEncoding(threads, check_codec(codec))
    encoding.add(images[:256])  # warm-up: start the pool's threads
    encoding.result()
    encoding = ImageEncoding(threads, check_codec(codec))
    started = time.perf_counter()
    for _ in range(rounds):
        encoding.add(images)
    encoding.result()
    return rounds * len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    images = digits(args.count)
    numbers = {codec: {str(t): rate(images, codec, t) for t in args.threads} for codec in CODECS}
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "images_per_second": numbers}, indent=2))
        return
    print(f"\nimage encoding, {args.count} 28x28 images x 4, {os.cpu_count()} cpus (images/s)")
    print(f"{'codec':<8}" + "".join(f"{f'{t} threads':>14}" for t in args.threads) + "  best/1")
    for codec, rates in numbers.items():
        best = max(rates.values()) / rates[str(args.threads[0])]
        print(f"{codec:<8}" + "".join(f"{r:>14.0f}" for r in rates.values()) + f"  {best:.1f}x")


if __name__ == "__main__":
    main()
