"""Images → latents → a latent store, one Dask task per store shard.

::

    client                                   worker (model loaded once by ModelPlugin)
    ──────                                   ──────
    open source, validate ids
    create / open store, record `pending`
    resize arrays to the new row count
    submit ShardJob(rows, RowsRef, ids) ───►  read its images from the source
      (bounded number in flight)             encode in batches (inference_mode)
                                             write its whole shard: latents, ids, labels
    ◄──────────────────────────────────────  {start, stop}
    advance `count` over the contiguous
    prefix of finished shards
    clear `pending`, add the source record

An interrupted encode leaves the store readable at its last ``count``; running the same
command again resumes from there (shards past ``count`` are rewritten whole). The tasks,
commits and canary are the loop that import and the derived stores share
(:mod:`latentbatch.engine.filling`).

:func:`encode_file` encodes one image file in this process (``query --near-image``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from distributed import Client

from latentbatch.engine.cluster import gpu_resources, using
from latentbatch.engine.filling import fill, shard_ranges
from latentbatch.engine.kernel import (
    DECODE_BATCH,
    ENCODE_BATCH,
    Precision,
    batch_for,
    decode_latents,
    encode_images,
    encode_precision,
)
from latentbatch.engine.workers import cached_model, register_model
from latentbatch.errors import ConfigError, DataError
from latentbatch.ids import short_id, validate_ids
from latentbatch.models.autoencoder import to_unit
from latentbatch.models.checkpoint import ModelInfo, ModelLocation, read_once
from latentbatch.models.convention import scale_warning
from latentbatch.models.quality import psnr_per_image
from latentbatch.models.weights import LoadedModel, loaded
from latentbatch.progress import Progress
from latentbatch.sources.images import (
    MAX_PIXELS,
    Geometry,
    ImageSource,
    RowsRef,
    conform,
    native_size,
    open_image,
    open_source,
)
from latentbatch.storage.fs import StorageOptions
from latentbatch.storage.lease import Fence, holds_data, leased
from latentbatch.stores.store import (
    LatentStore,
    Layout,
    StoreError,
    create_store,
    open_store,
)

ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One encode task: store rows ``[start, stop)``; the first ``keep`` rows are already
    committed and are re-read from the store; the rest come from ``rows``."""

    store_url: str
    storage_options: dict[str, Any]
    model_id: str
    start: int
    stop: int
    keep: int
    rows: RowsRef
    ids: tuple[str, ...]
    labels: tuple[int, ...]
    fence: Fence | None = None  # the store's lease: checked before the shard is written
    precision: Precision = "auto"  # chosen on the worker: encode_precision


@dataclass(frozen=True, kw_only=True)
class EncodeResult:
    store: str
    model_id: str
    source: str
    rows: tuple[int, int]
    encoded: int
    seconds: float
    resumed: bool = False
    skipped: bool = False
    shards: int = 0
    warning: str | None = None  # the latents' spread looks wrong for the model's convention

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch encode --json``)."""
        return {
            **dataclasses.asdict(self),
            "rows": list(self.rows),
            "images_per_second": self.images_per_second,
        }


def stored_quality(
    decoder: torch.nn.Module,
    images: np.ndarray,
    stored: np.ndarray,
    device: torch.device,
    batch_size: int = DECODE_BATCH,
) -> np.ndarray:
    """Each image's PSNR (dB, float32) against its decoding from ``stored``, the latents as
    the store holds them (its dtype), decoded the way a decode does."""
    decoded = decode_latents(decoder, stored.astype(np.float32), device, batch_size)
    reference = to_unit(torch.from_numpy(np.asarray(images)))
    return psnr_per_image(reference, to_unit(torch.from_numpy(decoded))).numpy()


def encode_shard(job: ShardJob) -> dict[str, int]:
    """Worker side: encode one shard's images, decode them again from the latents as
    stored to measure each row's PSNR (stores that record it), and write the shard."""
    encoder, device = cached_model(job.model_id, "encoder")
    store = open_store(job.store_url, job.storage_options, writable=True)
    images = job.rows.read()
    image_bytes = store.model_config.decode_bytes(*store.image_size)  # the encoder's alike
    batch = min(ENCODE_BATCH, batch_for(device, image_bytes))
    upcast = store.model_config.force_upcast
    chosen = encode_precision(job.precision, device.type, force_upcast=upcast)
    latents = encode_images(encoder, images, device, batch, precision=chosen)
    latents = latents.astype(store.latents.dtype)
    ids = list(job.ids)
    labels = np.asarray(job.labels, np.int32)
    quality = None
    if store.has_quality:
        decoder, _ = cached_model(job.model_id, "decoder")
        quality = stored_quality(decoder, images, latents, device, batch_for(device, image_bytes))
    if job.keep:
        before = job.start, job.start + job.keep
        latents = np.concatenate([store.read_latents(*before), latents])
        ids = store.read_ids(*before) + ids
        labels = np.concatenate([store.read_labels(*before), labels])
        if quality is not None:
            quality = np.concatenate([store.read_quality(*before), quality])
    if job.fence is not None:  # a stalled encode's late shard is not written
        job.fence.check()
    store.write_rows(job.start, latents, ids, labels, quality)
    labelled = int((labels >= 0).any())
    return {"start": job.start + job.keep, "stop": job.stop, "labelled": labelled}


def _prepare(
    store_url: str,
    info: ModelInfo,
    source: ImageSource,
    append: bool,
    layout: Layout | None,
    storage_options: StorageOptions | None,
    image: tuple[int, int],
) -> tuple[LatentStore, int, bool] | None:
    """Open or create the store; return it, the store row of source row 0, and whether
    this resumes an interrupted encode. None when the source is already encoded."""
    if not holds_data(store_url, storage_options):
        store = create_store(
            store_url,
            model_id=info.model_id,
            config=info.config,
            capacity=len(source),
            layout=layout,
            quantization=info.quantization,
            storage_options=storage_options,
            image=image,
        )
        return store, 0, False
    store = open_store(store_url, storage_options, writable=True)
    if store.model_id != info.model_id:
        raise StoreError(
            f"{store_url} holds latents of model {short_id(store.model_id)}, not of "
            f"{short_id(info.model_id)}; encode into another store"
        )
    if store.image_size != image:
        raise StoreError(
            f"{store_url} holds {store.image_size[0]}x{store.image_size[1]} images, not "
            f"{image[0]}x{image[1]}; pass --size {store.image_size[0]}x{store.image_size[1]} "
            "or encode into another store"
        )
    pending = store.pending
    if pending is not None:
        if pending["source"] != source.spec or pending["stop"] - pending["start"] != len(source):
            raise StoreError(
                f"{store_url} has an unfinished encode of {pending['source']} "
                f"(rows {pending['start']}-{pending['stop']}); re-run that encode to finish it "
                "first"
            )
        return store, int(pending["start"]), True
    if not append:
        if any(s["spec"] == source.spec for s in store.meta["sources"]):
            return None
        raise StoreError(f"{store_url} already exists; pass --append to add {source.spec} to it")
    new = set(source.ids)
    clash: list[str] = []
    for start, stop in store.each_shard():  # the store's ids, a shard at a time
        clash += [i for i in store.read_ids(start, stop) if i in new]
    if clash:
        raise StoreError(
            f"{len(clash)} ids of {source.spec} are already in {store_url} (e.g. {clash[0]!r}); "
            "ids must be unique in a store"
        )
    return store, store.count, False


def encode(
    model_dir: ModelLocation,
    source_spec: str,
    store_url: str,
    *,
    append: bool = False,
    limit: int | None = None,
    layout: Layout | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: ProgressCallback | None = None,
    size: tuple[int, int] | Literal["native"] | None = None,
    precision: Precision = "auto",
) -> EncodeResult:
    """Encode every image of a source into a store (see the module docstring). ``size``
    (height, width), for a model that takes any size (a diffusers autoencoder): the
    images are made that size by the conversion rule; ``"native"`` keeps the source's
    one size (refusing mixed sizes); default: the model's own. ``precision`` is the
    encoder's (:func:`latentbatch.engine.kernel.encode_precision` on each worker)."""
    model = read_once(model_dir, storage_options)  # the weights read once, here
    info = model.info
    if size is None:
        image = (info.config.image_size, info.config.image_size)
    else:
        image = native_size(source_spec) if size == "native" else size
    try:
        info.config.latent_shape_at(*image)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    geometry = Geometry.of(info.config, image)
    source = open_source(source_spec, geometry, limit)
    validate_ids(source.ids)
    with leased(store_url, f"encode of {source.spec}", storage_options) as lease:
        started = time.perf_counter()
        prepared = _prepare(store_url, info, source, append, layout, storage_options, image)
        if prepared is None:
            return EncodeResult(
                store=store_url,
                model_id=info.model_id,
                source=source.spec,
                rows=(0, 0),
                encoded=0,
                seconds=0.0,
                skipped=True,
            )
        store, base, resumed = prepared
        stop = base + len(source)
        labels = source.labels if source.labels is not None else np.full(len(source), -1, np.int32)
        store.write_meta(
            pending={
                "source": source.spec,
                "description": source.description,
                "start": base,
                "stop": stop,
            }
        )
        store.resize(stop)
        first_new = store.count
        shards = shard_ranges(store, first_new, stop)

        def jobs() -> Iterator[ShardJob]:  # drawn as tasks are submitted
            for a, b, keep in shards:
                s0, s1 = a + keep - base, b - base
                yield ShardJob(
                    store_url=store_url,
                    storage_options=dict(storage_options or {}),
                    model_id=info.model_id,
                    start=a,
                    stop=b,
                    keep=keep,
                    rows=source.ref(s0, s1),
                    ids=source.ids[s0:s1],
                    labels=tuple(int(v) for v in labels[s0:s1]),
                    fence=lease.fence(),
                    precision=precision,
                )

        with using(client, scheduler, workers) as c:
            started = time.perf_counter()  # throughput counts from a ready cluster
            # the decoder measures each row's PSNR as it is stored, and decodes the canary
            register_model(c, model, "encoder", "decoder")
            fill(
                c, store, lease, encode_shard, jobs(), totals=(len(shards), stop - first_new),
                items=lambda j: j.stop - j.start - j.keep, on_progress=on_progress,
                resources=gpu_resources(c), canary_of=info.model_id,
            )  # fmt: skip
        lease.check()
        sources = [
            *store.meta["sources"],
            {"spec": source.spec, "description": source.description, "rows": [base, stop]},
        ]
        store.write_meta(
            count=stop,
            pending=None,
            sources=sources,
            labels=bool(store.meta.get("labels")) or bool((labels >= 0).any()),
        )
        return EncodeResult(
            store=store_url,
            model_id=info.model_id,
            source=source.spec,
            rows=(base, stop),
            encoded=stop - first_new,
            seconds=time.perf_counter() - started,
            resumed=resumed,
            shards=len(shards),
            warning=scale_warning(store, "encode"),
        )


def encode_file(
    model: ModelLocation | LoadedModel,
    path: Path,
    expected_model_id: str | None = None,
    options: StorageOptions | None = None,
    image: tuple[int, int] | None = None,
) -> np.ndarray:
    """Encode one image file in this process: a float32 latent ``(C, h, w)``.

    The image is made ``image`` (height, width; a store's image size, so that it is
    encoded exactly as the store's rows were; default: the model's own size) by the
    conversion rule of :mod:`latentbatch.sources.images` (any size or mode), as an encode
    makes every image of a source. With ``expected_model_id`` (a store's), a model that
    did not make that store is refused. ``model`` is a location, or a model already
    loaded (:func:`latentbatch.models.weights.loaded`).
    """
    model = loaded(model, options)
    info = model.info
    if expected_model_id is not None and info.model_id != expected_model_id:
        raise StoreError(
            f"{info.location} is model {short_id(info.model_id)} but the store holds latents of "
            f"{short_id(expected_model_id)}; pass the model that made the store"
        )
    try:
        opened = open_image(Path(path), MAX_PIXELS)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc
    pixels = conform(opened, Geometry.of(info.config, image))
    latents: np.ndarray = encode_images(model.encoder, pixels[None], torch.device("cpu"))[0]
    return latents
