"""The one writing loop of encode, import and the derived stores: shards in any order,
``count`` over the contiguous prefix, labels when a labelled shard commits, the canary
once, and nothing committed past a failed shard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.engine.filling import fill, shard_ranges
from latentbatch.engine.workers import register_model
from latentbatch.errors import TaskError
from latentbatch.models.checkpoint import read_once
from latentbatch.progress import Progress
from latentbatch.storage.lease import leased
from latentbatch.stores.canary import has_canary
from latentbatch.stores.store import LatentStore, Layout, create_store, open_store


@dataclass(frozen=True, kw_only=True)
class Rows:
    """A task writing rows ``[start, stop)`` of ``url``: each value its row number,
    labelled from ``labelled_from`` on; rows ``failing`` raise."""

    url: str
    start: int
    stop: int
    labelled_from: int
    failing: int = -1


def write(job: Rows) -> dict[str, int]:
    if job.start <= job.failing < job.stop:
        raise ValueError(f"row {job.failing} failed on purpose")
    store = open_store(job.url, writable=True)
    values = np.arange(job.start, job.stop, dtype=np.float32)
    latents = np.broadcast_to(values[:, None, None, None], (len(values), *store.latent_shape))
    labels = np.where(np.arange(job.start, job.stop) >= job.labelled_from, 1, -1)
    ids = [f"r{i}" for i in range(job.start, job.stop)]
    store.write_rows(job.start, latents.astype(store.latents.dtype), ids, labels.astype(np.int32))
    return {"start": job.start, "stop": job.stop, "labelled": int((labels >= 0).any())}


def _store(tmp_path: Path, model: Path, rows: int) -> LatentStore:
    info = read_once(model).info
    return create_store(str(tmp_path / "s.zarr"), model_id=info.model_id, config=info.config,
                        capacity=rows, layout=Layout(4, 2))  # fmt: skip


def test_shard_ranges_cover_whole_shards_keeping_what_an_append_committed() -> None:
    class Store:
        shard_rows = 4

    store: LatentStore = Store()  # type: ignore[assignment]
    assert list(shard_ranges(store, 0, 10)) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    assert list(shard_ranges(store, 6, 10)) == [(4, 8, 2), (8, 10, 0)]
    assert list(shard_ranges(store, 8, 8)) == [] and len(shard_ranges(store, 6, 10)) == 2


def test_fill_commits_every_shard_sets_labels_and_records_the_canary(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    store = _store(tmp_path, tiny_model, 10)
    seen: list[Progress] = []
    register_model(client, read_once(tiny_model), "decoder")
    with leased(store.url, "a test fill") as lease:
        jobs = (Rows(url=store.url, start=a, stop=b, labelled_from=9)
                for a, b, _ in shard_ranges(store, 0, 10))  # fmt: skip
        fill(client, store, lease, write, jobs, totals=(3, 10), items=lambda j: j.stop - j.start,
             on_progress=seen.append, canary_of=store.model_id)  # fmt: skip
    opened = open_store(store.url)
    assert opened.count == 10 and opened.meta["labels"] is True
    assert opened.read_ids(0, 10) == [f"r{i}" for i in range(10)]
    assert [p.done_tasks for p in seen] == [1, 2, 3] and seen[-1].done_items == 10
    assert has_canary(opened)


def test_a_failed_shard_stops_the_count_before_it(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    """Shards after a failed one may finish, but ``count`` never passes the failure, so
    a rerun writes from there; no canary is recorded without the model asked for."""
    store = _store(tmp_path, tiny_model, 12)
    jobs = (Rows(url=store.url, start=a, stop=b, labelled_from=0, failing=5)
            for a, b, _ in shard_ranges(store, 0, 12))  # fmt: skip
    with leased(store.url, "a test fill") as lease, pytest.raises(TaskError, match="row 5"):
        fill(client, store, lease, write, jobs, totals=(3, 12), items=lambda j: j.stop - j.start)
    opened = open_store(store.url)
    assert opened.count in (0, 4) and not has_canary(opened)  # shard 0 may not have finished
