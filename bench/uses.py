#!/usr/bin/env python3
"""The article's other reasons to decode, measured on mnist5k: generation, manipulation
(shift, interpolation) and anomaly detection.

    python bench/uses.py [--models seed codec] [--workdir DIR] [--count 1000] [--json]

For each model (trained with its preset's defaults on mnist5k, seed 0, or reused from
WORKDIR/models) the reference store holds the training digits with their labels and the
normal set the 500 validation digits (the training split's held-out rows). Stores of
images are written in this process (encoder, PSNR of the stored latents, whole shards);
the operations run as they do for users, on a local Dask cluster of two in-process
workers.

- **generation**: ``generate`` draws COUNT samples per label (seed 0); each is decoded,
  re-encoded by the same model, and its 10 nearest reference latents are looked up:
  ``generation_label_agreement`` is the share of those neighbours with the label asked
  for, averaged over the samples (per label and overall); ``generation_copies`` is the
  share of samples whose decoded image lies within 30 dB PSNR of a reference image.
- **shift**: ``shift --from-label A --to-label B --strength 1`` on every validation digit
  of label A (mnist5k's 500 validation digits hold about 50 per label), re-encoded:
  ``shift_label_agreement`` is the share whose 10 nearest reference neighbours' majority
  label is B, per pair, for each method: ``matching`` (the default), ``gaussian`` and
  ``mean``.
- **interpolation**: ``interpolate`` between 20 pairs of validation digits (9 steps):
  ``interpolation_endpoint_db`` is the largest difference between an endpoint's PSNR
  against its original image and the original's own reconstruction's; the midpoints'
  mean distance to their 10 nearest reference latents, over the reference's own typical
  distance, compares ``slerp`` with ``linear`` (lower: more like real digits).
- **anomalies**: four anomaly sets of images the model never saw, 500 synthetic shapes
  (discs, squares, triangles), and the validation digits with a 12x12 white block at a
  seeded place (``occluded``), with the block centred within 4 px (seeded) of each
  digit's centre of mass (``centred``: it overlaps the digit), and rotated 90 degrees
  (``rotated``), scored against the reference (``score``, k=5, quantile 0.99):
  ``anomaly_auroc`` (normal against each set) and ``normal_above_threshold``.

``--json`` prints one object with those keys, each keyed by model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client, LocalCluster

from latentbatch.config import TrainConfig
from latentbatch.encode import stored_quality
from latentbatch.engine.kernel import decode_latents, encode_images
from latentbatch.models.checkpoint import model_dir_for, read_info
from latentbatch.models.weights import load_model
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import create_store, open_store, shard_ranges
from latentbatch.train import model_config_for, split, train
from latentbatch.uses.anomaly import score
from latentbatch.uses.distances import squared_distances
from latentbatch.uses.generation import generate
from latentbatch.uses.manipulation import interpolate, shift

BLOCK = 12
ANOMALIES = ("shapes", "occluded", "centred", "rotated")
CPU = torch.device("cpu")
PAIRS = ((0, 6), (1, 7), (3, 8), (4, 9), (5, 3), (7, 1), (2, 5), (9, 4))


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """The chance that an anomalous image scores above a normal one (ties count half)."""
    greater = (anomalous[:, None] > normal[None, :]).mean()
    ties = (anomalous[:, None] == normal[None, :]).mean()
    return float(greater + ties / 2)


def write_store(
    path: Path, model_dir: Path, images: np.ndarray, name: str, labels: np.ndarray
) -> str:
    """A store of ``images`` encoded by the model, with each row's PSNR and its label, in
    this process."""
    autoencoder, info = load_model(model_dir)
    store = create_store(
        str(path),
        model_id=info.model_id,
        config=info.config,
        capacity=len(images),
        quantization=info.quantization,
    )
    for a, b in shard_ranges(0, len(images), store.shard_rows):
        latents = encode_images(autoencoder.encoder, images[a:b], CPU)
        stored = latents.astype(store.latents.dtype)
        quality = stored_quality(autoencoder.decoder, images[a:b], stored, CPU)
        ids = [f"{name}-{i:05d}" for i in range(a, b)]
        store.write_rows(a, stored, ids, labels[a:b], quality)
    store.write_meta(count=len(images), labels=bool((labels >= 0).any()))
    return str(path)


class Reference:
    """The reference store's latents (flat, float32), labels and images, in memory (4,500
    digits), and the model: what every measurement compares with."""

    def __init__(self, store_url: str, images: np.ndarray, model_dir: Path) -> None:
        store = open_store(store_url)
        self.latents = store.read_latents(0, store.count).reshape(store.count, -1)
        self.latents = self.latents.astype(np.float32)
        self.labels = store.read_labels(0, store.count)
        self.images = images.reshape(len(images), -1).astype(np.float32) / 255
        self.autoencoder, _ = load_model(model_dir)

    def reencoded(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored latents decoded, then encoded again: the images and their flat latents."""
        images = decode_latents(self.autoencoder.decoder, latents.astype(np.float32), CPU)
        again = encode_images(self.autoencoder.encoder, images, CPU)
        return images, again.reshape(len(again), -1).astype(np.float32)

    def neighbours(self, flat: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Labels ``(n, k)`` and distances ``(n, k)`` of each latent's nearest references."""
        labels, distances = [], []
        for a in range(0, len(flat), 1024):
            squared = squared_distances(flat[a : a + 1024], self.latents)
            nearest = np.argpartition(squared, k, axis=1)[:, :k]
            labels.append(self.labels[nearest])
            picked = np.take_along_axis(squared, nearest, axis=1)
            distances.append(np.sqrt(np.maximum(picked, 0)))
        return np.concatenate(labels), np.concatenate(distances)

    def best_psnr(self, images: np.ndarray) -> np.ndarray:
        """Each image's PSNR (dB) against its closest reference image."""
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        best = []
        for a in range(0, len(flat), 1024):
            squared = squared_distances(flat[a : a + 1024], self.images)
            best.append(np.maximum(squared.min(axis=1), 1e-12) / flat.shape[1])
        return np.asarray(10 * np.log10(1 / np.concatenate(best)))


def measure_generation(
    reference: Reference, store_url: str, folder: Path, count: int, client: Client
) -> dict[str, Any]:
    out = str(folder / f"generated-{count}.zarr")
    generate(store_url, out, count=count, seed=0, client=client)
    generated = open_store(out)
    labels = generated.read_labels(0, generated.count)
    images, flat = reference.reencoded(generated.read_latents(0, generated.count))
    found, _ = reference.neighbours(flat)
    agreement = (found == labels[:, None]).mean(axis=1)
    return {
        "label_agreement": float(agreement.mean()),
        "per_label": {int(v): float(agreement[labels == v].mean()) for v in np.unique(labels)},
        "copies": float((reference.best_psnr(images) >= 30).mean()),
        "samples": int(generated.count),
    }


def measure_shift(
    reference: Reference, normal_url: str, store_url: str, folder: Path, client: Client
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"matching": {}, "gaussian": {}, "mean": {}}
    for method in ("matching", "gaussian", "mean"):
        for a, b in PAIRS:
            url = str(folder / f"shift-{method}-{a}-{b}.zarr")
            shift(normal_url, url, from_label=a, to_label=b, method=method,
                  reference_url=store_url, client=client)  # fmt: skip
            shifted = open_store(url)
            _, flat = reference.reencoded(shifted.read_latents(0, shifted.count))
            found, _ = reference.neighbours(flat)
            majority = np.array([np.bincount(r, minlength=10).argmax() for r in found])
            out[method][f"{a}->{b}"] = float((majority == b).mean())
    return out


def measure_interpolation(
    reference: Reference, normal_url: str, normal_images: np.ndarray, folder: Path,
    client: Client,
) -> dict[str, Any]:  # fmt: skip
    normal = open_store(normal_url)
    rng = np.random.default_rng(0)
    pairs = rng.choice(normal.count, size=(20, 2), replace=False)
    _, own = reference.neighbours(reference.latents[:2000], k=11)  # itself first
    typical = float(own[:, 1:].mean())
    worst_db = 0.0
    midpoints: dict[str, list[float]] = {"slerp": [], "linear": []}
    for i, (a, b) in enumerate(pairs.tolist()):
        ids = normal.read("ids", [a, b]).tolist()
        for method in ("slerp", "linear"):
            url = str(folder / f"interp-{method}-{i}.zarr")
            interpolate(normal_url, ids[0], ids[1], url, steps=9, method=method, client=client)
            strip = open_store(url).read_latents(0, 9)
            decoded = decode_latents(reference.autoencoder.decoder, strip.astype(np.float32), CPU)
            _, distances = reference.neighbours(strip[4:5].reshape(1, -1).astype(np.float32))
            midpoints[method].append(float(distances.mean()) / typical)
            if method == "slerp":
                originals = normal_images[[a, b]]
                own_decode = decode_latents(
                    reference.autoencoder.decoder,
                    normal.read("latents", [a, b]).astype(np.float32),
                    CPU,
                )
                for end, original, recon in zip(decoded[[0, 8]], originals, own_decode,
                                                 strict=True):  # fmt: skip
                    gap = abs(psnr(end, original) - psnr(recon, original))
                    worst_db = max(worst_db, gap)
    return {
        "endpoint_db": worst_db,
        "midpoint_distance": {m: float(np.mean(v)) for m, v in midpoints.items()},
    }


def psnr(image: np.ndarray, original: np.ndarray) -> float:
    error = np.mean((image.astype(np.float64) - original.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def occluded(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` with a white ``BLOCK`` x ``BLOCK`` square at a seeded place on each."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    size = images.shape[1]
    for image in out:
        y, x = rng.integers(0, size - BLOCK, 2)
        image[y : y + BLOCK, x : x + BLOCK] = 255
    return out


def centred(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` with a white ``BLOCK`` x ``BLOCK`` square centred within 4 px (seeded)
    of each image's centre of mass, so that it overlaps the digit."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    size = images.shape[1]
    ys, xs = np.mgrid[0:size, 0:size]
    for image in out:
        grey = image.reshape(size, size, -1).mean(axis=2)
        mass = grey.sum() or 1.0
        centre = np.array([(ys * grey).sum(), (xs * grey).sum()]) / mass
        y, x = np.clip(np.round(centre + rng.integers(-4, 5, 2) - BLOCK / 2), 0, size - BLOCK)
        image[int(y) : int(y) + BLOCK, int(x) : int(x) + BLOCK] = 255
    return out


def digit_sets(model_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The images and labels (-1: none) of every set, for the model's image geometry:
    the reference (the training digits), the normal set (the validation digits) and the
    :data:`ANOMALIES` built from them."""
    info = read_info(model_dir)
    geometry = Geometry.of(info.config)
    digits = open_source("mnist5k", geometry)
    images = digits.read(0, len(digits))
    labels = np.asarray(digits.labels, np.int32)
    trained = TrainConfig.for_preset(info.config.preset, "mnist5k")
    train_rows, val_rows = (
        r.numpy() for r in split(len(images), trained.val_fraction, trained.seed)
    )
    unknown = np.full(500, -1, np.int32)
    return {
        "reference": (images[train_rows], labels[train_rows]),
        "normal": (images[val_rows], labels[val_rows]),
        "shapes": (open_source("synthetic:500", geometry).read(0, 500), unknown),
        "occluded": (occluded(images[val_rows]), unknown),
        "centred": (centred(images[val_rows]), unknown),
        "rotated": (np.ascontiguousarray(np.rot90(images[val_rows], 1, axes=(1, 2))), unknown),
    }


def measure(model_dir: Path, workdir: Path, count: int, client: Client) -> dict[str, Any]:
    info = read_info(model_dir)
    folder = workdir / f"stores-{info.short_id}"
    sets = digit_sets(model_dir)
    stores = {}
    for name, (pixels, known) in sets.items():
        path = folder / f"{name}.zarr"
        if path.exists() and open_store(str(path)).has_labels == bool((known >= 0).any()):
            stores[name] = str(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            stores[name] = write_store(path, model_dir, pixels, name, known)
    derived = folder / "derived"
    shutil.rmtree(derived, ignore_errors=True)  # every operation runs afresh
    reference = Reference(stores["reference"], sets["reference"][0], model_dir)
    scores = {}
    threshold = 0.0
    for name in ("normal", *ANOMALIES):
        result = score(stores[name], stores["reference"], k=5, quantile=0.99, client=client)
        threshold = result.threshold
        opened = open_store(stores[name])
        scores[name] = opened.read_anomaly(0, opened.count)
    return {
        "model": f"{info.config.preset} {info.short_id}",
        "generation": measure_generation(reference, stores["reference"], derived, count, client),
        "shift": measure_shift(reference, stores["normal"], stores["reference"], derived, client),
        "interpolation": measure_interpolation(
            reference, stores["normal"], sets["normal"][0], derived, client
        ),
        "anomaly_auroc": {name: auroc(scores["normal"], scores[name]) for name in ANOMALIES},
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
    parser.add_argument("--count", type=int, default=1000, help="Samples per label.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-uses-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        for preset in args.models:
            model_dir = model_dir_for(preset, "mnist5k", workdir / "models")
            train(
                model_config_for(preset, "mnist5k"),
                TrainConfig.for_preset(preset, "mnist5k"),
                model_dir,
                progress=False,
            )
            rows.append(measure(model_dir, workdir, args.count, client))
    if args.json:
        keys = {
            "generation_label_agreement": lambda r: r["generation"]["label_agreement"],
            "generation_per_label": lambda r: r["generation"]["per_label"],
            "generation_copies": lambda r: r["generation"]["copies"],
            "shift_label_agreement": lambda r: r["shift"],
            "interpolation_endpoint_db": lambda r: r["interpolation"]["endpoint_db"],
            "interpolation_midpoint_distance": lambda r: r["interpolation"]["midpoint_distance"],
            "anomaly_auroc": lambda r: r["anomaly_auroc"],
            "normal_above_threshold": lambda r: r["normal_above_threshold"],
        }
        print(json.dumps({k: {r["model"]: f(r) for r in rows} for k, f in keys.items()}, indent=2))
        return
    print(f"mnist5k; reference: the 4,500 training digits; {args.count} samples per label")
    print(f"{'model':<20} {'generation agree':>16} {'copies':>7} {'endpoint dB':>11} "
          f"{'midpoint slerp':>14} {'linear':>7} {'AUROC shapes':>12} {'occluded':>8} "
          f"{'centred':>8} {'rotated':>8} {'normal above':>12}")  # fmt: skip
    for r in rows:
        middle = r["interpolation"]["midpoint_distance"]
        found = r["anomaly_auroc"]
        print(f"{r['model']:<20} {r['generation']['label_agreement']:>16.3f} "
              f"{r['generation']['copies']:>7.1%} {r['interpolation']['endpoint_db']:>11.2f} "
              f"{middle['slerp']:>14.2f} {middle['linear']:>7.2f} "
              f"{found['shapes']:>12.3f} {found['occluded']:>8.3f} {found['centred']:>8.3f} "
              f"{found['rotated']:>8.3f} {r['normal_above_threshold']:>12.1%}")  # fmt: skip
    print("\nshift, share of validation digits whose re-encoded majority label is the target")
    pairs = [f"{a}->{b}" for a, b in PAIRS]
    print(f"{'model':<20} {'method':<10} " + " ".join(f"{p:>5}" for p in pairs) + "   mean")
    for r in rows:
        for method, found in r["shift"].items():
            cells = " ".join(f"{found[p]:>5.2f}" for p in pairs)
            print(f"{r['model']:<20} {method:<10} {cells} {np.mean(list(found.values())):>6.2f}")


if __name__ == "__main__":
    main()
