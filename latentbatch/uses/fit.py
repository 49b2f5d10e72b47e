"""A Gaussian model of a store's latents, per label: what ``generate`` draws from and
what ``shift`` maps through.

Fitted a shard at a time, over latents of any size ``D = C * h * w``:

1. the mean and the range of every value, and each label's count and mean; the top
   :data:`RANK` principal directions make a subspace, and the variance outside it,
   spread evenly, the residual. Up to :data:`EXACT_VALUES` values the directions are
   the exact eigenvectors of the ``D x D`` scatter, summed in the same pass (128 MiB at
   4,096); above, a seeded randomized range finder with :data:`POWER_ITERATIONS` power
   iterations (Halko, Martinsson and Tropp 2011, algorithm 4.4), a pass each, holds
   ``D x (RANK + OVERSAMPLE)`` float64 instead (10 MiB for SD's 4x64x64 latents), never
   ``D x D``. Memory: ``8 x D x (4 x shard rows + 4 x (RANK + OVERSAMPLE) + labels + 6)``
   bytes, whatever the row count (298 MiB for SD's latents in 512-row shards, 10 labels;
   ``bench/fit.py`` measures the peak against it);
2. each row's coordinates in that subspace, whose mean and covariance per label are each
   label's Gaussian there (shrunk towards the covariance pooled over the labels, more so
   for labels with few rows).

A sample of label ``L`` is ``L``'s mean, plus ``L``'s Gaussian in the subspace, plus the
residual's isotropic noise outside it, clipped to the range the store's latents span.
Latents of a store without labels are one group, ``-1``. A generate or shift writes its
fit into the derived store once (:func:`keep_fit`: the arrays ``fit_mean``,
``fit_basis``, ``fit_low``, ``fit_high``, ``fit_label_means``, ``fit_factors``, float64,
and the ``fit`` record), and its tasks read it there (:func:`kept_fit`).

Why this model (``bench/uses.py``, mnist5k, the share of re-encoded samples' 10 nearest
reference neighbours with the label asked for): one Gaussian per label with a diagonal
covariance scores 0.93 but draws the label's mean digit with speckles, every sample
alike; one covariance pooled over the labels draws varied digits but scores 0.71; a
Gaussian per label in the top 64 directions draws varied digits and scores 0.86 (1,000
samples per label, seed and codec models alike). The codec model's own entropy model is
one logistic per channel, blind to labels and to every spatial correlation: its samples
decode to strokes and blots, not digits (looked at, 16 samples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentbatch.errors import LatentbatchError
from latentbatch.storage.fs import StorageOptions
from latentbatch.stores.store import LatentStore
from latentbatch.uses.derive import keep, kept

RANK = 64
"""Principal directions of the subspace in which each label has its own covariance."""
EXACT_VALUES = 4096
"""Latents of up to this many values (``C * h * w``) are fitted through their exact
``D x D`` scatter (float64: 128 MiB at 4,096); larger ones by a randomized range finder."""
OVERSAMPLE = 16
"""Directions the randomized range finder keeps beyond :data:`RANK`."""
POWER_ITERATIONS = 4
"""Passes of the randomized range finder over the store (its directions' accuracy)."""
UNLABELLED = -1
FIT = "fit"
"""The fit's record in a derived store's metadata, once its arrays are whole."""
_ARRAYS = ("mean", "basis", "low", "high", "label_means", "factors")


class FitError(LatentbatchError):
    """A store's latents cannot be fitted, or the fit has no such label."""


@dataclass(frozen=True, kw_only=True)
class LatentFit:
    """Each label's Gaussian (see the module docstring). Arrays are float64; ``basis`` is
    ``(D, r)``, ``label_means`` ``(L, D)``, ``factors`` the Cholesky factors ``(L, r, r)``
    of the labels' covariances in the subspace."""

    shape: tuple[int, int, int]
    count: int
    mean: np.ndarray
    basis: np.ndarray
    residual_std: float
    low: np.ndarray
    high: np.ndarray
    labels: tuple[int, ...]
    label_counts: tuple[int, ...]
    label_means: np.ndarray
    factors: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def record(self) -> dict[str, Any]:
        """The fit's scalars and labels, JSON-ready (its arrays: :meth:`arrays`)."""
        return {
            "shape": list(self.shape),
            "count": self.count,
            "rank": self.rank,
            "residual_std": self.residual_std,
            "labels": list(self.labels),
            "label_counts": list(self.label_counts),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The fit's arrays by the names a derived store keeps them under."""
        return {f"fit_{name}": getattr(self, name) for name in _ARRAYS}

    @classmethod
    def of(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> LatentFit:
        """The fit :meth:`record` and :meth:`arrays` describe."""
        c, h, w = (int(v) for v in record["shape"])
        mean, basis, low, high, label_means, factors = (
            np.asarray(arrays[f"fit_{name}"], np.float64) for name in _ARRAYS
        )
        return cls(
            shape=(c, h, w),
            count=int(record["count"]),
            mean=mean,
            basis=basis,
            residual_std=float(record["residual_std"]),
            low=low,
            high=high,
            labels=tuple(int(v) for v in record["labels"]),
            label_counts=tuple(int(v) for v in record["label_counts"]),
            label_means=label_means,
            factors=factors,
        )

    def index(self, label: int) -> int:
        """Where ``label`` is in :attr:`labels`, or a :class:`FitError` naming them."""
        if label not in self.labels:
            known = ", ".join(str(v) for v in self.labels)
            raise FitError(
                f"label {label} has no rows in the store fitted (its labels: {known}); "
                "ask for one of those"
            )
        return self.labels.index(label)

    def _coordinates(self, values: np.ndarray) -> np.ndarray:
        return np.asarray((values - self.mean) @ self.basis)

    def _outside(self, values: np.ndarray) -> np.ndarray:
        """``values`` less their part in the subspace."""
        return np.asarray(values - (values @ self.basis) @ self.basis.T)

    def clip(self, values: np.ndarray) -> np.ndarray:
        """Flat values ``(n, D)`` → latents ``(n, C, h, w)`` within the store's range."""
        clipped: np.ndarray = np.clip(values, self.low, self.high)
        return clipped.reshape(len(values), *self.shape)

    def sample(
        self, labels: np.ndarray, rng: np.random.Generator, temperature: float = 1.0
    ) -> np.ndarray:
        """One latent ``(n, C, h, w)`` for each of ``labels``, drawn with ``rng``; a
        ``temperature`` below 1 narrows every Gaussian (samples nearer their label's
        mean), above 1 widens it."""
        indices = np.array([self.index(int(v)) for v in labels], dtype=np.int64)
        inside = rng.standard_normal((len(labels), self.rank))
        outside = rng.standard_normal((len(labels), int(self.mean.size)))
        coordinates = np.einsum("nij,nj->ni", self.factors[indices], inside)
        values = (
            self.label_means[indices]
            + temperature * coordinates @ self.basis.T
            + temperature * self.residual_std * self._outside(outside)
        )
        return self.clip(values)

    def mean_shift(self, flat: np.ndarray, source: int, target: int, strength: float) -> np.ndarray:
        """Flat latents ``(n, D)`` moved by ``strength`` times the difference of the two
        labels' means."""
        a, b = self.index(source), self.index(target)
        return self.clip(flat + strength * (self.label_means[b] - self.label_means[a]))

    def transport(self, flat: np.ndarray, source: int, target: int, strength: float) -> np.ndarray:
        """Flat latents ``(n, D)`` of label ``source`` mapped towards label ``target``: in
        the subspace each row keeps its place relative to its label's Gaussian (whitened
        by ``source``'s covariance, coloured by ``target``'s), outside it the means'
        difference moves it; ``strength`` 1 is the whole way, 0.5 half of it."""
        a, b = self.index(source), self.index(target)
        coordinates = self._coordinates(flat)
        start_mean = self._coordinates(self.label_means[a][None])[0]
        end_mean = self._coordinates(self.label_means[b][None])[0]
        whitened = np.linalg.solve(self.factors[a], (coordinates - start_mean).T).T
        moved = end_mean + whitened @ self.factors[b].T
        outside = self._outside((self.label_means[b] - self.label_means[a])[None])[0]
        target_values = flat + (moved - coordinates) @ self.basis.T + outside
        return self.clip(flat + strength * (target_values - flat))


def _flat(store: LatentStore, start: int, stop: int) -> np.ndarray:
    latents = store.read_latents(start, stop)
    return latents.reshape(len(latents), -1).astype(np.float64)


def _labels(store: LatentStore, start: int, stop: int) -> np.ndarray:
    if not store.has_labels:
        return np.full(stop - start, UNLABELLED, np.int64)
    return store.read_labels(start, stop).astype(np.int64)


def fit_latents(store: LatentStore, rank: int = RANK) -> LatentFit:
    """Fit each label's Gaussian to the committed latents of ``store`` (see the module
    docstring), reading it a shard at a time: twice, or, for latents of more than
    :data:`EXACT_VALUES` values, :data:`POWER_ITERATIONS` + 3 times."""
    values = int(np.prod(store.latent_shape))
    if store.count < 2:
        raise FitError(f"{store.url} has {store.count} rows; a fit needs at least 2")
    exact = values <= EXACT_VALUES
    total = np.zeros(values)
    scatter = np.zeros((values, values) if exact else (0, 0))  # D x D, only when exact
    squares = np.zeros(values)  # each value's sum of squares: the total variance
    low = np.full(values, np.inf)
    high = np.full(values, -np.inf)
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for start, stop in store.each_shard():
        flat = _flat(store, start, stop)
        total += flat.sum(axis=0)
        if exact:
            scatter += flat.T @ flat
        else:
            squares += (flat * flat).sum(axis=0)
        low, high = np.minimum(low, flat.min(axis=0)), np.maximum(high, flat.max(axis=0))
        labels = _labels(store, start, stop)
        for label in np.unique(labels).tolist():
            chosen = flat[labels == label]
            sums[label] = sums.get(label, np.zeros(values)) + chosen.sum(axis=0)
            counts[label] = counts.get(label, 0) + len(chosen)
    n = store.count
    mean = total / n
    rank = min(rank, values, n - 1)
    if exact:
        covariance = scatter / n - np.outer(mean, mean)
        eigenvalues, vectors = np.linalg.eigh(covariance)  # ascending
        basis = vectors[:, ::-1][:, :rank].copy()
        outside = float(eigenvalues[: values - rank].sum())
    else:
        basis, top = _randomized_directions(store, mean, rank)
        outside = float((squares / n - mean * mean).sum() - top.sum())
    residual = max(0.0, outside) / max(1, values - rank)
    known = sorted(counts)
    label_means = np.stack([sums[label] / counts[label] for label in known])
    # pass 2: each label's covariance in the subspace
    inner = {label: np.zeros((rank, rank)) for label in known}
    for start, stop in store.each_shard():
        centred = _flat(store, start, stop)
        centred -= mean
        coordinates = centred @ basis
        labels = _labels(store, start, stop)
        for label in np.unique(labels).tolist():
            chosen = coordinates[labels == label]
            inner[label] += chosen.T @ chosen
    centres = (label_means - mean) @ basis
    covariances = [
        inner[label] / counts[label] - np.outer(centre, centre)
        for label, centre in zip(known, centres, strict=True)
    ]
    weights = np.array([counts[label] for label in known], np.float64)
    pooled = sum(w * c for w, c in zip(weights, covariances, strict=True)) / weights.sum()
    jitter = 1e-6 * max(float(np.trace(pooled)) / rank, 1e-12) * np.eye(rank)
    factors = []
    for label, own in zip(known, covariances, strict=True):
        shrink = rank / (counts[label] + rank)  # few rows: nearer the pooled covariance
        blended = (1 - shrink) * own + shrink * pooled + jitter
        factors.append(np.linalg.cholesky((blended + blended.T) / 2))
    return LatentFit(
        shape=store.latent_shape,
        count=n,
        mean=mean,
        basis=basis,
        residual_std=float(np.sqrt(residual)),
        low=low,
        high=high,
        labels=tuple(int(v) for v in known),
        label_counts=tuple(counts[label] for label in known),
        label_means=label_means,
        factors=np.stack(factors),
    )


def _randomized_directions(
    store: LatentStore, mean: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``rank`` principal directions ``(D, rank)`` of the store's latents and
    their variances, by a seeded randomized range finder: :data:`POWER_ITERATIONS`
    passes of ``Z = Xc^T (Xc Q)``, each re-orthonormalised, then the covariance within
    the range found, ``(Q^T Xc^T Xc Q) / n``, diagonalised (a pass more)."""
    values = mean.size
    width = min(values, rank + OVERSAMPLE)
    directions, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((values, width)))
    for _ in range(POWER_ITERATIONS):
        product = np.zeros((values, width))
        for start, stop in store.each_shard():
            centred = _flat(store, start, stop)
            centred -= mean  # in place: a shard's rows are the memory, not twice them
            product += centred.T @ (centred @ directions)
        directions, _ = np.linalg.qr(product)
    within = np.zeros((width, width))
    for start, stop in store.each_shard():
        centred = _flat(store, start, stop)
        centred -= mean
        projected = centred @ directions
        within += projected.T @ projected
    variances, vectors = np.linalg.eigh(within / store.count)  # ascending
    order = np.argsort(variances)[::-1][:rank]
    return directions @ vectors[:, order], variances[order]


def keep_fit(store: LatentStore, fit: LatentFit) -> None:
    """Write ``fit`` into the derived store ``store``, where its tasks read it."""
    keep(store, FIT, fit.record(), fit.arrays(), "the fitted Gaussians")


def kept_fit(url: str, uuid: str, options: StorageOptions | None) -> LatentFit:
    """The fit the derived store ``url`` (of ``uuid``) keeps, read once per process."""
    record, arrays = kept(url, uuid, options, FIT, tuple(f"fit_{name}" for name in _ARRAYS))
    return LatentFit.of(record, arrays)


def requested_labels(fit: LatentFit, labels: Sequence[int] | None) -> list[int]:
    """The labels asked for (each checked), or every label the fit knows."""
    if not labels:
        return list(fit.labels)
    for label in labels:
        fit.index(label)
    return list(dict.fromkeys(labels))
