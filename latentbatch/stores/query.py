"""Questions asked of a latent store without decoding it.

- :func:`iter_select` / :func:`select`: rows by ids, row ranges, label, and predicates
  over per-row fields (``row``, ``label``), all combined with AND; the answer is sorted
  row numbers, found a store shard at a time.
- :func:`to_xarray`: the selected latents as an ``xarray.DataArray`` with the store's
  dimension names and the ids as ``sample`` coordinate.
- :func:`statistics`: per-channel mean, std, min and max of the committed latents,
  computed out of core with Dask, a window of shards at a time (moments merged exactly);
  optionally saved in the store.
- :func:`nearest`: exact L2 or cosine neighbours of a query latent over the committed
  rows, streamed a window of shards at a time through Dask (each block keeps only its own
  top k, merged into the best k so far), so memory stays bounded whatever the store size.
- :func:`worst`: the rows reconstructed worst at encode time.
- :func:`answer`: which of those a query asks for (the command line and the query flow
  both ask it).
"""

from __future__ import annotations

import operator
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from latentbatch.errors import LatentbatchError
from latentbatch.storage.lease import leased
from latentbatch.stores.neighbours import has_index, index_url, load_index, search
from latentbatch.stores.store import LatentStore, Rows, open_store, read_checked

if TYPE_CHECKING:
    import xarray as xr

Metric = Literal["l2", "cosine"]
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
NEAREST_WINDOW = 32  # store shards scanned at once by nearest()
_PREDICATE = re.compile(r"^\s*(row|label|psnr|anomaly)\s*(==|!=|<=|>=|<|>)\s*(-?\d+(?:\.\d*)?)\s*$")


def _scheduler() -> Callable[..., Any] | None:
    """Dask's own choice of scheduler (the active distributed client's, when there is
    one), except where ``distributed`` was never imported: then no client can be active,
    and the threaded scheduler, which Dask would pick, is handed over as a function, the
    one form that keeps Dask from importing ``distributed`` (half a second) to look for a
    client."""
    if "distributed" in sys.modules:
        return None
    from dask.threaded import get

    return get


_REAL_FIELDS = ("psnr", "anomaly")
Ranking = Literal["psnr", "anomaly"]


class QueryError(LatentbatchError):
    """A query does not fit the store."""


def parse_rows(text: str) -> tuple[int, int]:
    """``"I:J"`` → ``(I, J)`` (either side may be empty: ``":100"``, ``"4000:"``)."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start else 0, int(stop) if stop else -1)
    except ValueError:
        raise QueryError(f"row range {text!r} is not I:J (for example 0:100)") from None


def parse_predicate(text: str) -> tuple[str, Callable[[Any, Any], Any], float]:
    """``"label >= 5"`` → (field, operator, value); fields are ``row``, ``label`` (integer
    values), ``psnr`` (each row's PSNR in dB at encode time) and ``anomaly`` (each row's
    anomaly score, ``latentbatch score``; any number)."""
    match = _PREDICATE.match(text)
    real = match is not None and match[1] in _REAL_FIELDS
    if match is None or (not real and "." in match[3]):
        raise QueryError(
            f"predicate {text!r} is not FIELD OP NUMBER with FIELD row, label (integers), "
            f"psnr or anomaly and OP one of {' '.join(_OPS)} (for example 'label >= 5' or "
            "'psnr < 20')"
        )
    value = float(match[3])
    return match[1], _OPS[match[2]], value if real else int(value)


def check_metric(metric: str) -> Metric:
    """``metric`` if it is one of the distances :func:`nearest` knows."""
    if metric == "l2":
        return "l2"
    if metric == "cosine":
        return "cosine"
    raise QueryError(f"unknown metric {metric!r}; use l2 or cosine")


def _in_ranges(
    numbers: np.ndarray, ranges: Sequence[tuple[int, int]] | None, count: int
) -> np.ndarray:
    if ranges is None:
        return np.ones(len(numbers), dtype=bool)
    inside = np.zeros(len(numbers), dtype=bool)
    for start, stop in ranges:
        inside |= (numbers >= start) & (numbers < (count if stop == -1 else stop))
    return inside


def iter_select(
    store: LatentStore,
    *,
    ids: Sequence[str] | None = None,
    rows: Sequence[tuple[int, int]] | None = None,
    label: int | None = None,
    where: Sequence[str] = (),
) -> Iterator[np.ndarray]:
    """The row numbers that match every given condition (all rows when none), ascending,
    one array per store shard with matches: ids and labels are read a shard at a time,
    so memory holds one shard whatever the store's size. Shards outside the row ranges
    are not read. With ``ids`` every id is looked for before anything is returned, and
    ids that are not in the store are named."""
    count = store.count
    predicates = [parse_predicate(p) for p in where]
    needs_labels = label is not None or any(f == "label" for f, _, _ in predicates)
    if needs_labels and not store.has_labels:
        raise QueryError(f"{store.url} has no labels; select by ids or rows instead")
    needs_quality = any(f == "psnr" for f, _, _ in predicates)
    if needs_quality and not store.has_quality:
        raise QueryError(
            f"{store.url} records no per-image PSNR (encoded by an earlier release); "
            "re-encode its images to query it"
        )
    needs_anomaly = any(f == "anomaly" for f, _, _ in predicates)
    if needs_anomaly:
        store.require_anomaly()
    wanted_ids = None if ids is None else set(ids)
    found_ids: set[str] = set()
    by_id: list[np.ndarray] = []
    for start, stop in store.each_shard(0, count):
        numbers = np.arange(start, stop)
        keep = _in_ranges(numbers, rows, count)
        if not keep.any():
            continue
        if wanted_ids is not None:
            shard_ids = store.read_ids(start, stop)
            hits = np.fromiter((i in wanted_ids for i in shard_ids), bool, len(shard_ids))
            found_ids.update(i for i, hit in zip(shard_ids, hits, strict=True) if hit)
            keep &= hits
            if not keep.any():
                continue
        fields = {
            "row": numbers,
            "label": store.read_labels(start, stop) if needs_labels else None,
            "psnr": store.read_quality(start, stop) if needs_quality else None,
            "anomaly": store.read_anomaly(start, stop) if needs_anomaly else None,
        }
        if label is not None:
            keep &= fields["label"] == label
        for field, op, value in predicates:
            keep &= op(fields[field], value)  # NaN (not measured) matches no comparison but !=
        if keep.any():
            if wanted_ids is None:
                yield numbers[keep]
            else:
                by_id.append(numbers[keep])
    if wanted_ids is not None:
        unknown = [i for i in dict.fromkeys(ids or ()) if i not in found_ids]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5])
            raise QueryError(f"{len(unknown)} ids are not in {store.url}: {shown}")
        yield from by_id


def select(
    store: LatentStore,
    *,
    ids: Sequence[str] | None = None,
    rows: Sequence[tuple[int, int]] | None = None,
    label: int | None = None,
    where: Sequence[str] = (),
) -> np.ndarray:
    """Sorted row numbers that match every given condition (all rows when none); see
    :func:`iter_select`, which yields them a shard at a time."""
    parts = list(iter_select(store, ids=ids, rows=rows, label=label, where=where))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def read_rows(store: LatentStore, rows: Rows) -> np.ndarray:
    """Latents of the given rows (any order), as float32."""
    return store.read("latents", rows).astype(np.float32)


def to_xarray(store: LatentStore, rows: np.ndarray) -> xr.DataArray:
    """Selected latents as an ``xarray.DataArray`` (dims sample, channel, y, x)."""
    import xarray as xr  # with pandas, half a second: only for this

    return xr.DataArray(
        read_rows(store, rows),
        dims=("sample", "channel", "y", "x"),
        coords={"sample": store.read("ids", rows).tolist(), "row": ("sample", rows)},
        name="latents",
        attrs={"store": store.url, "model_id": store.model_id},
    )


@dataclass(frozen=True, kw_only=True)
class Statistics:
    """Per-channel statistics of the committed latents."""

    count: int
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    overall_std: float
    psnr: dict[str, float | int] | None = None  # distribution of the rows' encode-time PSNR

    @property
    def scaling_factor(self) -> float:
        """Diffusion-style latent scaling: 1 / overall standard deviation."""
        return 1.0 / self.overall_std if self.overall_std > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "scaling_factor": self.scaling_factor}


def _moments(url: str, latents: Any, start: int, stop: int) -> np.ndarray:
    """Per channel of rows ``[start, stop)``: values, mean, sum of squared deviations,
    min and max (float64), as a ``(5, C)`` array."""
    where = f"rows [{start}, {stop})"
    block = read_checked(url, latents, where, slice(start, stop)).astype(np.float64)
    values = block.transpose(1, 0, 2, 3).reshape(block.shape[1], -1)
    mean = values.mean(axis=1)
    deviations = ((values - mean[:, None]) ** 2).sum(axis=1)
    count = np.full(len(mean), values.shape[1], np.float64)
    return np.stack([count, mean, deviations, values.min(axis=1), values.max(axis=1)])


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s pairwise merge of two :func:`_moments` (exact in float64)."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n
    deviations = a[2] + b[2] + delta**2 * a[0] * b[0] / n
    return np.stack([n, mean, deviations, np.minimum(a[3], b[3]), np.maximum(a[4], b[4])])


def statistics(store: LatentStore, save: bool = False) -> Statistics:
    """Per-channel mean, std, min, max (float64 accumulation), out of core: the store is
    read :data:`NEAREST_WINDOW` shards at a time (in parallel within a window), each
    shard's moments merged into the running ones, so memory and the task graph stay the
    same whatever the store's size."""
    from dask.base import compute  # only the scans that run on Dask import it
    from dask.delayed import delayed

    if store.count == 0:
        raise QueryError(f"{store.url} has no committed rows")
    total: np.ndarray | None = None
    window = NEAREST_WINDOW * store.shard_rows
    for first in range(0, store.count, window):
        parts = [
            delayed(_moments, pure=False)(store.url, store.latents, a, b)
            for a, b in store.each_shard(first, min(first + window, store.count))
        ]
        for part in compute(*parts, scheduler=_scheduler()):
            total = part if total is None else _merge(total, part)
    assert total is not None
    count, mean, deviations, low, high = total
    overall_mean = float((mean * count).sum() / count.sum())
    overall = deviations.sum() + (count * (mean - overall_mean) ** 2).sum()
    result = Statistics(
        psnr=psnr_distribution(store) if store.has_quality else None,
        count=store.count,
        mean=[float(v) for v in mean],
        std=[float(v) for v in np.sqrt(deviations / count)],
        min=[float(v) for v in low],
        max=[float(v) for v in high],
        overall_std=float(np.sqrt(overall / count.sum())),
    )
    if save:  # one writer of the store's metadata at a time: its lease, then fresh metadata
        with leased(store.url, f"saving statistics of {store.url}", store.storage_options):
            fresh = open_store(store.url, store.storage_options, writable=True)
            fresh.write_meta(stats=result.to_dict())
    return result


PSNR_BIN = 0.01  # dB: the resolution of psnr_distribution's percentiles
PSNR_PERCENTILES = (1, 5, 50, 95)


def psnr_distribution(store: LatentStore) -> dict[str, float | int]:
    """The committed rows' encode-time PSNR: how many were measured, mean, min, max (exact)
    and percentiles (to 0.01 dB), from a histogram filled a store shard at a time."""
    edges = np.arange(0.0, 100.0 + 2 * PSNR_BIN, PSNR_BIN)
    counts = np.zeros(len(edges) - 1, np.int64)
    total, low, high, measured = 0.0, np.inf, -np.inf, 0
    for start, stop in store.each_shard():
        values = store.read_quality(start, stop)
        values = values[~np.isnan(values)].astype(np.float64)
        if len(values):
            counts += np.histogram(np.clip(values, 0.0, 100.0), bins=edges)[0]
            total, measured = total + float(values.sum()), measured + len(values)
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if not measured:
        return {"measured": 0}
    cumulative = np.cumsum(counts)
    result: dict[str, float | int] = {"measured": measured, "mean": total / measured}
    result |= {"min": low, "max": high}
    for q in PSNR_PERCENTILES:
        index = int(np.searchsorted(cumulative, q / 100 * measured))
        result[f"p{q}"] = float(np.clip(edges[index] + PSNR_BIN / 2, low, high))
    return result


@dataclass(frozen=True, kw_only=True)
class Neighbour:
    row: int
    id: str
    distance: float


def _block_top_k(
    block: np.ndarray, query: np.ndarray, k: int, metric: Metric, offset: int
) -> np.ndarray:
    """``(k', 2)`` array of (distance, row) of the block's k nearest rows."""
    flat = block.reshape(len(block), -1).astype(np.float32)
    if metric == "l2":
        distances = np.sqrt(np.maximum(((flat - query) ** 2).sum(axis=1), 0.0))
    else:
        norms = np.linalg.norm(flat, axis=1) * np.linalg.norm(query)
        distances = 1.0 - (flat @ query) / np.where(norms > 0, norms, 1.0)
    take = min(k, len(distances))
    best = np.argpartition(distances, take - 1)[:take] if take < len(distances) else np.arange(take)
    return np.stack(
        [distances[best].astype(np.float64), (best + offset).astype(np.float64)], axis=1
    )


def _rows_top_k(
    url: str, latents: Any, start: int, stop: int, query: np.ndarray, k: int, metric: Metric
) -> np.ndarray:
    block = read_checked(url, latents, f"rows [{start}, {stop})", slice(start, stop))
    return _block_top_k(block, query, k, metric, start)


def nearest(
    store: LatentStore,
    query: np.ndarray,
    k: int = 10,
    metric: Metric = "l2",
    exclude: Sequence[int] = (),
) -> list[Neighbour]:
    """The ``k`` committed rows nearest to ``query`` (a latent), nearest first; ties by row.

    An L2 query of a store whose neighbours index exists (``latentbatch score`` builds
    it for its reference: :mod:`latentbatch.stores.neighbours`) is one search of it.
    Otherwise the store is scanned :data:`NEAREST_WINDOW` shards at a time (in parallel
    within a window), keeping only the best ``k`` so far: memory and the task graph stay
    the same whatever the store's size."""
    metric = check_metric(metric)
    if query.shape != store.latent_shape:
        raise QueryError(
            f"query latent has shape {query.shape}, the store holds {store.latent_shape}"
        )
    available = store.count - len(set(exclude))
    if not 1 <= k <= available:
        raise QueryError(
            f"-k must be between 1 and {available} (the rows of {store.url} one can return)"
        )
    flat_query = query.reshape(-1).astype(np.float32)
    want = k + len(exclude)
    excluded = set(exclude)
    if metric == "l2" and has_index(store):  # the index `score` built: one search
        squared, rows = search(load_index(index_url(store), store.storage_options),
                               flat_query[None], want)  # fmt: skip
        chosen = [(float(np.sqrt(d)), int(r)) for d, r in zip(squared[0], rows[0], strict=True)
                  if r >= 0 and int(r) not in excluded][:k]  # fmt: skip
    else:
        chosen = _scanned(store, flat_query, want, metric, excluded)[:k]
    ids = store.read("ids", [r for _, r in chosen]).tolist()
    return [Neighbour(row=r, id=i, distance=d) for (d, r), i in zip(chosen, ids, strict=True)]


def _scanned(
    store: LatentStore, flat_query: np.ndarray, want: int, metric: Metric, excluded: set[int]
) -> list[tuple[float, int]]:
    """(distance, row) of the ``want`` nearest rows but ``excluded``, nearest first, by a
    scan of :data:`NEAREST_WINDOW` shards at a time."""
    from dask.base import compute
    from dask.delayed import delayed

    best = np.zeros((0, 2))
    window = NEAREST_WINDOW * store.shard_rows
    for first in range(0, store.count, window):
        parts = [
            delayed(_rows_top_k, pure=False)(
                store.url, store.latents, a, b, flat_query, want, metric
            )
            for a, b in store.each_shard(first, min(first + window, store.count))
        ]
        candidates = np.concatenate([best, *compute(*parts, scheduler=_scheduler())])
        best = candidates[np.lexsort((candidates[:, 1], candidates[:, 0]))][:want]
    return [(float(d), int(r)) for d, r in best if int(r) not in excluded]


def worst(store: LatentStore, k: int = 10, by: Ranking = "psnr") -> np.ndarray:
    """The ``k`` worst committed rows, scanned a store shard at a time keeping only the
    worst ``k`` so far: by ``psnr``, those reconstructed worst at encode time (lowest PSNR
    first); by ``anomaly``, the most anomalous (highest score first). Ties by row; rows
    never measured are left out."""
    if k < 1:
        raise QueryError(f"--worst must be at least 1, got {k}")
    if by not in ("psnr", "anomaly"):
        raise QueryError(f"--by {by!r} is not psnr or anomaly")
    if by == "psnr" and not store.has_quality:
        raise QueryError(
            f"{store.url} records no per-image PSNR (encoded by an earlier release); "
            "re-encode its images to find the worst reconstructed"
        )
    if by == "anomaly":
        store.require_anomaly()
    read = store.read_quality if by == "psnr" else store.read_anomaly
    sign = 1.0 if by == "psnr" else -1.0  # lowest PSNR first, highest anomaly first
    best = np.zeros((0, 2))
    for start, stop in store.each_shard():
        values = sign * read(start, stop).astype(np.float64)
        measured = np.flatnonzero(~np.isnan(values))
        candidates = np.concatenate(
            [best, np.stack([values[measured], (measured + start).astype(np.float64)], axis=1)]
        )
        best = candidates[np.lexsort((candidates[:, 1], candidates[:, 0]))][:k]
    return best[:, 1].astype(np.int64)


def latent_of(store: LatentStore, sample_id: str) -> tuple[np.ndarray, int]:
    """The latent (float32) of the row holding ``sample_id``, and that row: the query of a
    nearest-neighbour search by id, which leaves the row itself out."""
    row = int(select(store, ids=[sample_id])[0])
    return read_rows(store, [row])[0], row


def result_rows(
    store: LatentStore, rows: Rows, neighbours: Sequence[Neighbour] | None = None
) -> list[dict[str, Any]]:
    """One dict per row of a query's answer: ``row``, ``id``, ``label`` (when the store
    has labels), ``psnr`` (when it records them; None where not measured), ``anomaly``
    (when it was scored; None where not) and
    ``distance`` (for neighbours), in the given order."""
    rows = [int(r) for r in rows]
    ids = store.read("ids", rows).tolist()
    labels = store.read("labels", rows).tolist() if store.has_labels else None
    quality = store.read("quality", rows).tolist() if store.has_quality else None
    anomaly = store.read("anomaly", rows).tolist() if store.has_anomaly else None
    results: list[dict[str, Any]] = []
    for i, (row, sample_id) in enumerate(zip(rows, ids, strict=True)):
        entry: dict[str, Any] = {"row": row, "id": sample_id}
        if labels is not None:
            entry["label"] = int(labels[i])
        if quality is not None:
            entry["psnr"] = None if np.isnan(quality[i]) else round(float(quality[i]), 3)
        if anomaly is not None:
            entry["anomaly"] = None if np.isnan(anomaly[i]) else round(float(anomaly[i]), 4)
        if neighbours is not None:
            entry["distance"] = neighbours[i].distance
        results.append(entry)
    return results


@dataclass(frozen=True, kw_only=True)
class Answer:
    """What a query found: its rows as chunks of row numbers (a selection's streamed a
    store shard at a time), and for a nearest-neighbour query the query latent and the
    neighbours, in the order of the rows."""

    chunks: Iterable[np.ndarray]
    query_latent: np.ndarray | None = None
    neighbours: list[Neighbour] | None = None


def answer(
    store: LatentStore,
    *,
    ids: Sequence[str] | None = None,
    rows: Sequence[tuple[int, int]] | None = None,
    label: int | None = None,
    where: Sequence[str] = (),
    near: str | None = None,
    near_latent: np.ndarray | None = None,
    worst_k: int | None = None,
    by: Ranking = "psnr",
    k: int = 10,
    metric: str = "l2",
) -> Answer:
    """The one place that decides what a query is: the ``k`` nearest neighbours of the
    row holding id ``near`` (itself left out) or of ``near_latent``, else the ``worst_k``
    rows reconstructed worst, else the selection by ``ids``, ``rows``, ``label`` and
    ``where`` (:func:`iter_select`). A ranking ranks the whole store, so combining it with
    a selection is refused rather than silently ignoring the selection."""
    ranking = [
        name
        for name, given in (
            ("--near", near is not None),
            ("--near-image", near_latent is not None),
            ("--worst", worst_k is not None),
        )
        if given
    ]
    if len(ranking) > 1:
        raise QueryError(f"{' and '.join(ranking)} are two questions; ask one at a time")
    selection = [
        name
        for name, given in (
            ("--ids", bool(ids)),
            ("--rows", bool(rows)),
            ("--label", label is not None),
            ("--where", bool(where)),
        )
        if given
    ]
    if ranking and selection:
        raise QueryError(
            f"{ranking[0]} ranks every row of the store and cannot be combined with "
            f"{', '.join(selection)}; drop the selection, or select first and rank the "
            "selected rows yourself"
        )
    exclude: list[int] = []
    if near is not None:
        near_latent, row = latent_of(store, near)
        exclude = [row]
    if near_latent is not None:
        found = nearest(store, near_latent, k, check_metric(metric), exclude)
        chunk = np.array([n.row for n in found], dtype=np.int64)
        return Answer(chunks=[chunk], query_latent=near_latent, neighbours=found)
    if worst_k is not None:
        return Answer(chunks=[worst(store, worst_k, by)])
    return Answer(chunks=iter_select(store, ids=ids, rows=rows, label=label, where=where))
