"""The per-label Gaussians that generate draws from and shift maps through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentbatch.config import ModelConfig
from latentbatch.stores.store import Layout, create_store, open_store
from latentbatch.uses.fit import FitError, fit_latents, requested_labels
from tests.helpers import sd_sized_store

SHAPE = (2, 2, 2)  # an 8-value latent: ModelConfig(channels=1, image_size=8, widths=(4, 4)...)


def _store(path: Path, latents: np.ndarray, labels: np.ndarray, shard_rows: int = 64) -> str:
    """A store of the given latents (a made-up model id) in shards of ``shard_rows``."""
    config = ModelConfig("compact", 1, 8, (4, 4), latents.shape[1])
    store = create_store(
        str(path), model_id="0" * 64, config=config, capacity=len(latents),
        layout=Layout(shard_rows, shard_rows // 2, "float32"),
    )  # fmt: skip
    for a in range(0, len(latents), shard_rows):
        b = min(a + shard_rows, len(latents))
        store.write_rows(a, latents[a:b], [f"r{i}" for i in range(a, b)], labels[a:b])
    store.write_meta(count=len(latents), labels=bool((labels >= 0).any()))
    return str(path)


def _gaussians(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two labels, 0 and 1, with different means and covariances (8 values)."""
    labels = np.arange(n) % 2
    means = np.stack([np.zeros(8), np.linspace(1, 8, 8)])
    scales = np.stack([np.full(8, 0.5), np.linspace(0.2, 2, 8)])
    flat = means[labels] + scales[labels] * rng.standard_normal((n, 8))
    return flat.reshape(n, *SHAPE).astype(np.float32), labels, means


def test_fit_recovers_each_labels_mean_and_spread(tmp_path: Path) -> None:
    latents, labels, means = _gaussians(np.random.default_rng(0), 4000)
    fit = fit_latents(open_store(_store(tmp_path / "s.zarr", latents, labels)))
    assert fit.labels == (0, 1) and fit.label_counts == (2000, 2000)
    assert fit.rank == 8  # all 8 directions: no residual outside them
    np.testing.assert_allclose(fit.label_means, means, atol=0.1)
    drawn = fit.sample(np.ones(4000, np.int64), np.random.default_rng(1)).reshape(4000, 8)
    np.testing.assert_allclose(drawn.mean(axis=0), means[1], atol=0.15)
    np.testing.assert_allclose(drawn.std(axis=0), np.linspace(0.2, 2, 8), rtol=0.1)
    flat = latents.reshape(len(latents), -1)
    assert (drawn >= flat.min(axis=0)).all() and (drawn <= flat.max(axis=0)).all()  # clipped
    colder = fit.sample(np.ones(4000, np.int64), np.random.default_rng(1), temperature=0.5)
    assert colder.reshape(4000, 8).std(axis=0) == pytest.approx(drawn.std(axis=0) / 2, rel=0.1)


def test_a_fit_is_the_same_whatever_the_shards(tmp_path: Path) -> None:
    latents, labels, _ = _gaussians(np.random.default_rng(2), 500)
    small = fit_latents(open_store(_store(tmp_path / "a.zarr", latents, labels, 16)))
    large = fit_latents(open_store(_store(tmp_path / "b.zarr", latents, labels, 256)))
    np.testing.assert_allclose(small.label_means, large.label_means, rtol=1e-9)
    np.testing.assert_allclose(small.factors, large.factors, rtol=1e-6, atol=1e-9)


def test_transport_maps_one_labels_gaussian_onto_the_others(tmp_path: Path) -> None:
    latents, labels, _ = _gaussians(np.random.default_rng(3), 4000)
    fit = fit_latents(open_store(_store(tmp_path / "s.zarr", latents, labels)))
    zeros = latents[labels == 0].reshape(-1, 8).astype(np.float64)
    moved = fit.transport(zeros, 0, 1, 1.0).reshape(-1, 8)
    ones = latents[labels == 1].reshape(-1, 8)
    np.testing.assert_allclose(moved.mean(axis=0), ones.mean(axis=0), atol=0.1)
    np.testing.assert_allclose(moved.std(axis=0), ones.std(axis=0), rtol=0.1)
    halfway = fit.transport(zeros, 0, 1, 0.5).reshape(-1, 8)
    np.testing.assert_allclose(halfway.mean(axis=0), (zeros.mean(0) + moved.mean(0)) / 2, atol=0.05)
    shifted = fit.mean_shift(zeros, 0, 1, 1.0).reshape(-1, 8)  # spread kept, mean moved
    np.testing.assert_allclose(shifted.std(axis=0), zeros.std(axis=0), rtol=0.1)


def test_labels_that_are_not_there_are_named(tmp_path: Path) -> None:
    latents, labels, _ = _gaussians(np.random.default_rng(4), 100)
    fit = fit_latents(open_store(_store(tmp_path / "s.zarr", latents, labels)))
    assert requested_labels(fit, None) == [0, 1]
    assert requested_labels(fit, [1, 1]) == [1]
    with pytest.raises(FitError, match=r"label 7 has no rows .*its labels: 0, 1"):
        requested_labels(fit, [7])
    unlabelled = fit_latents(open_store(_store(tmp_path / "u.zarr", latents, np.full(100, -1))))
    assert unlabelled.labels == (-1,)


def test_latents_of_any_size_are_fitted_without_a_d_by_d_matrix(tmp_path: Path) -> None:
    """4x64x64 latents: the randomized range finder finds the planted directions and the
    residual spread, holding D x 80 float64, never the 2 GiB D x D scatter."""
    import tracemalloc

    url, planted = sd_sized_store(tmp_path / "sd.zarr")
    tracemalloc.start()
    fit = fit_latents(open_store(url))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert fit.basis.shape == (16_384, 64) and fit.labels == (0, 1, 2)
    assert np.linalg.norm(planted.T @ fit.basis[:, :6], axis=1).min() > 0.99
    # the exact answer of these rows, through their 300 x 300 Gram matrix
    store = open_store(url)
    flat = store.read_latents(0, store.count).reshape(store.count, -1).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    variances, vectors = np.linalg.eigh(centred @ centred.T / store.count)
    top = variances[::-1][:64]
    exact = (centred * centred).sum() / store.count - top.sum()
    # beyond the planted 6 the spectrum is flat noise, whose top 58 a range finder of 80
    # directions only approaches: the residual within 2 %
    assert fit.residual_std == pytest.approx(np.sqrt(exact / (16_384 - 64)), rel=0.02)
    directions = centred.T @ vectors[:, ::-1][:, :6]
    directions /= np.linalg.norm(directions, axis=0)
    assert np.linalg.norm(directions.T @ fit.basis[:, :6], axis=1).min() > 0.999
    assert peak < 200 * 2**20  # a shard of rows (16 MiB) and the directions, not 2 GiB
