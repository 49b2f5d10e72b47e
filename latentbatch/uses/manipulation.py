"""Manipulate: change latents at the feature level, into a derived store
(:mod:`latentbatch.uses.derive`).

- :func:`interpolate`: ``steps`` latents from one row to another, ids
  ``interp-ID1-ID2-05``; ``linear`` (the default) follows the straight line, ``slerp`` the
  great circle between the two latents, its norm changing linearly. Both end exactly at
  the two rows' latents. Measured (``bench/uses.py``, 20 pairs of mnist5k validation
  digits), the midpoints of the straight line lie nearer real digits' latents: their
  distance to the 10 nearest training latents is 1.13 times the training latents' own
  (1.16 along the great circle) for the seed model, 1.05 (1.15) for the codec model.
- :func:`shift`: chosen rows of label ``A`` moved towards label ``B``, ids
  ``shift-LA-LB-ID``, labelled ``B``, by one of three maps, each from a reference store
  (the shifted store itself by default) streamed a shard at a time:

  - ``mean``: ``strength`` times the difference of the two labels' latent means;
  - ``gaussian``: each row's place in ``A``'s Gaussian mapped onto ``B``'s (whitened by
    one covariance, coloured by the other: :mod:`latentbatch.uses.fit`), the means'
    difference outside their principal directions;
  - ``matching`` (the default): the optimal transport between the two labels' latents
    (up to :data:`MATCH_ROWS` of each, seeded) pairs each row of ``A`` with one of ``B``
    (scipy's ``linear_sum_assignment``, least total squared distance); a row moves by
    ``strength`` times the mean move of its :data:`MATCH_NEIGHBOURS` nearest paired rows
    (the transport's barycentric map). The pairs are kept in the derived store
    (``shift_anchors``, ``shift_moves``), where every task reads them.

  Measured by ``bench/uses.py`` on mnist5k's validation digits over eight label pairs,
  re-encoded, the share whose 10 nearest training digits' majority label is ``B``: by
  ``matching`` 0.91 (seed model; 0.94 codec), every pair 0.72 or more; by ``gaussian`` 0.87
  (0.88), 3→8 at 0.62; by ``mean`` 0.54 (0.40).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from distributed import Client

from latentbatch.errors import LatentbatchError
from latentbatch.ids import short_id
from latentbatch.models.checkpoint import ModelLocation
from latentbatch.progress import Progress
from latentbatch.storage.fs import StorageOptions
from latentbatch.stores.query import iter_select, latent_of
from latentbatch.stores.store import LatentStore, open_store
from latentbatch.uses.derive import (
    DeriveResult,
    Lineage,
    Parent,
    derive,
    is_kept,
    keep,
    kept,
    like,
)
from latentbatch.uses.distances import squared_distances
from latentbatch.uses.fit import FIT, fit_latents, keep_fit, kept_fit

Interpolation = Literal["slerp", "linear"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("linear", "slerp")
ShiftMethod = Literal["matching", "gaussian", "mean"]
SHIFT_METHODS: tuple[ShiftMethod, ...] = ("matching", "gaussian", "mean")
MATCH_ROWS = 2000
"""The most rows of each label a matching pairs (a seeded sample of larger labels)."""
MATCH_NEIGHBOURS = 5
"""A row moves by the mean move of this many nearest matched rows of its label."""
ANCHORS, MOVES = "shift_anchors", "shift_moves"  # the matching, kept in the derived store
MATCHING = "matching"  # its record in the store's metadata, once both arrays are whole
MAX_STEPS = 10_000


class ManipulateError(LatentbatchError):
    """A manipulation asked for something it cannot do."""


def along(start: np.ndarray, end: np.ndarray, t: np.ndarray, method: Interpolation) -> np.ndarray:
    """Latents at fractions ``t`` (``(n,)`` in [0, 1]) of the way from ``start`` to
    ``end`` (float, any shape), exactly ``start`` at 0 and ``end`` at 1."""
    a, b = start.ravel().astype(np.float64), end.ravel().astype(np.float64)
    t = np.asarray(t, np.float64)[:, None]
    norms = np.linalg.norm(a), np.linalg.norm(b)
    angle = 0.0
    if method == "slerp" and min(norms) > 0:
        cosine = float(np.clip(a @ b / (norms[0] * norms[1]), -1, 1))
        angle = float(np.arccos(cosine))
    if angle < 1e-6 or angle > np.pi - 1e-6:  # (anti)parallel or linear: the straight line
        values = (1 - t) * a + t * b
    else:
        unit_a, unit_b = a / norms[0], b / norms[1]
        direction = (np.sin((1 - t) * angle) * unit_a + np.sin(t * angle) * unit_b) / np.sin(angle)
        values = direction * ((1 - t) * norms[0] + t * norms[1])
    values[t[:, 0] == 0] = a
    values[t[:, 0] == 1] = b
    return values.reshape(len(t), *start.shape)


@dataclass(frozen=True, kw_only=True)
class InterpolatePart:
    """Rows ``[start, stop)`` of an interpolation of ``steps`` latents."""

    first: np.ndarray
    last: np.ndarray
    ids: tuple[str, str]
    steps: int
    method: Interpolation
    start: int
    stop: int

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        rows = np.arange(self.start, self.stop)
        latents = along(self.first, self.last, rows / (self.steps - 1), self.method)
        width = max(2, len(str(self.steps - 1)))
        ids = [f"interp-{self.ids[0]}-{self.ids[1]}-{row:0{width}d}" for row in rows]
        return latents, ids, np.full(len(rows), -1, np.int32)


def interpolate(
    store_url: str,
    from_id: str,
    to_id: str,
    out_url: str,
    *,
    steps: int = 9,
    method: Interpolation = "linear",
    model: ModelLocation | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> DeriveResult:
    """``steps`` latents from row ``from_id`` to row ``to_id`` of ``store_url`` into the
    derived store ``out_url``."""
    if not 2 <= steps <= MAX_STEPS:
        raise ManipulateError(f"--steps {steps} must lie between 2 and {MAX_STEPS:,}")
    if method not in INTERPOLATIONS:
        raise ManipulateError(f"--method {method!r} is not one of {', '.join(INTERPOLATIONS)}")
    store = open_store(store_url, storage_options)
    first, _ = latent_of(store, from_id)
    last, _ = latent_of(store, to_id)
    lineage = Lineage(
        operation="interpolate",
        parameters={"from": from_id, "to": to_id, "steps": steps, "method": method},
        seed=None,
        parents=(Parent.of(store),),
    )
    return derive(
        out_url,
        create=lambda meta: like(store, out_url, steps, storage_options, meta),
        model_id=store.model_id,
        lineage=lineage,
        rows=steps,
        part=lambda a, b: InterpolatePart(
            first=first,
            last=last,
            ids=(from_id, to_id),
            steps=steps,
            method=method,
            start=a,
            stop=b,
        ),
        model=model,
        storage_options=storage_options,
        client=client,
        scheduler=scheduler,
        workers=workers,
    )


@dataclass(frozen=True, kw_only=True)
class Matching:
    """Rows of label A (``anchors``, flat) paired one to one with rows of label B by the
    assignment of least total squared distance, and each pair's move (B's row minus A's):
    the optimal transport between the two labels' latents, on a sample of each."""

    anchors: np.ndarray
    moves: np.ndarray

    def apply(self, flat: np.ndarray, strength: float) -> np.ndarray:
        """Each row moved by ``strength`` times the mean move of its
        :data:`MATCH_NEIGHBOURS` nearest anchors (the transport's barycentric map)."""
        k = min(MATCH_NEIGHBOURS, len(self.anchors))
        squared = squared_distances(flat, self.anchors)
        nearest = np.argsort(squared, axis=1, kind="stable")[:, :k]
        return np.asarray(flat + strength * self.moves[nearest].mean(axis=1))


def _label_sample(store: LatentStore, label: int, seed: int) -> np.ndarray:
    """Up to :data:`MATCH_ROWS` rows of ``label`` (seeded), flat float64, streamed."""
    rows = np.concatenate(list(iter_select(store, label=label)) or [np.zeros(0, np.int64)])
    if len(rows) > MATCH_ROWS:
        rows = np.sort(np.random.default_rng([seed, label]).choice(rows, MATCH_ROWS, False))
    latents = store.read("latents", rows)
    return latents.reshape(len(latents), -1).astype(np.float64)


def match(store: LatentStore, source: int, target: int, seed: int = 0) -> Matching:
    """Pair rows of ``source`` with rows of ``target`` (see :class:`Matching`)."""
    from scipy.optimize import linear_sum_assignment

    first, second = _label_sample(store, source, seed), _label_sample(store, target, seed)
    rows, columns = linear_sum_assignment(squared_distances(first, second))
    return Matching(anchors=first[rows], moves=second[columns] - first[rows])


def _keep(store: LatentStore, matching: Matching) -> None:
    """Write the matching into the derived store, where its tasks read it."""
    keep(
        store,
        MATCHING,
        {"pairs": len(matching.anchors), "neighbours": MATCH_NEIGHBOURS},
        {ANCHORS: matching.anchors.astype(np.float32), MOVES: matching.moves.astype(np.float32)},
        "the matched pairs",
        {ANCHORS: ("pair", "value"), MOVES: ("pair", "value")},
    )


def _kept(url: str, uuid: str, options: StorageOptions | None) -> Matching:
    """The matching the derived store ``url`` keeps, read once per process."""
    _, arrays = kept(url, uuid, options, MATCHING, (ANCHORS, MOVES))
    return Matching(
        anchors=np.asarray(arrays[ANCHORS], np.float64),
        moves=np.asarray(arrays[MOVES], np.float64),
    )


@dataclass(frozen=True, kw_only=True)
class ShiftPart:
    """Parent rows ``rows`` of ``store_url`` shifted, as rows of the derived store
    ``out_url`` (which keeps the fit and a matching's pairs)."""

    store_url: str
    out_url: str
    out_uuid: str
    storage_options: dict[str, Any]
    rows: tuple[int, ...]
    source: int
    target: int
    strength: float
    method: ShiftMethod

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        store = open_store(self.store_url, self.storage_options)
        latents = store.read("latents", list(self.rows))
        flat = latents.reshape(len(latents), -1).astype(np.float64)
        fit = kept_fit(self.out_url, self.out_uuid, self.storage_options)
        if self.method == "matching":
            matching = _kept(self.out_url, self.out_uuid, self.storage_options)
            shifted = fit.clip(matching.apply(flat, self.strength))
        else:
            move = fit.transport if self.method == "gaussian" else fit.mean_shift
            shifted = move(flat, self.source, self.target, self.strength)
        ids = [
            f"shift-L{self.source}-L{self.target}-{i}"
            for i in store.read("ids", self.rows).tolist()
        ]
        return shifted, ids, np.full(len(ids), self.target, np.int32)


def _regrouped(chunks: Iterator[np.ndarray], first: int) -> Callable[[int, int], np.ndarray]:
    """Selected rows ``[a, b)`` (by position in the selection), asked for in ascending
    order from ``first``, read from the selection's chunks as they are needed."""
    buffer = np.zeros(0, np.int64)
    position = 0  # the selection position of buffer[0]

    def rows(a: int, b: int) -> np.ndarray:
        nonlocal buffer, position
        while position + len(buffer) < b:
            buffer = np.concatenate([buffer, next(chunks)])
        chosen = buffer[a - position : b - position]
        buffer, position = buffer[b - position :], b
        return chosen

    rows(0, first)  # rows committed by an interrupted run
    return rows


def shift(
    store_url: str,
    out_url: str,
    *,
    from_label: int,
    to_label: int,
    strength: float = 1.0,
    method: ShiftMethod = "matching",
    seed: int = 0,
    reference_url: str | None = None,
    ids: Sequence[str] | None = None,
    rows: Sequence[tuple[int, int]] | None = None,
    label: int | None = None,
    where: Sequence[str] = (),
    model: ModelLocation | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DeriveResult:
    """The chosen rows of ``store_url`` (as ``latentbatch query`` chooses them; every row
    of label ``from_label`` when nothing is chosen) shifted from ``from_label`` towards
    ``to_label`` into the derived store ``out_url``; ``seed`` chooses the rows a
    matching pairs when a label has more than :data:`MATCH_ROWS`."""
    if method not in SHIFT_METHODS:
        raise ManipulateError(f"--method {method!r} is not one of {', '.join(SHIFT_METHODS)}")
    if from_label == to_label:
        raise ManipulateError(
            f"--from-label and --to-label are both {from_label}; shift between two"
        )
    if not -4 <= strength <= 4:
        raise ManipulateError(
            f"--strength {strength} must lie between -4 and 4; 1 is the whole way"
        )
    store = open_store(store_url, storage_options)
    reference = open_store(reference_url or store_url, storage_options)
    if reference.model_id != store.model_id:
        raise ManipulateError(
            f"{reference.url} holds latents of model {short_id(reference.model_id)} and "
            f"{store_url} of {short_id(store.model_id)}; take the labels' means from a store of "
            "the same model"
        )
    if not reference.has_labels:
        raise ManipulateError(
            f"{reference.url} has no labels, so no label has a mean; pass --reference, a "
            "store of the same model with labels"
        )
    fit = fit_latents(reference)
    for wanted in (from_label, to_label):
        fit.index(wanted)
    if ids is None and rows is None and label is None and not where:
        label = from_label

    def selection() -> Iterator[np.ndarray]:
        return iter_select(store, ids=ids, rows=rows, label=label, where=where)

    total = sum(len(part) for part in selection())
    if total == 0:
        raise ManipulateError(f"no rows of {store_url} match the selection; nothing to shift")
    parents = (Parent.of(store),) + (
        () if reference.uuid == store.uuid else (Parent.of(reference),)
    )
    lineage = Lineage(
        operation="shift",
        parameters={
            "from_label": from_label,
            "to_label": to_label,
            "strength": strength,
            "method": method,
            "reference": reference.url,
            "selection": {
                "ids": None if ids is None else list(ids),
                "rows": None if rows is None else [list(r) for r in rows],
                "label": label,
                "where": list(where),
            },
        },
        seed=seed if method == "matching" else None,  # only a matching samples
        parents=parents,
    )
    positions: Callable[[int, int], np.ndarray] | None = None
    made: list[LatentStore] = []

    def setup(out: LatentStore) -> None:
        made.append(out)
        if not is_kept(out, FIT):
            keep_fit(out, fit)
        if method == "matching" and not is_kept(out, MATCHING):
            _keep(out, match(reference, from_label, to_label, seed))  # the labels' pairs

    def part(a: int, b: int) -> ShiftPart:
        nonlocal positions
        if positions is None:  # the selection is read again, from the first row to write
            positions = _regrouped(selection(), a)
        return ShiftPart(
            store_url=store_url,
            out_url=out_url,
            out_uuid=made[0].uuid,
            storage_options=dict(storage_options or {}),
            rows=tuple(int(r) for r in positions(a, b)),
            source=from_label,
            target=to_label,
            strength=strength,
            method=method,
        )

    return derive(
        out_url,
        create=lambda meta: like(store, out_url, total, storage_options, meta),
        model_id=store.model_id,
        lineage=lineage,
        rows=total,
        part=part,
        setup=setup,
        model=model,
        storage_options=storage_options,
        client=client,
        scheduler=scheduler,
        workers=workers,
        on_progress=on_progress,
    )
