"""Anomaly scores: how unlike a reference store of normal images each row of a store is.

A row's score is the mean of two terms, each standardised (z-score) by the reference's
own rows, so that neither unit dominates:

- **reconstruction**: how far the row's encode-time PSNR (the ``quality`` array) lies from
  the reference's, in either direction (left out where a store records no PSNR): what
  the model reconstructs unusually badly is unlike what it learnt, and so is what it
  reconstructs unusually well (a flat image's PSNR is high whatever the model). One-sided,
  this term ranked digits *below* shapes against a shape reference (AUROC 0.12; two-sided
  0.76, and 0.98 with the distance term; ``tests/test_anomaly.py``'s stores);
- **neighbourhood**: the mean L2 distance from the row's latent to its ``k`` nearest
  reference latents: what lies far from every normal latent is new (a reference row
  leaves itself out).

The threshold is the ``quantile`` (default 0.99) of the reference's own scores, so about
1 % of normal images score above it by construction. Scores go into the store's
``anomaly`` array (float32, NaN = not scored) with the settings, the reference and the
threshold in its ``anomaly`` attribute; ``latentbatch query --where "anomaly > X"`` and
``--worst K --by anomaly`` read them.

Both stores are read a shard at a time (memory: a shard of each, plus one float per
reference row for its own scores); the neighbour search compares every row with every
reference row, so its cost is rows × reference rows × latent size.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentbatch.errors import LatentbatchError
from latentbatch.ids import short_id
from latentbatch.storage.fs import StorageOptions
from latentbatch.storage.lease import leased
from latentbatch.stores.store import LatentStore, open_store
from latentbatch.uses.distances import squared_distances

DEFAULT_K = 5
DEFAULT_QUANTILE = 0.99


class ScoreError(LatentbatchError):
    """A store cannot be scored against the reference given."""


@dataclass(frozen=True, kw_only=True)
class ScoreResult:
    """What :func:`score` wrote: rows scored, the threshold, and how many rows (of the
    store, and of the reference, by construction about ``1 - quantile``) lie above it."""

    store: str
    reference: str
    scored: int
    threshold: float
    above: int
    reference_above: float
    k: int
    quantile: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch score --json``)."""
        return dict(self.__dict__)


def _flat(store: LatentStore, start: int, stop: int) -> np.ndarray:
    latents = store.read_latents(start, stop)
    return latents.reshape(len(latents), -1).astype(np.float32)


def _knn_distance(
    queries: np.ndarray, first: int | None, reference: LatentStore, k: int
) -> np.ndarray:
    """Mean distance of each query to its ``k`` nearest reference latents, the reference
    streamed a shard at a time; ``first`` (queries that are reference rows from there)
    leaves each query's own row out."""
    best = np.full((len(queries), k), np.inf, np.float32)
    for start, stop in reference.each_shard():
        squared = squared_distances(queries, _flat(reference, start, stop))
        if first is not None:  # the query rows' own rows, where they fall in this block
            own = np.arange(first, first + len(queries))
            inside = (own >= start) & (own < stop)
            squared[np.flatnonzero(inside), own[inside] - start] = np.inf
        candidates = np.concatenate([best, np.maximum(squared, 0)], axis=1)
        best = np.partition(candidates, k - 1, axis=1)[:, :k]
    return np.asarray(np.sqrt(best).mean(axis=1), np.float32)


def _terms(
    store: LatentStore, reference: LatentStore, k: int, same: bool
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per store shard: its first row, each row's PSNR (NaN where unknown) and its
    neighbourhood distance."""
    for start, stop in store.each_shard():
        if store.has_quality:
            recon = store.read_quality(start, stop).astype(np.float32)
        else:
            recon = np.full(stop - start, np.nan, np.float32)
        distance = _knn_distance(_flat(store, start, stop), start if same else None, reference, k)
        yield start, recon, distance


def _standard(values: np.ndarray) -> dict[str, float] | None:
    known = values[~np.isnan(values)]
    if len(known) < 2:
        return None
    return {"mean": float(known.mean()), "std": float(known.std()) or 1.0}


def _combine(
    recon: np.ndarray, distance: np.ndarray, scales: dict[str, dict[str, float] | None]
) -> np.ndarray:
    parts = []
    if scales["reconstruction"] is not None:  # atypical either way: two-sided
        scale = scales["reconstruction"]
        parts.append(np.abs(recon - scale["mean"]) / scale["std"])
    if scales["distance"] is not None:
        scale = scales["distance"]
        parts.append((distance - scale["mean"]) / scale["std"])
    stacked = np.stack(parts)
    known = ~np.isnan(stacked)
    total = np.where(known, stacked, 0).sum(axis=0)
    counts = known.sum(axis=0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan).astype(np.float32)


def score(
    store_url: str,
    reference_url: str,
    *,
    k: int = DEFAULT_K,
    quantile: float = DEFAULT_QUANTILE,
    storage_options: StorageOptions | None = None,
) -> ScoreResult:
    """Score every committed row of ``store_url`` against ``reference_url`` (see the
    module docstring) and write the scores into its ``anomaly`` array."""
    if k < 1:
        raise ScoreError(f"-k {k} must be at least 1")
    if not 0 < quantile < 1:
        raise ScoreError(f"--quantile {quantile} must lie between 0 and 1, e.g. 0.99")
    reference = open_store(reference_url, storage_options)
    store = open_store(store_url, storage_options)
    if reference.model_id != store.model_id:
        raise ScoreError(
            f"{reference_url} holds latents of model {short_id(reference.model_id)} and "
            f"{store_url} of {short_id(store.model_id)}; score against a reference encoded by "
            "the same model"
        )
    if reference.count <= k:
        raise ScoreError(f"{reference_url} has {reference.count} rows; -k {k} needs more")
    if store.count == 0:
        raise ScoreError(f"{store_url} has no committed rows to score")
    same = reference.uuid == store.uuid
    # the reference's own terms (each row without itself) set the scales and the threshold
    own = list(_terms(reference, reference, k, True))
    recon = np.concatenate([r for _, r, _ in own])
    distance = np.concatenate([d for _, _, d in own])
    scales = {"reconstruction": _standard(recon), "distance": _standard(distance)}
    reference_scores = _combine(recon, distance, scales)
    threshold = float(np.nanquantile(reference_scores, quantile))
    with leased(store.url, f"scoring of {store_url}", storage_options):
        store = open_store(store_url, storage_options, writable=True)
        # until every shard is written the scores are marked unfinished: a scoring that
        # stops half-way (the disk full, say) is never read as done
        store.write_meta(anomaly={"pending": True, "reference": reference.url})
        above = 0
        terms = own if same else _terms(store, reference, k, False)
        for start, row_recon, row_distance in terms:
            scores = _combine(row_recon, row_distance, scales)
            store.write_anomaly(start, scores)
            above += int((scores > threshold).sum())
        store.write_meta(
            anomaly={
                "reference": {
                    "url": reference.url,
                    "uuid": reference.uuid,
                    "count": reference.count,
                },
                "k": k,
                "quantile": quantile,
                "threshold": threshold,
                "scales": scales,
                "scored": store.count,
                "scored_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
    return ScoreResult(
        store=store_url,
        reference=reference_url,
        scored=store.count,
        threshold=threshold,
        above=above,
        reference_above=float(np.mean(reference_scores > threshold)),
        k=k,
        quantile=quantile,
    )
