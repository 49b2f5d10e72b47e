"""A latent store → image shards, one Dask task per store shard.

::

    client                                      worker (decoder loaded once by ModelPlugin)
    ──────                                      ──────
    open store, check model id and shapes
    validate every id (safe file names)
    read OUT's manifest and shard records
    submit DecodeJob(rows, paths)  ───────────►  read its rows' latents and ids (one shard)
      only for shards not finished,              refuse NaN/Inf rows
      a bounded number in flight                 decode in batches (inference_mode,
                                                   autocast on CUDA) while a thread pool
                                                   encodes the previous batch to PNG
                                                 write the shard (temp name → rename),
    ◄──────────────────────────────────────────    then its record; return the record
    progress: images, images/s, ETA
    remove temporaries; write manifest.json last

Output shards follow store shards, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client

from latentbatch.checkpoint import read_info
from latentbatch.cluster import (
    Progress,
    cached_model,
    gpu_resources,
    map_bounded,
    register_model,
    using,
)
from latentbatch.errors import LatentbatchError
from latentbatch.ids import validate_ids
from latentbatch.quality import to_uint8
from latentbatch.shards import (
    FORMATS,
    MANIFEST_FORMAT,
    PNG_COMPRESS_LEVEL,
    Format,
    OutputError,
    ShardRecord,
    create_zarr_output,
    encode_png,
    read_manifest,
    read_records,
    remove_temporaries,
    write_manifest,
    write_png_shard,
    write_record,
    write_tar_shard,
    write_zarr_shard,
)
from latentbatch.storage import StorageOptions, is_remote
from latentbatch.store import StoreError, open_store

DECODE_BATCH = 256
CUDA_DECODE_BATCH = 4096


def batch_for(device: torch.device) -> int:
    """Latents per decoder call when none is asked for: small on CPU (cache-friendly),
    large on a GPU (to fill it)."""
    return CUDA_DECODE_BATCH if device.type == "cuda" else DECODE_BATCH


ProgressCallback = Callable[[Progress], None]


class ModelMismatchError(LatentbatchError):
    """The store was encoded by another model."""


class NonFiniteLatentsError(LatentbatchError):
    """Latents hold NaN or Inf."""


@dataclass(frozen=True)
class DecodeJob:
    """One decode task: store rows ``[start, stop)`` → output shard ``index``."""

    store_url: str
    storage_options: dict[str, Any]
    model_id: str
    index: int
    start: int
    stop: int
    out_url: str
    out_options: dict[str, Any]
    fmt: Format
    identity: dict[str, Any]
    batch_size: int | None = None


@dataclass(frozen=True)
class DecodeResult:
    out: str
    manifest: dict[str, Any]
    count: int
    decoded: int
    shards_written: tuple[int, ...]
    shards_skipped: tuple[int, ...]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0


@cache
def _png_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="latentbatch-png")


def decode_latents(
    decoder: torch.nn.Module,
    latents: np.ndarray,
    device: torch.device,
    batch_size: int = DECODE_BATCH,
    on_batch: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Latents ``(n, C, h, w)`` → ``uint8 (n, H, W, C)`` images, quantised by rounding.

    Batches of ``batch_size`` are decoded in float32 on CPU (autocast to float16 on CUDA),
    channels-last: load the decoder with :func:`latentbatch.checkpoint.load_model`, which
    makes it channels-last (it is never changed here: worker threads share it).
    ``on_batch`` sees each batch's images as soon as they exist. On CPU the result is
    bit-identical whatever the thread count or batch size (tested).
    """
    out = []
    with torch.inference_mode():
        for i in range(0, len(latents), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(latents[i : i + batch_size])).to(device)
            batch = batch.float().contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                images = decoder(batch)
            pixels = to_uint8(images).cpu().numpy()
            if on_batch is not None:
                on_batch(pixels)
            out.append(pixels)
    return np.concatenate(out)


def nonfinite_rows(latents: np.ndarray, start: int) -> list[int]:
    """Global row numbers of latents holding NaN or Inf."""
    bad = ~np.isfinite(latents.reshape(len(latents), -1)).all(axis=1)
    return [start + int(i) for i in np.flatnonzero(bad)]


def decode_shard(job: DecodeJob) -> dict[str, Any]:
    """Worker side: decode one shard and write it; return its record."""
    model, device = cached_model(job.model_id)
    store = open_store(job.store_url, job.storage_options)
    latents = store.read_latents(job.start, job.stop)
    ids = store.read_ids(job.start, job.stop)
    bad = nonfinite_rows(latents, job.start)
    if bad:
        shown = ", ".join(f"{r} ({ids[r - job.start]})" for r in bad[:5])
        raise NonFiniteLatentsError(
            f"{len(bad)} latents in rows [{job.start}, {job.stop}) of {job.store_url} hold NaN or "
            f"Inf: rows {shown}{' ...' if len(bad) > 5 else ''}; re-encode those images"
        )
    pngs: list[Any] = []
    encode_pngs = job.fmt != "zarr"

    def queue_pngs(batch: np.ndarray) -> None:
        if encode_pngs:
            pngs.extend(_png_pool().submit(encode_png, image) for image in batch)

    batch_size = job.batch_size or batch_for(device)
    images = decode_latents(model.decoder, latents, device, batch_size, queue_pngs)
    if job.fmt == "zarr":
        record = write_zarr_shard(job.out_url, job.out_options, job.index, job.start, images)
    else:
        data = [f.result() for f in pngs]
        if job.fmt == "tar":
            labels = store.read_labels(job.start, job.stop).tolist() if store.has_labels else None
            record = write_tar_shard(
                job.out_url, job.out_options, job.index, job.start, ids, data, labels
            )
        else:
            record = write_png_shard(job.out_url, job.out_options, job.index, job.start, ids, data)
    write_record(job.out_url, job.out_options, record, job.identity)
    return record.to_dict()


def _absolute(url: str) -> str:
    return url if is_remote(url) else str(Path(url).resolve())


def decode(
    model_dir: Path,
    store_url: str,
    out_url: str,
    *,
    fmt: Format = "tar",
    allow_model_mismatch: bool = False,
    storage_options: StorageOptions | None = None,
    out_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> DecodeResult:
    """Decode the committed rows of a store into ``out_url`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise OutputError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out_options = storage_options if out_options is None else out_options
    info = read_info(model_dir)
    store = open_store(store_url, storage_options)
    if store.model_id != info.model_id and not allow_model_mismatch:
        raise ModelMismatchError(
            f"{store_url} was encoded by model {store.model_id} but the model given is "
            f"{info.model_id}; pass --allow-model-mismatch to decode anyway"
        )
    if store.latent_shape != info.config.latent_shape:
        raise StoreError(
            f"{store_url} holds latents of shape {store.latent_shape} (C, h, w) but the decoder "
            f"of {model_dir} takes {info.config.latent_shape}; use the model that made the store"
        )
    if store.count == 0:
        raise StoreError(f"{store_url} has no committed rows to decode")
    validate_ids(store.read_ids(0, store.count))

    source = {"url": _absolute(store_url), "uuid": store.uuid, "count": store.count}
    identity = {"store_uuid": store.uuid, "model_id": info.model_id, "format": fmt}
    manifest = read_manifest(out_url, out_options)
    if manifest is not None:
        theirs = manifest.get("store", {})
        if theirs.get("uuid") != store.uuid:
            raise OutputError(
                f"{out_url} holds the decode of another store ({theirs.get('url')}); "
                "choose another --out or remove that output"
            )
        if manifest.get("model_id") != info.model_id or manifest.get("output_format") != fmt:
            raise OutputError(
                f"{out_url} holds a {manifest.get('output_format')} decode by model "
                f"{str(manifest.get('model_id'))[:12]}; choose another --out"
            )
    started = time.perf_counter()
    ranges = store.shards()
    done = read_records(out_url, out_options, identity)
    done = {i: r for i, r in done.items() if i < len(ranges) and (r.start, r.stop) == ranges[i]}
    if fmt == "zarr":
        config = info.config
        shape = (config.image_size, config.image_size, config.channels)
        layout = store.meta["layout"]
        create_zarr_output(
            out_url, out_options, store.count, shape, layout["shard_rows"], layout["chunk_rows"]
        )
    jobs = [
        DecodeJob(
            store_url,
            dict(storage_options or {}),
            info.model_id,
            index,
            a,
            b,
            out_url,
            dict(out_options or {}),
            fmt,
            identity,
            batch_size,
        )
        for index, (a, b) in enumerate(ranges)
        if index not in done
    ]
    written: dict[int, ShardRecord] = {}

    def collect(record: dict[str, Any], progress: Progress) -> None:
        written[record["index"]] = ShardRecord.from_dict(record)
        if on_progress is not None:
            on_progress(progress)

    def run(c: Client) -> None:
        nonlocal started
        started = time.perf_counter()  # throughput counts from a ready cluster
        register_model(c, info)
        slots = max_in_flight or 2 * max(1, len(c.scheduler_info(n_workers=-1)["workers"]))
        map_bounded(
            c,
            decode_shard,
            jobs,
            items=lambda j: j.stop - j.start,
            max_in_flight=slots,
            resources=gpu_resources(c),
            on_result=collect,
        )

    if jobs:
        with using(client, scheduler, workers) as c:
            run(c)
    remove_temporaries(out_url, out_options)
    records = {**done, **written}
    manifest = {
        "format": MANIFEST_FORMAT,
        "store": source,
        "model_id": info.model_id,
        "output_format": fmt,
        "format_settings": {
            "png_compress_level": PNG_COMPRESS_LEVEL,
            "batch_size": batch_size or "auto",
        },
        "count": store.count,
        "shards": [records[i].to_dict() for i in sorted(records)],
    }
    write_manifest(out_url, out_options, manifest)
    decoded = sum(r.count for r in written.values())
    return DecodeResult(
        out_url,
        manifest,
        store.count,
        decoded,
        tuple(sorted(written)),
        tuple(sorted(done)),
        time.perf_counter() - started,
    )
