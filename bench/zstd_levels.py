#!/usr/bin/env python3
"""What each zstd level costs and saves on a codec store's int8 latents, in one run.

    python bench/zstd_levels.py --model MODEL_DIR [--rows 1024] [--levels 3 9 15 19 22] [--json]

The first ``--rows`` images of mnist5k are encoded by a ``codec``-preset model and laid
out as a format-2 store lays out a shard: one chunk per latent channel. For each level:
bytes (and bits per pixel), compression time of the shard (best of three) and
decompression time, and the bytes against the store's level
(``latentbatch.stores.store.INTEGER_ZSTD_LEVEL``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

from latentbatch.engine.kernel import encode_images
from latentbatch.ids import short_id
from latentbatch.models.weights import load_model
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import INTEGER_ZSTD_LEVEL


def best_seconds(work: object, passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a codec-preset model")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--levels", type=int, nargs="+", default=[3, 9, 15, 19, 22])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    encoder, info = load_model(args.model, "encoder")
    if not info.config.quantized:
        parser.error(f"{args.model} is a {info.config.preset} model; pass a codec model")
    geometry = Geometry.of(info.config)
    images = open_source("mnist5k", geometry).read(0, args.rows)
    symbols = encode_images(encoder, images, torch.device("cpu")).astype(np.int8)
    chunks = [np.ascontiguousarray(symbols[:, c]) for c in range(symbols.shape[1])]
    pixels = len(images) * geometry.size * geometry.size
    rows = {}
    for level in sorted({*args.levels, INTEGER_ZSTD_LEVEL}):
        codec = Zstd(level=level)
        packed = [codec.encode(c) for c in chunks]
        size = sum(len(p) for p in packed)
        compress = best_seconds(lambda c=codec: [c.encode(x) for x in chunks])
        decompress = best_seconds(lambda c=codec, p=packed: [c.decode(x) for x in p])
        rows[level] = {
            "bytes": size,
            "bpp": 8 * size / pixels,
            "compress_ms": 1000 * compress,
            "decompress_ms": 1000 * decompress,
        }
    reference = rows[INTEGER_ZSTD_LEVEL]["bytes"]
    for row in rows.values():
        row["bytes_vs_store_level"] = row["bytes"] / reference
    if args.json:
        print(json.dumps({"model_id": info.model_id, "rows": args.rows, "levels": rows}, indent=2))
        return
    print(f"\nzstd levels on {args.rows} rows of int8 latents, one chunk per channel "
          f"(model {short_id(info.model_id)}; the store uses level "
          f"{INTEGER_ZSTD_LEVEL})")  # fmt: skip
    print(
        f"{'level':>5}{'bytes':>10}{'bpp':>8}{'compress ms':>13}{'decompress ms':>15}  bytes ratio"
    )
    for level, row in rows.items():
        print(f"{level:>5}{row['bytes']:>10}{row['bpp']:>8.3f}{row['compress_ms']:>13.1f}"
              f"{row['decompress_ms']:>15.2f}  {row['bytes_vs_store_level']:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
