"""Derived stores: latent stores that an operation (generate, interpolate, shift) wrote
from other stores, with their lineage.

A derived store is an ordinary latent store of the parent's model, format and layout,
with one more metadata record, ``lineage``: the operation, its parameters, its seed and
the parents (url, uuid, committed rows), and when it was made. Its rows are written by
encode's loop (:mod:`latentbatch.engine.filling`): one Dask task per store shard
(:class:`DeriveJob`), each computing its rows from the operation's :class:`Part` alone
(a seeded generator per shard, or the parent rows it maps), so a store is
byte-identical across runs and worker counts; the client advances ``count`` over the
finished prefix, and the same command run again after an interruption resumes there. A
store that exists with other lineage is refused; one that exists finished with the same
lineage is left as it is.

What every task of an operation reads (a generate's or a shift's fitted Gaussians, a
shift's matched pairs) is written into the derived store once, before any task runs
(:func:`keep`), and read there by each worker process once (:func:`kept`): a task carries
the store's address and its rows, never the arrays.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from distributed import Client

from latentbatch.engine.cluster import using
from latentbatch.engine.filling import fill, shard_ranges
from latentbatch.engine.workers import register_model
from latentbatch.ids import short_id, validate_ids
from latentbatch.models.checkpoint import ModelBytes, ModelLocation, read_once
from latentbatch.progress import Progress
from latentbatch.storage.fs import StorageOptions, named_write
from latentbatch.storage.lease import Fence, holds_data, leased
from latentbatch.stores.canary import has_canary
from latentbatch.stores.store import (
    LatentStore,
    Layout,
    StoreError,
    create_store,
    open_store,
    read_checked,
)

LINEAGE = "lineage"


class Part(Protocol):
    """What one task computes: its rows' latents (float, any shape ``(n, C, h, w)``),
    ids and labels."""

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]: ...


@dataclass(frozen=True, kw_only=True)
class Parent:
    """A store an operation read: its url, its uuid and its committed rows then."""

    url: str
    uuid: str
    count: int

    @classmethod
    def of(cls, store: LatentStore) -> Parent:
        return cls(url=store.url, uuid=store.uuid, count=store.count)


@dataclass(frozen=True, kw_only=True)
class Lineage:
    """How a derived store was made (its ``lineage`` metadata, less ``created``)."""

    operation: str
    parameters: dict[str, Any]
    seed: int | None
    parents: tuple[Parent, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "parameters": dict(self.parameters),
            "seed": self.seed,
            "parents": [dataclasses.asdict(p) for p in self.parents],
        }


def lineage_of(store: LatentStore) -> dict[str, Any] | None:
    """A store's lineage record, or None for a store of encoded images."""
    found = store.meta.get(LINEAGE)
    return dict(found) if isinstance(found, dict) else None


@dataclass(frozen=True, kw_only=True)
class DeriveJob:
    """One task: rows ``[start, stop)`` of the derived store, computed by ``part``."""

    store_url: str
    storage_options: dict[str, Any]
    start: int
    stop: int
    part: Part
    fence: Fence | None = None  # the store's lease: checked before the rows are written


@dataclass(frozen=True, kw_only=True)
class DeriveResult:
    """What :func:`derive` did: rows written now (0 when the store was already whole)."""

    store: str
    operation: str
    rows: int
    written: int
    shards: int
    seconds: float
    resumed: bool = False
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``--json``)."""
        return dataclasses.asdict(self)


def as_stored(latents: np.ndarray, store: LatentStore) -> np.ndarray:
    """Float latents in the store's dtype: integers (a codec model's) rounded and clamped
    to the quantisation's range."""
    quantization = store.quantization
    if quantization is None:
        return latents.astype(store.latents.dtype)
    low, high = quantization["range"]
    return np.clip(np.round(latents), low, high).astype(store.latents.dtype)


def keep(
    store: LatentStore,
    record: str,
    value: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    what: str,
    dimensions: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """Write what the tasks of a derived store read into it: each of ``arrays`` (by its
    array name, in its dtype), then the metadata ``record`` (``value``) saying they are
    whole. A write stopped half-way (the disk full, say) names ``what`` in a sentence and
    leaves no record, so the next run writes them again."""
    for name, values in arrays.items():
        with named_write(store.url, f"{what} ({name}) of {store.url}"):
            store.group.create_array(
                name,
                shape=values.shape,
                dtype=values.dtype,
                chunks=(min(256, len(values)), *values.shape[1:]),
                dimension_names=(dimensions or {}).get(name),
                overwrite=True,
            )[...] = values
    store.write_meta(**{record: value})


def is_kept(store: LatentStore, record: str) -> bool:
    """Whether ``store`` holds a whole :func:`keep` of ``record``."""
    return isinstance(store.meta.get(record), dict)


@functools.lru_cache(maxsize=8)
def _kept(
    url: str, uuid: str, options: str, record: str, names: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    store = open_store(url, json.loads(options))
    if store.uuid != uuid or not is_kept(store, record):
        raise StoreError(
            f"{url} keeps no whole {record} of its {store.meta.get(LINEAGE, {}).get('operation')}"
            "; run it again"
        )
    arrays = {
        name: read_checked(url, store.group[name], "all rows", slice(None))  # type: ignore[arg-type]
        for name in names
    }
    return dict(store.meta[record]), arrays


def kept(
    url: str,
    uuid: str,
    options: StorageOptions | None,
    record: str,
    names: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What :func:`keep` wrote into the derived store ``url`` (of ``uuid``): the record and
    the arrays ``names``, read once per worker process."""
    return _kept(url, uuid, json.dumps(dict(options or {}), sort_keys=True), record, names)


def write_part(job: DeriveJob) -> dict[str, int]:
    """Worker side: compute one shard's rows and write them whole."""
    store = open_store(job.store_url, job.storage_options, writable=True)
    latents, ids, labels = job.part.make()
    if len(latents) != job.stop - job.start:
        raise StoreError(
            f"a part of {job.store_url} made {len(latents)} rows for rows "
            f"[{job.start}, {job.stop}); this is a bug in the operation"
        )
    validate_ids(ids)
    labels = np.asarray(labels, np.int32)
    if job.fence is not None:  # a stalled writer's late rows are not written
        job.fence.check()
    store.write_rows(job.start, as_stored(latents, store), ids, labels)
    return {"start": job.start, "stop": job.stop, "labelled": int((labels >= 0).any())}


def like(
    parent: LatentStore,
    url: str,
    rows: int,
    options: StorageOptions | None,
    meta: dict[str, Any],
) -> LatentStore:
    """A new store at ``url`` of ``rows`` rows like ``parent`` (its model, latent dtype,
    layout and image size), with the metadata ``meta`` (its lineage)."""
    dtype = str(parent.latents.dtype)
    layout = Layout(
        shard_rows=parent.shard_rows,
        chunk_rows=parent.chunk_rows,
        latent_dtype=dtype if parent.quantization is None else None,
    )
    return create_store(
        url,
        model_id=parent.model_id,
        config=parent.model_config,
        capacity=rows,
        layout=layout,
        quantization=parent.quantization,
        storage_options=options,
        image=parent.image_size,
        meta=meta,
    )


def _prepare(
    url: str,
    create: Callable[[dict[str, Any]], LatentStore],
    lineage: Lineage,
    rows: int,
    options: StorageOptions | None,
) -> tuple[LatentStore, bool] | None:
    """Create the derived store, or open the one an interrupted run left (True); None
    when the store is already whole."""
    record = lineage.to_dict()
    if holds_data(url, options):
        store = open_store(url, options, writable=True)
        found = lineage_of(store)
        same = found is not None and {k: v for k, v in found.items() if k != "created"} == record
        if same and store.pending is None and store.count == rows:
            return None
        if same and store.pending is not None:
            return store, True
        made = f"by {found['operation']}" if found else "by an encode"
        raise StoreError(
            f"{url} already exists (made {made}, with other inputs); write the "
            f"{lineage.operation} into another --store"
        )
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    store = create(  # born unfinished, with its lineage: never a store without them
        {
            LINEAGE: {**record, "created": created},
            "pending": {"operation": lineage.operation, "rows": rows},
        }
    )
    return store, False


def derive(
    url: str,
    *,
    create: Callable[[dict[str, Any]], LatentStore],
    model_id: str,
    lineage: Lineage,
    rows: int,
    part: Callable[[int, int], Part],
    setup: Callable[[LatentStore], None] | None = None,
    model: ModelLocation | ModelBytes | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DeriveResult:
    """Write ``rows`` rows into the derived store ``url`` (made by ``create`` with the
    metadata it is given when it does not exist: :func:`like` a parent store), rows
    ``[a, b)`` of each shard computed by ``part(a, b)`` in a Dask task (see the module
    docstring). ``setup`` writes what the tasks read into the store before any task runs,
    on every run until the store is whole (it finishes what a stopped setup left). With
    ``model`` (the one whose id is ``model_id``: a location, or its bytes already read),
    the store's canary is decoded and recorded as an encode does."""
    if rows < 1:
        raise StoreError(f"the {lineage.operation} has no rows to write")
    if model is not None and not isinstance(model, ModelBytes):
        model = read_once(model, storage_options)
    info = model.info if model is not None else None
    if info is not None and info.model_id != model_id:
        raise StoreError(
            f"{info.location} is model {info.short_id}, but the {lineage.operation} writes "
            f"latents of model {short_id(model_id)}; pass that model"
        )
    with leased(url, f"{lineage.operation} into {url}", storage_options) as lease:
        started = time.perf_counter()
        prepared = _prepare(url, create, lineage, rows, storage_options)
        if prepared is None:
            return DeriveResult(
                store=url, operation=lineage.operation, rows=rows, written=0, shards=0,
                seconds=0.0, skipped=True,
            )  # fmt: skip
        store, resumed = prepared
        if setup is not None:
            setup(store)
        first = store.count  # a whole shard's multiple: a derived store is written whole
        shards = shard_ranges(store, first, rows)

        def jobs() -> Iterator[DeriveJob]:  # drawn as tasks are submitted
            for a, b, _ in shards:
                yield DeriveJob(
                    store_url=url,
                    storage_options=dict(storage_options or {}),
                    start=a,
                    stop=b,
                    part=part(a, b),
                    fence=lease.fence(),
                )

        with using(client, scheduler, workers) as c:
            if model is not None and not has_canary(store):
                register_model(c, model, "decoder")
            fill(
                c, store, lease, write_part, jobs(), totals=(len(shards), rows - first),
                items=lambda j: j.stop - j.start, on_progress=on_progress,
                canary_of=model_id if model is not None else None,
            )  # fmt: skip
        lease.check()
        store.write_meta(count=rows, pending=None, labels=bool(store.meta.get("labels")))
        return DeriveResult(
            store=url,
            operation=lineage.operation,
            rows=rows,
            written=rows - first,
            shards=len(shards),
            seconds=time.perf_counter() - started,
            resumed=resumed,
        )
