#!/usr/bin/env python3
"""The article's other reasons to decode, measured on mnist5k: for now, anomaly detection.

    python bench/uses.py [--models seed codec] [--workdir DIR] [--json]

For each model (trained with its preset's defaults on mnist5k, seed 0, or reused from
WORKDIR/models): the reference store holds the training digits, the normal set is the
500 validation digits (the training split's held-out rows), and two anomaly sets hold
images the model never saw: 500 synthetic shapes (discs, squares, triangles), and the
validation digits with a seeded 12x12 white block over each. Each set's store is scored
against the reference (``latentbatch.anomaly.score``, k=5, quantile 0.99); the table
gives the AUROC of the anomaly score, normal against each anomaly set, and the share of
normal digits above the threshold. Stores are written in this process (encoder, PSNR of
the stored latents, whole shards), not on a cluster. ``--json`` prints one object with
``anomaly_auroc`` ({model: {set: AUROC}}) and ``normal_above_threshold``; the other keys
of issue 24 (generation, manipulation) come with those operations.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentbatch.anomaly import score
from latentbatch.checkpoint import model_dir_for, read_info
from latentbatch.config import TrainConfig
from latentbatch.datasets import Geometry, open_source
from latentbatch.encode import stored_quality
from latentbatch.kernel import encode_images
from latentbatch.store import create_store, open_store, shard_ranges
from latentbatch.train import model_config_for, split, train
from latentbatch.weights import load_model

BLOCK = 12


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """The chance that an anomalous image scores above a normal one (ties count half)."""
    greater = (anomalous[:, None] > normal[None, :]).mean()
    ties = (anomalous[:, None] == normal[None, :]).mean()
    return float(greater + ties / 2)


def write_store(path: Path, model_dir: Path, images: np.ndarray, name: str) -> str:
    """A store of ``images`` encoded by the model, with each row's PSNR, in this process."""
    autoencoder, info = load_model(model_dir)
    cpu = torch.device("cpu")
    store = create_store(
        str(path),
        model_id=info.model_id,
        config=info.config,
        capacity=len(images),
        quantization=info.quantization,
    )
    for a, b in shard_ranges(0, len(images), store.shard_rows):
        latents = encode_images(autoencoder.encoder, images[a:b], cpu)
        stored = latents.astype(store.latents.dtype)
        quality = stored_quality(autoencoder.decoder, images[a:b], stored, cpu)
        ids = [f"{name}-{i:05d}" for i in range(a, b)]
        store.write_rows(a, stored, ids, np.full(b - a, -1), quality)
    store.write_meta(count=len(images))
    return str(path)


def occluded(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` with a white ``BLOCK`` x ``BLOCK`` square at a seeded place on each."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    size = images.shape[1]
    for image in out:
        y, x = rng.integers(0, size - BLOCK, 2)
        image[y : y + BLOCK, x : x + BLOCK] = 255
    return out


def measure(model_dir: Path, workdir: Path) -> dict[str, Any]:
    info = read_info(model_dir)
    geometry = Geometry(info.config.image_size, info.config.channels)
    digits = open_source("mnist5k", geometry)
    images = digits.read(0, len(digits))
    trained = TrainConfig.for_preset(info.config.preset, "mnist5k")
    train_rows, val_rows = split(len(images), trained.val_fraction, trained.seed)
    folder = workdir / f"stores-{info.short_id}"
    sets = {
        "reference": images[train_rows.numpy()],
        "normal": images[val_rows.numpy()],
        "shapes": open_source("synthetic:500", geometry).read(0, 500),
        "occluded": occluded(images[val_rows.numpy()]),
    }
    stores = {
        name: (
            str(folder / f"{name}.zarr")
            if (folder / f"{name}.zarr").exists()
            else write_store(folder / f"{name}.zarr", model_dir, pixels, name)
        )
        for name, pixels in sets.items()
    }
    scores = {}
    threshold = 0.0
    for name in ("normal", "shapes", "occluded"):
        result = score(stores[name], stores["reference"], k=5, quantile=0.99)
        threshold = result.threshold
        opened = open_store(stores[name])
        scores[name] = opened.read_anomaly(0, opened.count)
    return {
        "model": f"{info.config.preset} {info.short_id}",
        "anomaly_auroc": {
            name: auroc(scores["normal"], scores[name]) for name in ("shapes", "occluded")
        },
        "normal_above_threshold": float(np.mean(scores["normal"] > threshold)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["seed"], choices=("seed", "compact", "codec")
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-uses-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.models:
        model_dir = model_dir_for(preset, "mnist5k", workdir / "models")
        train(
            model_config_for(preset, "mnist5k"),
            TrainConfig.for_preset(preset, "mnist5k"),
            model_dir,
            progress=False,
        )
        rows.append(measure(model_dir, workdir))
    if args.json:
        print(
            json.dumps(
                {
                    "anomaly_auroc": {r["model"]: r["anomaly_auroc"] for r in rows},
                    "normal_above_threshold": {
                        r["model"]: r["normal_above_threshold"] for r in rows
                    },
                },
                indent=2,
            )
        )
        return
    print("anomaly detection on mnist5k (reference: training digits; k=5, quantile 0.99)")
    print(f"{'model':<22} {'AUROC shapes':>13} {'AUROC occluded':>15} {'normal above':>13}")
    for r in rows:
        print(
            f"{r['model']:<22} {r['anomaly_auroc']['shapes']:>13.3f} "
            f"{r['anomaly_auroc']['occluded']:>15.3f} {r['normal_above_threshold']:>12.1%}"
        )


if __name__ == "__main__":
    main()
