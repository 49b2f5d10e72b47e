"""A latent store → image shards, one Dask task per output shard.

::

    client                                      worker (decoder loaded once by ModelPlugin)
    ──────                                      ──────
    open store, check model id and shapes
    read OUT's manifest and shard records
    submit DecodeJob(rows, paths)  ───────────►  read its rows' ids, refuse unsafe ones
      only for shards not finished,                (named by row and id, nothing written)
      a bounded number in flight                 read latents a batch ahead (a reader
                                                   thread), refuse NaN/Inf rows
                                                 decode in batches (latentbatch.engine.kernel:
                                                   autocast on CUDA) while a thread pool
                                                   encodes the previous batch (PNG,
                                                   WebP or JPEG)
                                                 write the shard (temp name → rename),
    ◄──────────────────────────────────────────    then its record; return the record
    progress: images, images/s, ETA
    remove temporaries; write manifest.json last

An output shard holds ``--images-per-shard`` rows exactly when it is given (a task may
then read part of a store shard). By default it holds 10,240 rows, or fewer when

- 10,240 images would pass :data:`DEFAULT_SHARD_BYTES` of pixels at the store's image
  size (WebDataset's guidance is 100 MB to 1 GB a shard: a 512x512 RGB image takes
  768 KiB), or
- the store has fewer than :data:`SPREAD_SHARDS` shards' worth: then the rows are spread
  over that many shards (at least :data:`MIN_SHARD_ROWS` rows each), so a small
  collection of large images still gives every worker work,

rounded down to whole store shards, or else to whole store chunks, when that leaves one
or more. The grouping depends on the store and the setting alone, never on the number of
workers, so the bytes are the same on any cluster; an output keeps the grouping it was
begun with when it is continued (a grown store adds shards of the same size).

:func:`decode_selection` decodes chosen rows in this process (``latentbatch query
--decode``) with the same checks, the same shard writers and the same manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client

from latentbatch.choices import Format
from latentbatch.config import ModelConfig, tiled
from latentbatch.engine.canary_task import check_first, check_here, check_on_worker
from latentbatch.engine.cluster import gpu_resources, map_bounded, using
from latentbatch.engine.kernel import (
    Chosen,
    Precision,
    Upcasts,
    batch_difference,
    batch_for,
    bf16_supported,
    check_precision,
    chosen_precision,
    decode_batches,
    decode_latents,
    environment,
    refuse_nonfinite,
)
from latentbatch.engine.workers import (
    cached_model,
    cached_store,
    encoder_threads,
    encoding_pool,
    reader_pool,
    register_model,
    worker_threads,
)
from latentbatch.errors import ConfigError, LatentbatchError, OutputError
from latentbatch.ids import short_id, validate_ids
from latentbatch.models.checkpoint import ModelInfo, ModelLocation, read_once
from latentbatch.models.weights import LoadedModel, loaded
from latentbatch.outputs.codecs import PNG, ImageCodec
from latentbatch.outputs.manifest import (
    Manifest,
    ShardRecord,
    StoreRef,
    begun_settings,
    iter_shards,
    read_manifest,
    read_records,
    write_manifest,
    write_record,
)
from latentbatch.outputs.shards import (
    NPZ_NAME,
    assemble_npz,
    check_format,
    create_zarr_output,
    remove_beyond,
    remove_temporaries,
    write_shard,
)
from latentbatch.progress import Progress
from latentbatch.storage.fs import StorageOptions, checked_commits, filesystem, is_remote, join
from latentbatch.storage.lease import Fence, leased
from latentbatch.stores.canary import CanaryError, CanaryResult, has_canary
from latentbatch.stores.store import LatentStore, Rows, StoreError, open_store, shard_ranges

DEFAULT_IMAGES_PER_SHARD = 10_240  # img2dataset's name and order of size: ~3 MB of digits
DEFAULT_SHARD_BYTES = 512 * 2**20
"""The most pixel bytes of a default output shard (a shard of larger images holds fewer)."""
SPREAD_SHARDS = 32
"""The default spreads a store of fewer rows than this many full shards over this many
shards: twice the workers of a 16-GPU cluster, whatever cluster decodes it."""
MIN_SHARD_ROWS = 32
"""The fewest rows of a default output shard (a batch's worth) when the rows are spread."""
SELECTION_LIMIT = DEFAULT_IMAGES_PER_SHARD  # rows an in-process decode of a selection takes
ProgressCallback = Callable[[Progress], None]


class ModelMismatchError(LatentbatchError):
    """The store was encoded by another model."""


@dataclass(frozen=True, kw_only=True)
class DecodeJob:
    """One decode task: store rows ``[start, stop)`` → output shard ``index``."""

    store_url: str
    storage_options: dict[str, Any]
    store_uuid: str
    model_id: str
    index: int
    start: int
    stop: int
    out_url: str
    out_options: dict[str, Any]
    fmt: Format
    identity: dict[str, Any]
    codec: ImageCodec = PNG
    batch_size: int | None = None
    check_canary: bool = True  # each worker checks the store's canary before its first shard
    run: str = ""  # this decode's token: a worker checks the canary once per run
    fence: Fence | None = None  # the output's lease: checked before each write is kept
    precision: Precision = "auto"  # chosen on the worker: chosen_precision


@dataclass(frozen=True, kw_only=True)
class DecodeResult:
    out: str
    manifest: Manifest
    count: int
    decoded: int
    shards_written: tuple[int, ...]
    shards_skipped: tuple[int, ...]
    seconds: float
    canary: str = "none"  # how the store's canary compared (latentbatch.stores.canary)
    tiled: bool = False  # each image over the memory budget, decoded in tiles
    batch_invariance: int | None = None  # levels between batch 1 and the working batch
    batches: int = 0  # decoder calls of this run
    fp32_again: int = 0  # of them, those whose bf16 or fp16 output held NaN or Inf

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch decode --json``)."""
        return {
            "out": self.out,
            "count": self.count,
            "decoded": self.decoded,
            "shards_written": list(self.shards_written),
            "shards_skipped": list(self.shards_skipped),
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "model_id": self.manifest.model_id,
            "canary": self.canary,
            "tiled": self.tiled,
            "batch_invariance_levels": self.batch_invariance,
            "batches": self.batches,
            "fp32_again": self.fp32_again,
        }

    @property
    def upcast_sentence(self) -> str | None:
        """A sentence when batches were decoded again in fp32 (None when none were)."""
        if not self.fp32_again:
            return None
        if self.fp32_again == self.batches:
            return (
                f"every batch ({self.batches}) held NaN or Inf in reduced precision and was "
                "decoded again in fp32: decode this model with --precision fp32"
            )
        return (
            f"{self.fp32_again} of {self.batches} batches held NaN or Inf in reduced "
            "precision and were decoded again in fp32"
        )


class ImageEncoding:
    """Image encoding of decoded batches on a thread pool while the next batch decodes:
    each batch is cut into one chunk per thread (a future per chunk, not per image)."""

    def __init__(self, threads: int, codec: ImageCodec | None = None) -> None:
        self.threads = threads
        self.codec = codec or PNG
        self._pool = encoding_pool(threads)
        self._parts: list[Future[list[bytes]]] = []

    def add(self, images: np.ndarray) -> None:
        for chunk in np.array_split(images, min(self.threads, max(1, len(images)))):
            self._parts.append(self._pool.submit(self.codec.encode, chunk))

    def result(self) -> list[bytes]:
        """Every image's file bytes, in the order the images were added."""
        return [png for part in self._parts for png in part.result()]


def read_ahead(
    read: Callable[[int, int], np.ndarray], start: int, stop: int, batch_size: int
) -> Iterator[np.ndarray]:
    """``read(a, b)`` of rows ``[start, stop)`` in blocks of ``batch_size`` rows, each
    read on this process's reader thread while the one before it is decoded."""
    ranges = shard_ranges(start, stop, batch_size)
    pool = reader_pool()
    pending = pool.submit(read, *ranges[0]) if ranges else None
    for following in [*ranges[1:], None]:
        assert pending is not None
        latents = pending.result()
        pending = pool.submit(read, *following) if following is not None else None
        yield latents


def decode_shard(job: DecodeJob) -> dict[str, Any]:
    """Worker side: decode one shard and write it; return its record."""
    decoder, device = cached_model(job.model_id, "decoder")
    store = cached_store(job.store_url, job.storage_options, job.store_uuid, job.stop)
    if job.check_canary:
        check_on_worker(store, job.model_id, job.run)  # once per worker process and run
    ids = validate_ids(store.read_ids(job.start, job.stop), start=job.start, where=job.store_url)
    where = f"rows [{job.start}, {job.stop}) of {job.store_url}"

    def read_checked(start: int, stop: int) -> np.ndarray:
        latents = store.read_latents(start, stop)
        rows = range(start, stop)
        refuse_nonfinite(latents, list(rows), ids[start - job.start : stop - job.start], where)
        return latents

    threads = min(encoder_threads(device, worker_threads()), job.codec.useful_threads)
    encoding = ImageEncoding(threads, job.codec) if job.fmt in ("tar", "png") else None
    image_bytes = store.model_config.decode_bytes(*store.image_size)
    batch_size = job.batch_size or batch_for(device, image_bytes)
    blocks = read_ahead(read_checked, job.start, job.stop, max(batch_size, store.shard_rows))
    batches = (b[i : i + batch_size] for b in blocks for i in range(0, len(b), batch_size))
    upcasts = Upcasts()
    images = decode_batches(
        decoder,
        batches,
        device,
        encoding.add if encoding is not None else None,
        precision=precision_on(job.precision, store.model_config, device),
        upcasts=upcasts,
    )
    labels = store.read_labels(job.start, job.stop).tolist() if store.has_labels else None
    fence = job.fence
    with checked_commits(fence.check, fence.token) if fence is not None else nullcontext():
        record = write_shard(
            job.out_url,
            job.out_options,
            job.fmt,
            index=job.index,
            start=job.start,
            ids=ids,
            images=images,
            codec=job.codec,
            encoded=encoding.result() if encoding is not None else None,
            labels=labels,
        )
        record = dataclasses.replace(record, batches=upcasts.batches, fp32_again=upcasts.fp32_again)
        write_record(job.out_url, job.out_options, record, job.identity)
    return record.to_dict()


def precision_on(asked: Precision, config: ModelConfig, device: torch.device) -> Chosen:
    """The precision a decoder of ``config`` runs in on ``device`` when ``asked``."""
    return chosen_precision(
        asked, device.type, force_upcast=config.force_upcast, bf16=bf16_supported(device)
    )


def _environments(
    client: Client, model_id: str, config: ModelConfig, precision: Precision
) -> dict[str, Any]:
    """The distinct :func:`worker_environment` of the cluster's workers (not how many
    there are: an output's bytes do not depend on that)."""
    found = client.run(worker_environment, model_id, config, precision)
    distinct = {json.dumps(e, sort_keys=True): e for e in found.values()}
    return {"settings": [distinct[k] for k in sorted(distinct)]}


def worker_environment(model_id: str, config: ModelConfig, precision: Precision) -> dict[str, Any]:
    """Worker side: :func:`latentbatch.engine.kernel.environment` of the device this
    worker decodes on, in the precision it chooses there."""
    _, device = cached_model(model_id, "decoder")
    return environment(device, precision_on(precision, config, device))


def batch_invariance(job: DecodeJob, rows: int = 16) -> int:
    """Worker side: the largest pixel difference between the first ``rows`` rows of the
    job's store (its canary's, when it has one) decoded one at a time and at the batch
    this worker decodes with."""
    decoder, device = cached_model(job.model_id, "decoder")
    store = cached_store(job.store_url, job.storage_options, job.store_uuid, job.stop)
    chosen = store.meta.get("canary", {}).get("rows") or list(range(min(rows, store.count)))
    latents = store.read("latents", chosen).astype(np.float32)
    image_bytes = store.model_config.decode_bytes(*store.image_size)
    batch = min(len(latents), job.batch_size or batch_for(device, image_bytes))
    chosen = precision_on(job.precision, store.model_config, device)
    return batch_difference(decoder, latents, device, batch, chosen)


def check_model(store: LatentStore, info: ModelInfo, allow_model_mismatch: bool = False) -> None:
    """Refuse to decode ``store`` with a model that did not make it (unless allowed) or
    whose decoder does not take its latents."""
    if store.model_id != info.model_id and not allow_model_mismatch:
        raise ModelMismatchError(
            f"{store.url} was encoded by model {store.model_id} but the model given is "
            f"{info.model_id}; pass --allow-model-mismatch to decode anyway"
        )
    expected = info.config.latent_shape
    if info.config.any_size:  # the latents of the store's image size
        try:
            expected = info.config.latent_shape_at(*store.image_size)
        except ConfigError as exc:
            raise StoreError(f"{store.url}: {exc}; use the model that made the store") from None
    if store.latent_shape != expected:
        raise StoreError(
            f"{store.url} holds latents of shape {store.latent_shape} (C, h, w) but the decoder "
            f"of {info.location} takes {expected}; use the model that made "
            "the store"
        )


def _check_codec(fmt: Format, codec: ImageCodec | None) -> ImageCodec:
    codec = codec or PNG
    if fmt != "tar" and codec.name != "png":
        raise OutputError(
            f"--image-codec {codec.name} needs --format tar; {fmt} output is not re-encoded"
        )
    return codec


def _settings(
    fmt: Format, codec: ImageCodec, channels: int, precision: Precision = "auto"
) -> dict[str, Any]:
    """What shapes an output's bytes besides store and model: its image codec's settings
    (none for zarr), the images' channels (lossy codecs read back as RGB otherwise), and
    a precision asked for (``auto`` is the device's own, as the record says)."""
    found = {"channels": channels, **(codec.settings() if fmt in ("tar", "png") else {})}
    return found if precision == "auto" else {**found, "precision": precision}


def _whole_npz(
    out_url: str,
    options: StorageOptions | None,
    earlier: Manifest | None,
    store: LatentStore,
    identity: dict[str, Any],
) -> ShardRecord | None:
    """The record of a finished npz output of all of ``store``'s rows with these
    settings, whose file is there at its recorded size; None when there is none."""
    if earlier is None or earlier.store.uuid != store.uuid or earlier.count != store.count:
        return None
    settings = {k: v for k, v in identity.items() if k not in ("store_uuid", "model_id", "format")}
    recorded = {k: v for k, v in (earlier.format_settings or {}).items() if k != "batch_size"}
    if recorded != settings:
        return None
    table = list(iter_shards(out_url, options, earlier))
    fs, root = filesystem(out_url, options)
    path = join(root, NPZ_NAME)
    if len(table) != 1 or table[0].path != NPZ_NAME or not fs.exists(path):
        return None
    return table[0] if int(fs.size(path)) == table[0].bytes else None


def _labels_of(store: LatentStore) -> Callable[[int, int], np.ndarray] | None:
    """The store's labels by row range, when it has them (an npz's ``arr_1``)."""
    return store.read_labels if store.has_labels else None


def _refuse_other_output(
    out_url: str,
    earlier: Manifest | None,
    store: LatentStore,
    info: ModelInfo,
    fmt: Format,
    settings: dict[str, Any],
) -> None:
    """Refuse an ``out_url`` (whose manifest is ``earlier``) that holds another decode:
    another store, model, format or image codec settings."""
    if earlier is None:
        return
    if earlier.store.uuid != store.uuid:
        raise OutputError(
            f"{out_url} holds the decode of another store ({earlier.store.url}); "
            "choose another --out or remove that output"
        )
    if earlier.model_id != info.model_id or earlier.output_format != fmt:
        raise OutputError(
            f"{out_url} holds a {earlier.output_format} decode by model "
            f"{short_id(earlier.model_id)}; choose another --out"
        )
    before = _layout_settings(earlier.format_settings, fmt, store.shard_rows)
    if before != _layout_settings(settings, fmt, store.shard_rows):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(before.items()))
        raise OutputError(
            f"{out_url} holds images made with other settings ({shown}); "
            "choose another --out, or decode with those settings"
        )


def _layout_settings(
    settings: dict[str, Any] | None, fmt: Format, shard_rows: int
) -> dict[str, Any]:
    """The settings an output cannot mix: image codec and quality (tar and png), and
    rows per output shard (one store shard each before ``--images-per-shard``)."""
    encoded = fmt in ("tar", "png")
    keys = ("image_codec", "quality", "rows_per_shard") if encoded else ("rows_per_shard",)
    chosen = {k: v for k, v in (settings or {}).items() if k in keys}
    defaults: dict[str, Any] = {"rows_per_shard": shard_rows}
    if encoded:
        defaults["image_codec"] = "png"
    return {**defaults, **chosen}


def rows_per_output_shard(
    images_per_shard: int | None,
    store_shard_rows: int,
    image_bytes: int = 0,
    *,
    count: int = 0,
    chunk_rows: int = 1,
) -> int:
    """Rows of each output shard: ``images_per_shard`` exactly when given; by default
    :data:`DEFAULT_IMAGES_PER_SHARD`, fewer when images of ``image_bytes`` pixel bytes
    would pass :data:`DEFAULT_SHARD_BYTES` or when ``count`` rows would make fewer than
    :data:`SPREAD_SHARDS` shards, rounded down to whole store shards or chunks (the
    module docstring)."""
    if images_per_shard is not None:
        if images_per_shard < 1:
            raise OutputError(f"--images-per-shard {images_per_shard} must be at least 1")
        return images_per_shard
    wanted = DEFAULT_IMAGES_PER_SHARD
    if image_bytes > 0:
        wanted = max(1, min(wanted, DEFAULT_SHARD_BYTES // image_bytes))
    if count > 0:
        wanted = min(wanted, max(MIN_SHARD_ROWS, -(-count // SPREAD_SHARDS)))
    for unit in (store_shard_rows, chunk_rows):
        if wanted >= unit:
            return wanted // unit * unit
    return wanted


def _absolute(url: str) -> str:
    return url if is_remote(url) else str(Path(url).resolve())


def decode(
    model_dir: ModelLocation,
    store_url: str,
    out_url: str,
    *,
    fmt: Format = "tar",
    codec: ImageCodec | None = None,
    images_per_shard: int | None = None,
    allow_model_mismatch: bool = False,
    skip_canary: bool = False,
    storage_options: StorageOptions | None = None,
    out_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    on_progress: ProgressCallback | None = None,
    batch_invariance_check: bool = False,
    precision: Precision = "auto",
) -> DecodeResult:
    """Decode the committed rows of a store into ``out_url`` (see the module docstring).
    Tar shards hold ``codec``'s images (PNG when not given); each output shard holds
    ``images_per_shard`` images (:func:`rows_per_output_shard`), the last one the rest.
    The store's canary is checked first (:mod:`latentbatch.stores.canary`) unless
    ``skip_canary`` (a decoder changed on purpose, decoded with ``allow_model_mismatch``).
    The manifest records what shaped the pixels on the workers
    (:func:`latentbatch.engine.kernel.environment`); ``batch_invariance_check`` also
    decodes the canary rows (or the first 16) one at a time and at the working batch on
    a worker, and records and returns the largest pixel difference. ``precision`` is
    the decoder's (:func:`latentbatch.engine.kernel.chosen_precision` on each worker:
    ``auto`` is fp32 on CPU); batches decoded again in fp32 are counted in the result
    and the manifest."""
    fmt = check_format(fmt)
    precision = check_precision(precision)
    codec = _check_codec(fmt, codec)
    out_options = storage_options if out_options is None else out_options
    model = read_once(model_dir, storage_options)  # the weights read once, here
    info = model.info
    store = open_store(store_url, storage_options)
    check_model(store, info, allow_model_mismatch)
    if store.count == 0:
        raise StoreError(f"{store_url} has no committed rows to decode")

    source = StoreRef(url=_absolute(store_url), uuid=store.uuid, count=store.count)
    pixels = (*store.image_size, info.config.channels)
    recorded = has_canary(store)
    check = recorded and not skip_canary
    canary = CanaryResult(status="skipped" if skip_canary and recorded else "none")
    written: dict[int, ShardRecord] = {}
    started = time.perf_counter()
    run_token = uuid.uuid4().hex
    recorded_environment: dict[str, Any] | None = None
    invariance: int | None = None

    with leased(out_url, f"decode of {source.url}", out_options) as lease:
        earlier = read_manifest(out_url, out_options)  # read once, under the lease
        begun = begun_settings(out_url, out_options, store.uuid, earlier)
        if images_per_shard is None and begun is not None:  # continued as it was begun
            rows = int(begun.get("rows_per_shard", store.shard_rows))
        else:
            rows = rows_per_output_shard(
                images_per_shard,
                store.shard_rows,
                int(np.prod(pixels)),
                count=store.count,
                chunk_rows=store.chunk_rows,
            )
        settings = {
            **_settings(fmt, codec, info.config.channels, precision),
            "rows_per_shard": rows,
        }
        identity = {"store_uuid": store.uuid, "model_id": info.model_id, "format": fmt, **settings}
        shards = -(-store.count // rows)

        def rows_of(index: int) -> tuple[int, int]:
            return index * rows, min((index + 1) * rows, store.count)

        _refuse_other_output(out_url, earlier, store, info, fmt, settings)
        if fmt != "zarr":  # a stopped decode of more shards (another store's) left these
            remove_beyond(out_url, out_options, shards)
        whole = _whole_npz(out_url, out_options, earlier, store, identity) if fmt == "npz" else None
        done = read_records(out_url, out_options, identity) if whole is None else {}
        done = {i: r for i, r in done.items() if i < shards and (r.start, r.stop) == rows_of(i)}
        job_fields: dict[str, Any] = {
            "store_url": store_url,
            "storage_options": dict(storage_options or {}),
            "store_uuid": store.uuid,
            "model_id": info.model_id,
            "out_url": out_url,
            "out_options": dict(out_options or {}),
            "fmt": fmt,
            "identity": identity,
            "codec": codec,
            "batch_size": batch_size,
            "check_canary": check,
            "run": run_token,
            "fence": lease.fence(),
            "precision": precision,
        }
        jobs = (  # drawn as tasks are submitted: the client holds only those in flight
            DecodeJob(**job_fields, index=index, start=a, stop=b)
            for index in range(shards)
            if index not in done
            for a, b in [rows_of(index)]
        )
        todo = (shards - len(done), store.count - sum(r.count for r in done.values()))
        if whole is not None:  # a finished npz: its parts are gone, nothing to do
            todo = (0, 0)

        def collect(record: dict[str, Any], progress: Progress) -> None:
            lease.check()  # taken over while this decode stalled: record nothing more
            written[record["index"]] = ShardRecord.from_dict(record)
            if on_progress is not None:
                on_progress(progress)

        def run(c: Client) -> None:
            nonlocal started, canary, recorded_environment, invariance
            started = time.perf_counter()  # throughput counts from a ready cluster
            register_model(c, model, "decoder")
            if check:  # before anything of the output exists
                canary = check_first(c, store, info.model_id, run_token)
            recorded_environment = _environments(c, info.model_id, info.config, precision)
            if batch_invariance_check:
                probe = DecodeJob(**{**job_fields, "index": 0, "start": 0, "stop": store.count})
                invariance = c.submit(batch_invariance, probe, pure=False).result()
                recorded_environment["batch_invariance_levels"] = invariance
            if fmt == "zarr":  # its chunks divide its shards: one writer per shard
                chunk_rows = math.gcd(rows, store.chunk_rows)
                create_zarr_output(out_url, out_options, store.count, pixels, rows, chunk_rows)
            map_bounded(
                c,
                decode_shard,
                jobs,
                items=lambda j: j.stop - j.start,
                max_in_flight=max_in_flight,
                resources=gpu_resources(c),
                on_result=collect,
                totals=todo,
            )

        if todo[0] or batch_invariance_check:
            try:
                with using(client, scheduler, workers) as c:
                    run(c)
            except CanaryError as exc:  # one worker refused after others had written
                if not written:
                    raise
                images = sum(r.count for r in written.values())
                raise CanaryError(
                    f"{exc}. The other workers had written {len(written)} shards ({images:,} "
                    "images), recorded and kept: fix or remove that worker and run the decode "
                    "again, which skips them"
                ) from None
        else:  # nothing decoded now: what shaped the pixels is what was recorded
            recorded_environment = earlier.environment if earlier is not None else None
        records = {**done, **written}
        if recorded_environment is not None and todo[0]:  # every shard's, resumed or not
            recorded_environment["precision"] = {
                "asked": precision,
                "batches": sum(r.batches for r in records.values()),
                "fp32_again": sum(r.fp32_again for r in records.values()),
            }
        lease.check()
        lease.fence().check()  # on the storage itself: another writer's temporaries stay
        taken = {lease.took_over.token} if lease.took_over is not None else set()
        remove_temporaries(out_url, out_options, {lease.token, *taken})
        table = [records[i] for i in sorted(records)]
        with checked_commits(lease.fence().check):
            if fmt == "npz":  # the parts streamed into one file (or the one already there)
                table = [whole or assemble_npz(out_url, out_options, table, _labels_of(store))]
            manifest = write_manifest(
                out_url,
                out_options,
                store=source,
                model_id=info.model_id,
                output_format=fmt,
                format_settings={**settings, "batch_size": batch_size or "auto"},
                count=store.count,
                shards=table,
                environment=recorded_environment,
            )
        if fmt == "npz":
            remove_beyond(out_url, out_options, 0)  # the parts and their records: in the npz
    return DecodeResult(
        out=out_url,
        manifest=manifest,
        count=store.count,
        decoded=sum(r.count for r in written.values()),
        shards_written=tuple(sorted(written)),
        shards_skipped=tuple(sorted(done)),
        seconds=time.perf_counter() - started,
        canary=str(canary),
        tiled=info.config.any_size and tiled(info.config.decode_bytes(*store.image_size)),
        batch_invariance=invariance,
        batches=sum(r.batches for r in written.values()),
        fp32_again=sum(r.fp32_again for r in written.values()),
    )


def decode_in_process(
    model: ModelLocation | LoadedModel, latents: np.ndarray, options: StorageOptions | None = None
) -> np.ndarray:
    """Decode latents ``(n, C, h, w)`` in this process on the CPU: ``uint8 (n, H, W, C)``.
    ``model`` is a location, or a model already loaded
    (:func:`latentbatch.models.weights.loaded`)."""
    decoder = loaded(model, options).decoder
    return decode_latents(decoder, latents.astype(np.float32), torch.device("cpu"))


def _decode_selected(
    model: ModelLocation | LoadedModel, store: LatentStore, rows: list[int]
) -> tuple[np.ndarray, list[str], ModelInfo]:
    """Images, ids and model info of chosen rows, decoded with the engine's checks (the
    store's canary first); the model is read and hashed once (not at all when loaded)."""
    if len(rows) == 0:
        raise StoreError("the selection is empty; there is nothing to decode")
    model = loaded(model, store.storage_options)
    check_model(store, model.info)
    cpu = torch.device("cpu")
    if has_canary(store):
        check_here(model.decoder, store, cpu)
    ids = validate_ids(store.read("ids", rows).tolist())
    latents = store.read("latents", rows)
    refuse_nonfinite(latents, rows, ids, f"the selection of {store.url}")
    images = decode_latents(model.decoder, latents.astype(np.float32), cpu)
    return images, ids, model.info


def decode_rows(model: ModelLocation | LoadedModel, store: LatentStore, rows: Rows) -> np.ndarray:
    """Decode chosen committed rows of a store in this process, with the engine's checks
    (the store's model, safe ids, finite latents): ``uint8 (n, H, W, C)``."""
    images, _, _ = _decode_selected(model, store, [int(r) for r in rows])
    return images


def decode_selection(
    model: ModelLocation | LoadedModel,
    store: LatentStore,
    rows: Rows,
    out: str,
    fmt: str = "tar",
    codec: ImageCodec | None = None,
) -> Manifest:
    """Decode chosen rows into ``out`` as one shard (tar, png, zarr or npz) plus a manifest
    that lists them, with :func:`decode_rows`' checks and :func:`decode`'s writers. It
    runs in this process, so a selection of more than :data:`SELECTION_LIMIT` rows (one
    output shard's worth) is refused: decode the store with :func:`decode` instead."""
    fmt = check_format(fmt)
    codec = _check_codec(fmt, codec)
    options = store.storage_options
    if len(rows) > SELECTION_LIMIT:
        raise OutputError(
            f"the selection has more than {SELECTION_LIMIT:,} rows, which --decode decodes "
            "in this process; narrow it (--rows, --label, --where), or decode the whole "
            "store on the cluster with `latentbatch decode`"
        )
    with leased(out, f"decode of a selection of {store.url}", options):
        if read_manifest(out, options) is not None:
            raise OutputError(
                f"{out} already holds a decode; choose another folder for the selection"
            )
        rows = [int(r) for r in rows]
        images, ids, info = _decode_selected(model, store, rows)
        if fmt == "zarr":
            create_zarr_output(out, options, len(rows), images.shape[1:], len(rows), len(rows))
        labels = store.read("labels", rows).tolist() if store.has_labels else None
        record = write_shard(
            out,
            options,
            fmt,
            index=0,
            start=0,
            ids=ids,
            images=images,
            codec=codec,
            labels=labels,
        )
        if fmt == "npz":
            chosen = np.asarray(store.read("labels", rows)) if store.has_labels else None
            record = assemble_npz(
                out, options, [record], (lambda a, b: chosen[a:b]) if chosen is not None else None
            )
            remove_beyond(out, options, 0)
        return write_manifest(
            out,
            options,
            store=StoreRef(url=store.url, uuid=store.uuid, count=store.count),
            model_id=info.model_id,
            output_format=fmt,
            format_settings=_settings(fmt, codec, info.config.channels),
            count=len(rows),
            selection=tuple(rows),
            shards=[record],
        )
