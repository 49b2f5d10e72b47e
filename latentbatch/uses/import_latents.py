"""Import: latents that exist elsewhere (:mod:`latentbatch.sources.latents` reads their
layouts) into a latent store of the model that made them.

The latents' convention is declared: ``scaled`` (the default: as the diffusion model sees
them, ``(z - shift) * scaling``) or ``raw`` (the autoencoder's own, as the edm2/REPA
layout stores its means), with the source's ``scaling_factor`` and ``shift_factor`` when
they differ from the model's ``config.json``. The store always holds them scaled by the
model's factors (stored as found when the source's convention is the store's). float16
latents stay float16; float32 and bfloat16 become float32.

The source is listed by Dask tasks (:mod:`latentbatch.sources.listing`), whose listing is
kept inside the store being written (``.latentbatch-listing-*``, removed when the import
ends). The import is then a derived store's operation (:mod:`latentbatch.uses.derive`):
one Dask task per store shard reads its rows' part of the listing and the files or
chunks that hold them, so the client holds a few numbers per input file group and the
tasks in flight, never an id or a file name per row; the same command run again
resumes, refused in a sentence when the source changed in between.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from distributed import Client

from latentbatch.engine.cluster import map_in_order, using
from latentbatch.errors import DataError
from latentbatch.models.checkpoint import ModelBytes, ModelLocation, read_once
from latentbatch.models.convention import scale_warning
from latentbatch.progress import Progress
from latentbatch.sources.latents import Kind, Reader
from latentbatch.sources.listing import Group, Listing, list_source, read_rows
from latentbatch.storage.fs import StorageOptions, filesystem, is_remote, join
from latentbatch.storage.lease import BOOKKEEPING
from latentbatch.stores.store import Layout, StoreError, create_store, open_store
from latentbatch.uses.derive import DeriveResult, Lineage, derive, lineage_of

Convention = Literal["scaled", "raw"]
CONVENTIONS: tuple[Convention, ...] = ("scaled", "raw")


@dataclass(frozen=True, kw_only=True)
class Scaling:
    """How found latents become stored ones: ``raw`` ones, or scaled ones by the
    ``source`` factors (scaling, shift), are stored scaled by the model's ``target``."""

    raw: bool
    source: tuple[float, float]
    target: tuple[float, float]

    @property
    def as_found(self) -> bool:
        """Stored exactly as found (their convention is the store's)."""
        return not self.raw and self.source == self.target

    def apply(self, latents: np.ndarray) -> np.ndarray:
        if self.as_found:
            return latents
        values = latents.astype(np.float32)
        if not self.raw:
            values = values / self.source[0] + self.source[1]
        return np.asarray((values - self.target[1]) * self.target[0], np.float32)


@dataclass(frozen=True, kw_only=True)
class ImportPart:
    """Rows of one store shard: ``segments`` (a group of the listing, and its rows
    wanted), each row of ``shape`` (the listing's), read with the source's storage
    ``options``."""

    segments: tuple[tuple[Group, int, int], ...]
    shape: tuple[int, ...]
    channels: int
    scaling: Scaling
    options: dict[str, Any]

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        with Reader(self.options) as reader:  # each file opened once for the shard's rows
            rows, ids, labels = read_rows(self.segments, reader, self.shape)
        return self.scaling.apply(rows[:, : self.channels]), ids, labels  # a mean-and-std's mean


@dataclass(frozen=True, kw_only=True)
class ImportResult:
    """What :func:`import_latents` wrote, and what it noticed: whether it stored the
    means of mean-and-std arrays, and a warning when the latents' spread looks wrong for
    the declared convention."""

    derived: DeriveResult
    layout: Kind
    mean_of_mean_and_std: bool
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch import --json``)."""
        return {
            **self.derived.to_dict(),
            "layout": self.layout,
            "mean_of_mean_and_std": self.mean_of_mean_and_std,
            "warning": self.warning,
        }


def _refuse_a_changed_source(
    store_url: str, options: StorageOptions | None, found: Listing
) -> None:
    """Refuse to resume an import into ``store_url`` whose source no longer lists what
    it listed when the import began (files removed, added or changed): resumed, it
    would mix two listings, skipping or repeating rows. Says what changed."""
    try:
        store = open_store(store_url, options)
    except StoreError:
        return  # none yet (or not a store: the import says so when it starts)
    lineage = lineage_of(store) or {}
    began = lineage.get("parameters", {})
    if lineage.get("operation") != "import" or began.get("from") != found.spec:
        return
    if began.get("listing_sha256") in (None, found.digest):
        return
    where = ""
    for start, stop in store.each_shard():  # a shard at a time, up to the first that moved
        now = found.ids(start, min(stop, found.rows))
        pairs = zip(store.read_ids(start, stop), now, strict=False)
        moved = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if moved is not None:
            row = start + moved
            where = f"; row {row} was {store.read_ids(row, row + 1)[0]}, now {now[moved]}"
            break
    raise DataError(
        f"{found.spec} changed since the import into {store_url} began: it listed "
        f"{began.get('rows', 0):,} rows, now {found.rows:,}{where}. Import it into another "
        f"--store, or delete {store_url} and import again"
    )


def import_latents(
    model: ModelLocation,
    spec: str,
    store_url: str,
    *,
    latents: Convention = "scaled",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    layout: Layout | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> ImportResult:
    """Import the latents ``spec`` names (see the module docstring) into ``store_url``, a
    store of ``model``, the autoencoder that made them."""
    if latents not in CONVENTIONS:
        raise DataError(f"--latents {latents!r} is not scaled or raw")
    read = read_once(model, storage_options)  # the weights read once, here
    config = read.info.config
    with (
        using(client, scheduler, workers) as c,
        _listing_folder(store_url, storage_options) as into,
    ):
        found = list_source(
            spec, into, storage_options, run=lambda fn, specs: map_in_order(c, fn, specs)
        )
        result = _import(found, read, store_url, latents, scaling_factor, shift_factor, layout,
                         storage_options, c, on_progress)  # fmt: skip
    return ImportResult(
        derived=result,
        layout=found.kind,
        mean_of_mean_and_std=found.shape[0] == 2 * config.latent_channels,
        warning=scale_warning(open_store(store_url, storage_options)),
    )


@contextmanager
def _listing_folder(store_url: str, options: StorageOptions | None) -> Iterator[str]:
    """A folder for this import's listing inside the store (a store folder made for it
    alone is removed with it, when the import wrote nothing)."""
    fs, path = filesystem(store_url, options)
    existed = fs.exists(path)
    into = join(store_url, f"{BOOKKEEPING}listing-{uuid.uuid4().hex[:12]}")
    try:
        yield into
    finally:
        folder = filesystem(into, options)[1]
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
        if not existed and not is_remote(store_url) and fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)


def _import(
    found: Listing,
    read: ModelBytes,
    store_url: str,
    latents: Convention,
    scaling_factor: float | None,
    shift_factor: float | None,
    layout: Layout | None,
    storage_options: StorageOptions | None,
    client: Client,
    on_progress: Callable[[Progress], None] | None,
) -> DeriveResult:
    """The import of the listed ``found`` into ``store_url`` (a derived store's rows)."""
    info = read.info
    config = info.config
    spec = found.spec
    channels, *spatial = found.shape if len(found.shape) == 3 else (0, 0, 0)
    if channels not in (config.latent_channels, 2 * config.latent_channels):
        raise DataError(
            f"{spec} holds latents of shape {found.shape} per row; {info.location} "
            f"({config.preset}) makes {config.latent_channels} channels (or "
            f"{2 * config.latent_channels}: a mean and a std)"
        )
    image = (spatial[0] * config.downsampling, spatial[1] * config.downsampling)
    target = (config.scaling_factor, config.shift_factor)
    source = (
        target[0] if scaling_factor is None else scaling_factor,
        target[1] if shift_factor is None else shift_factor,
    )
    scaling = Scaling(raw=latents == "raw", source=source, target=target)
    kept = "float16" if found.dtype == "float16" and scaling.as_found else "float32"
    dtype = None if config.quantized else kept  # a codec model's latents are int8
    chosen = layout or Layout(latent_dtype=dtype)
    if chosen.latent_dtype is None and dtype is not None:
        chosen = Layout(chosen.shard_rows, chosen.chunk_rows, dtype)
    rows = found.rows
    lineage = Lineage(
        operation="import",
        parameters={
            "from": found.spec,
            "layout": found.kind,
            "latents": latents,
            "scaling_factor": source[0],
            "shift_factor": source[1],
            "mean_of_mean_and_std": channels == 2 * config.latent_channels,
            "rows": found.rows,
            "listing_sha256": found.digest,
        },
        seed=None,
        parents=(),
    )
    _refuse_a_changed_source(store_url, storage_options, found)

    def part(a: int, b: int) -> ImportPart:
        return ImportPart(
            segments=found.segments(a, b),
            shape=found.shape,
            channels=config.latent_channels,
            scaling=scaling,
            options=dict(storage_options or {}),
        )

    return derive(
        store_url,
        create=lambda meta: create_store(
            store_url,
            model_id=info.model_id,
            config=config,
            capacity=rows,
            layout=chosen,
            quantization=info.quantization,
            storage_options=storage_options,
            image=image,
            meta=meta,
        ),
        model_id=info.model_id,
        lineage=lineage,
        rows=rows,
        part=part,
        model=read,
        storage_options=storage_options,
        client=client,
        on_progress=on_progress,
    )
