"""Anomaly scores: how unlike a reference store of normal images each row of a store is.

A row's score is a weighted mean of two terms, each standardised (z-score) by a seeded
sample of the reference's own rows, so that neither unit dominates:

- **reconstruction** (weight 1): how far the row's encode-time PSNR (the ``quality``
  array) lies from the reference's, in either direction (left out where a store records
  no PSNR): what the model reconstructs unusually badly is unlike what it learnt, and so
  is what it reconstructs unusually well (a flat image's PSNR is high whatever the model);
- **neighbourhood** (weight :data:`DISTANCE_WEIGHT`): the mean L2 distance from the
  row's latent to its ``k`` nearest reference latents: what lies far from every normal
  latent is new (a reference row leaves itself out).

``bench/uses.py`` measures the choice on four anomaly sets of validation digits the models
never trained on: unseen shapes, a 12x12 block anywhere, a 12x12 block over the digit and
the digits rotated 90 degrees. The distance catches what overlaps the digit; the PSNR
what is off to the side. A worst-patch reconstruction term, a per-label Gaussian density
and a per-dimension standardised distance were measured too and left out: none raised the
lowest AUROC (``docs/uses.md`` has the table).

It runs as a Dask job:

::

    client                                  workers
    ──────                                  ───────
    the reference's index exists?  ──no──►  build it (latentbatch.stores.neighbours),
                                              write it beside the reference
    calibrate                      ───────►  a seeded sample of at most 10,000 reference
                                              rows, searched leaving each row out: each
                                              term's mean and std, and the threshold
    a task per store shard         ───────►  load the index once per worker, search the
      (a bounded number in flight)            shard's rows, score them, write the shard's
                                              scores (one writer per shard)
    ◄──────────────────────────────────────  rows scored, rows above the threshold
    write the anomaly attribute last

The threshold is the ``quantile`` (default 0.99) of the sampled reference rows' own scores,
so about 1 % of normal images score above it by construction. The client holds counters
only, whatever the sizes; the reference is read once to build its index, and each worker
loads that index once. Scores go into the store's ``anomaly`` array (float32, NaN = not
scored) with the settings, the reference and the threshold in its ``anomaly`` attribute;
``latentbatch query --where "anomaly > X"`` and ``--worst K --by anomaly`` read them.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client

from latentbatch.engine.cluster import map_bounded, using
from latentbatch.engine.workers import worker_threads
from latentbatch.errors import LatentbatchError
from latentbatch.ids import short_id
from latentbatch.progress import Progress
from latentbatch.storage.fs import StorageOptions, WriteError
from latentbatch.storage.lease import leased
from latentbatch.stores.neighbours import (
    build_index,
    built_index,
    has_index,
    index_url,
    load_index,
    search,
)
from latentbatch.stores.store import LatentStore, open_store

DEFAULT_K = 5
DEFAULT_QUANTILE = 0.99
DISTANCE_WEIGHT = 2.0
"""The neighbourhood term's weight against the reconstruction term's 1."""
SAMPLE_ROWS = 10_000
"""Reference rows that set the terms' scales and the threshold (seeded sample)."""
logger = logging.getLogger(__name__)


class ScoreError(LatentbatchError):
    """A store cannot be scored against the reference given."""


@dataclass(frozen=True, kw_only=True)
class ScoreResult:
    """What :func:`score` wrote: rows scored, the threshold, and how many rows (of the
    store, and of the reference sample, by construction about ``1 - quantile``) lie above
    it."""

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


Scale = dict[str, float] | None


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Each term's mean and std over the reference sample (None: the term is left out),
    the threshold, and the share of the sample above it."""

    scales: dict[str, Scale]
    threshold: float
    reference_above: float


@dataclass(frozen=True, kw_only=True)
class ScorePart:
    """One task: score the rows ``[start, stop)`` of a store (a store shard) against the
    reference index at ``index``; ``same`` when the store is the reference (a row leaves
    itself out)."""

    store_url: str
    reference_url: str
    options: dict[str, Any]
    index: str  # "": the reference's folder took no index; each worker builds its own
    start: int
    stop: int
    k: int
    same: bool
    calibration: Calibration


def _index(reference_url: str, options: dict[str, Any], index: str) -> Any:
    """The reference's index in this worker: the file beside it, or built here."""
    if index:
        return load_index(index, options)
    return built_index(open_store(reference_url, options))


def _threads() -> None:
    """faiss's threads: this worker's share of the cores, not all of them."""
    import faiss

    threads = worker_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)


def _terms(
    store: LatentStore, rows: slice | np.ndarray, index: Any, k: int, same: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The rows' PSNR (NaN where unknown) and neighbourhood distance; ``same``: the
    rows are the index's own, each left out of its neighbours."""
    latents = store.read("latents", rows)
    own = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
    if store.has_quality:
        recon = store.read("quality", rows).astype(np.float32)
    else:
        recon = np.full(len(latents), np.nan, np.float32)
    squared, found = search(index, latents, k + 1 if same else k)
    if same:  # drop each row's own entry (or, where ties hid it, its farthest)
        mine = found == own[:, None]
        drop = np.where(mine.any(axis=1), mine.argmax(axis=1), k)
        keep = np.ones_like(mine)
        keep[np.arange(len(keep)), drop] = False
        squared = squared[keep].reshape(len(keep), k)
    return recon, np.sqrt(squared).mean(axis=1).astype(np.float32)


def _standard(values: np.ndarray) -> Scale:
    known = values[~np.isnan(values)]
    if len(known) < 2:
        return None
    return {"mean": float(known.mean()), "std": float(known.std()) or 1.0}


def _combine(recon: np.ndarray, distance: np.ndarray, scales: dict[str, Scale]) -> np.ndarray:
    parts, weights = [], []
    if (scale := scales["reconstruction"]) is not None:  # atypical either way: two-sided
        parts.append(np.abs(recon - scale["mean"]) / scale["std"])
        weights.append(1.0)
    if (scale := scales["distance"]) is not None:
        parts.append((distance - scale["mean"]) / scale["std"])
        weights.append(DISTANCE_WEIGHT)
    stacked = np.stack(parts)
    weight = np.asarray(weights)[:, None] * ~np.isnan(stacked)
    total = (np.nan_to_num(stacked) * weight).sum(axis=0)
    counted = weight.sum(axis=0)
    return np.where(counted > 0, total / np.maximum(counted, 1e-12), np.nan).astype(np.float32)


def calibrate(
    reference_url: str, options: dict[str, Any], index: str, k: int, quantile: float
) -> Calibration:
    """Worker side: the terms of a seeded sample of the reference's rows (each left out
    of its own neighbours) → their scales and the threshold."""
    _threads()
    reference = open_store(reference_url, options)
    rows = np.arange(reference.count)
    if reference.count > SAMPLE_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(reference.count, SAMPLE_ROWS, False))
    recon, distance = _terms(reference, rows, _index(reference_url, options, index), k, True)
    scales = {"reconstruction": _standard(recon), "distance": _standard(distance)}
    scores = _combine(recon, distance, scales)
    threshold = float(np.nanquantile(scores, quantile))
    return Calibration(
        scales=scales, threshold=threshold, reference_above=float(np.mean(scores > threshold))
    )


def score_part(part: ScorePart) -> dict[str, int]:
    """Worker side: score one store shard and write its scores (the shard's one writer)."""
    _threads()
    store = open_store(part.store_url, part.options, writable=True)
    index = _index(part.reference_url, part.options, part.index)  # once per worker
    recon, distance = _terms(store, slice(part.start, part.stop), index, part.k, part.same)
    scores = _combine(recon, distance, part.calibration.scales)
    store.write_anomaly(part.start, scores)
    return {"scored": len(scores), "above": int((scores > part.calibration.threshold).sum())}


def _indexed(reference_url: str, options: dict[str, Any]) -> str:
    """Worker side: the reference's index, built and written beside it when missing; ""
    when its folder cannot take it (each worker then builds its own, once)."""
    _threads()
    reference = open_store(reference_url, options)
    if has_index(reference):
        return index_url(reference)
    try:
        return build_index(reference)
    except (OSError, WriteError) as exc:
        logger.warning(
            "%s cannot keep a neighbours index (%s); each worker builds one", reference_url, exc
        )
        return ""


def score(
    store_url: str,
    reference_url: str,
    *,
    k: int = DEFAULT_K,
    quantile: float = DEFAULT_QUANTILE,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
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
    options = dict(storage_options or {})
    counts = {"scored": 0, "above": 0}

    def collect(found: dict[str, int], progress: Progress) -> None:
        lease.check()  # taken over while this scoring stalled: record nothing more
        for key in counts:
            counts[key] += found[key]
        if on_progress is not None:
            on_progress(progress)

    with (
        using(client, scheduler, workers) as c,
        leased(store.url, f"scoring of {store_url}", storage_options) as lease,
    ):
        index = c.submit(_indexed, reference_url, options, pure=False).result()
        calibration = c.submit(
            calibrate, reference_url, options, index, k, quantile, pure=False
        ).result()
        store = open_store(store_url, storage_options, writable=True)
        # until every shard is written the scores are marked unfinished: a scoring that
        # stops half-way (the disk full, say) is never read as done
        store.write_meta(anomaly={"pending": True, "reference": reference.url})
        store.create_anomaly()  # here, so that no two tasks create it
        parts = (
            ScorePart(
                store_url=store_url,
                reference_url=reference_url,
                options=options,
                index=index,
                start=a,
                stop=b,
                k=k,
                same=same,
                calibration=calibration,
            )
            for a, b in store.each_shard()
        )
        map_bounded(
            c,
            score_part,
            parts,
            items=lambda p: p.stop - p.start,
            on_result=collect,
            totals=(-(-store.count // store.shard_rows), store.count),
        )
        lease.check()
        store.write_meta(
            anomaly={
                "reference": {
                    "url": reference.url,
                    "uuid": reference.uuid,
                    "count": reference.count,
                },
                "k": k,
                "quantile": quantile,
                "threshold": calibration.threshold,
                "scales": calibration.scales,
                "distance_weight": DISTANCE_WEIGHT,
                "index": index or "built by each worker",
                "scored": store.count,
                "scored_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
    return ScoreResult(
        store=store_url,
        reference=reference_url,
        scored=counts["scored"],
        threshold=calibration.threshold,
        above=counts["above"],
        reference_above=calibration.reference_above,
        k=k,
        quantile=quantile,
    )
