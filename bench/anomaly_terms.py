#!/usr/bin/env python3
"""Which anomaly terms catch which anomalies: the choice behind ``latentbatch score``.

    python bench/anomaly_terms.py [--models seed codec] [--workdir DIR]

The models, reference, normal and anomaly sets are ``bench/uses.py``'s (mnist5k; the
4,500 training digits as reference, the 500 validation digits as normal; shapes, a block
anywhere, a block over the digit, the digits rotated 90 degrees). Every image is encoded
and reconstructed in this process (float32 latents), each candidate term is computed for
every set, standardised by the reference's own values (a reference row leaves itself out
of its neighbours), and the AUROC of each term and of each combination is printed:

  psnr      the reconstruction's PSNR, two-sided (``score``'s first term)
  knn       mean L2 distance to the 5 nearest reference latents (``score``'s second)
  knn1      the same to the nearest one
  knnw      the same after standardising each latent value by the reference's std
  patch     the worst 7x7 patch's reconstruction PSNR, two-sided
  gauss     Mahalanobis distance to the nearest label's Gaussian (each label's mean
            and covariance in latent space, the covariance shrunk by 0.01)
  fisher    Fisher's combination of the terms' empirical p-values (sum of -log p)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from uses import ANOMALIES, auroc, digit_sets  # bench/uses.py, beside this script

from latentbatch.config import TrainConfig
from latentbatch.engine.kernel import decode_latents, encode_images
from latentbatch.models.checkpoint import model_dir_for, read_info
from latentbatch.models.weights import load_model
from latentbatch.train import model_config_for, train
from latentbatch.uses.distances import squared_distances

CPU = torch.device("cpu")


def terms(model_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each term's raw values for every set."""
    autoencoder, _ = load_model(model_dir)
    found_sets = digit_sets(model_dir)
    sets = {name: images for name, (images, _) in found_sets.items()}
    ref_labels = found_sets["reference"][1]
    latents, errors = {}, {}
    for name, images in sets.items():
        z = encode_images(autoencoder.encoder, images, CPU)
        latents[name] = z.reshape(len(z), -1).astype(np.float32)
        again = decode_latents(autoencoder.decoder, z.astype(np.float32), CPU)
        diff = (images.astype(np.float32) - again.astype(np.float32)) / 255
        errors[name] = (diff**2).reshape(*images.shape[:3], -1).mean(axis=3)
    reference = latents["reference"]
    spread = reference.std(axis=0) + 1e-6
    classes = np.unique(ref_labels)
    gaussians = []
    for c in classes:
        rows = reference[ref_labels == c]
        centred_rows = rows - rows.mean(axis=0)
        cov = centred_rows.T @ centred_rows / len(rows) + 1e-2 * np.eye(rows.shape[1])
        gaussians.append((rows.mean(axis=0), np.linalg.inv(cov)))

    def knn(queries: np.ndarray, refs: np.ndarray, k: int, same: bool) -> np.ndarray:
        squared = squared_distances(queries, refs)
        if same:
            np.fill_diagonal(squared, np.inf)
        return np.sqrt(np.maximum(np.partition(squared, k - 1, axis=1)[:, :k], 0)).mean(axis=1)

    found: dict[str, dict[str, np.ndarray]] = {}
    for name, flat in latents.items():
        same = name == "reference"
        pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(errors[name])[:, None], 7, 1)
        found[name] = {
            "psnr": -10 * np.log10(errors[name].mean(axis=(1, 2)) + 1e-12),
            "knn": knn(flat, reference, 5, same),
            "knn1": knn(flat, reference, 1, same),
            "knnw": knn(flat / spread, reference / spread, 5, same),
            "patch": -10 * np.log10(pooled.flatten(1).max(1).values.numpy() + 1e-12),
            "gauss": np.min(
                [
                    (((flat - mean) @ precision) * (flat - mean)).sum(axis=1)
                    for mean, precision in gaussians
                ],
                axis=0,
            ),
        }
    return found


TWO_SIDED = ("psnr", "patch")


def table(found: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    def z(term: str, name: str) -> np.ndarray:
        ref, values = found["reference"][term], found[name][term]
        scores = (values - ref.mean()) / (ref.std() or 1.0)
        return np.abs(scores) if term in TWO_SIDED else scores

    def p(term: str, name: str) -> np.ndarray:
        ref, values = found["reference"][term], found[name][term]
        if term in TWO_SIDED:
            middle = np.median(ref)
            ref, values = np.abs(ref - middle), np.abs(values - middle)
        ordered = np.sort(ref)
        above = len(ordered) - np.searchsorted(ordered, values, side="left")
        return np.asarray(-np.log((1 + above) / (1 + len(ordered))))

    def mean(**weights: float) -> Callable[[str], np.ndarray]:
        return lambda name: sum(w * z(t, name) for t, w in weights.items()) / sum(weights.values())

    combinations: dict[str, Callable[[str], np.ndarray]] = {
        **{term: mean(**{term: 1.0}) for term in found["reference"]},
        "psnr + knn": mean(psnr=1, knn=1),
        "psnr + 2 knn (score)": mean(psnr=1, knn=2),
        "psnr + 3 knn": mean(psnr=1, knn=3),
        "psnr + 2 knn1": mean(psnr=1, knn1=2),
        "psnr + knn + patch": mean(psnr=1, knn=1, patch=1),
        "psnr + knn + gauss": mean(psnr=1, knn=1, gauss=1),
        "psnr + 2 knn + gauss": mean(psnr=1, knn=2, gauss=1),
        "fisher(psnr, knn)": lambda name: p("psnr", name) + p("knn", name),
    }
    return {
        label: {s: auroc(f("normal"), f(s)) for s in ANOMALIES} for label, f in combinations.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["seed", "codec"])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-terms-"))
    for preset in args.models:
        model_dir = model_dir_for(preset, "mnist5k", workdir / "models")
        train(model_config_for(preset, "mnist5k"), TrainConfig.for_preset(preset, "mnist5k"),
              model_dir, progress=False)  # fmt: skip
        print(f"\n{preset} {read_info(model_dir).short_id}: AUROC against the normal digits")
        print(f"{'term(s)':<24}" + "".join(f"{s:>10}" for s in ANOMALIES))
        for label, row in table(terms(model_dir)).items():
            print(f"{label:<24}" + "".join(f"{row[s]:>10.3f}" for s in ANOMALIES))


if __name__ == "__main__":
    main()
