"""Filling a latent store's rows with Dask tasks: the one writing loop of encode, import
and the derived stores (generate, interpolate, shift).

Each writer holds the store's lease and has recorded what it is writing (``pending``)
before it calls :func:`fill`. Then:

- each task writes whole store shards (:func:`shard_ranges`: the first may keep rows an
  earlier append committed) after its fence check, and returns ``{start, stop,
  labelled}``;
- the client advances ``count`` over the contiguous prefix of finished shards
  (:class:`latentbatch.stores.store.Commits`, after the lease's check), so a stopped
  writer leaves the store readable at its last ``count`` and a rerun resumes there;
- the store's canary is decoded on a worker and recorded once, when the store has none.

What is written, the pending record and the final metadata stay the writer's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from distributed import Client

from latentbatch.engine.canary_task import canary_on
from latentbatch.engine.cluster import map_bounded
from latentbatch.progress import Progress
from latentbatch.storage.lease import Lease
from latentbatch.stores.canary import canary_rows, has_canary, record_canary
from latentbatch.stores.store import Commits, LatentStore

J = TypeVar("J")


@dataclass(frozen=True, kw_only=True)
class ShardRanges:
    """The store shards that rows ``[first, stop)`` fall in, as ``(start, stop, keep)``:
    a task writes rows ``[start, stop)`` whole, the first ``keep`` of them already
    committed (an append into a shard an earlier source began). Counted and drawn
    lazily: the client holds none of them."""

    first: int
    stop: int
    shard_rows: int

    def _starts(self) -> range:
        return range(self.first - self.first % self.shard_rows, self.stop, self.shard_rows)

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for a in self._starts():
            yield a, min(a + self.shard_rows, self.stop), max(0, self.first - a)


def shard_ranges(store: LatentStore, first: int, stop: int) -> ShardRanges:
    """:class:`ShardRanges` of ``store`` for rows ``[first, stop)``."""
    return ShardRanges(first=first, stop=stop, shard_rows=store.shard_rows)


def fill(
    client: Client,
    store: LatentStore,
    lease: Lease,
    task: Callable[[J], dict[str, int]],
    jobs: Iterable[J],
    *,
    totals: tuple[int, int],
    items: Callable[[J], int],
    on_progress: Callable[[Progress], None] | None = None,
    resources: dict[str, float] | None = None,
    canary_of: str | None = None,
) -> None:
    """Run ``task`` over ``jobs`` (drawn as tasks are submitted; ``totals``: tasks, rows)
    and commit each finished shard's ``{start, stop, labelled}``; then, with
    ``canary_of`` (the id of the store's model, registered on the workers), decode and
    record the store's canary when it has none."""

    commits = Commits(store, lease.check)

    def commit(result: dict[str, Any], progress: Progress) -> None:
        commits.finish(result["start"], result["stop"], bool(result.get("labelled")))
        if on_progress is not None:
            on_progress(progress)

    map_bounded(
        client, task, jobs, items=items, resources=resources, on_result=commit, totals=totals
    )
    if canary_of is not None and store.count and not has_canary(store):
        decoded = canary_on(client, store, canary_of, canary_rows(store))
        if decoded.rows:  # rows whose latents hold NaN are left out
            record_canary(store, list(decoded.rows), decoded.pixels, decoded.device)
