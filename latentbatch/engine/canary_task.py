"""The canary's worker task: decode a store's canary rows where the decodes run.

:mod:`latentbatch.stores.canary` keeps and compares a store's canary; this module decodes its
rows with a model's decoder: on a Dask worker (:func:`canary_on`, the worker side
:func:`decode_canary`, with the decoder the worker's plugin holds) when an encode records
the canary, and before every decode: once on one worker before anything of the output
exists (:func:`check_first`), then on each worker before its first shard
(:func:`check_on_worker`, once per worker process), or in this process
(:func:`check_here`) for the in-process decodes. Canary rows whose latents are not finite
are left out of the comparison, never the whole canary (:func:`canary_pixels`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from distributed import Client, get_worker

from latentbatch.engine.cluster import gpu_resources, run_task
from latentbatch.engine.kernel import decode_latents, finite_rows
from latentbatch.engine.workers import cached_model
from latentbatch.stores.canary import CanaryError, CanaryResult, check_canary
from latentbatch.stores.store import LatentStore, open_store


@dataclass(frozen=True, kw_only=True)
class CanaryJob:
    """The canary rows of a store, to decode with a model's decoder on a worker."""

    store_url: str
    storage_options: dict[str, Any]
    model_id: str
    rows: tuple[int, ...]
    run: str = ""  # the decode run whose first check this is


@dataclass(frozen=True, kw_only=True)
class CanaryPixels:
    """Canary rows decoded: the ``rows`` whose latents are finite (the others are left
    out of any comparison, and refused by the decode task of their shard), their
    ``pixels`` in that order, and the device that decoded them."""

    rows: tuple[int, ...]
    pixels: np.ndarray
    device: str


def _job(store: LatentStore, model_id: str, rows: Sequence[int], run: str = "") -> CanaryJob:
    return CanaryJob(
        store_url=store.url,
        storage_options=dict(store.storage_options),
        model_id=model_id,
        rows=tuple(rows),
        run=run,
    )


def canary_pixels(
    decoder: torch.nn.Module, store: LatentStore, rows: Sequence[int], device: torch.device
) -> CanaryPixels:
    """The canary ``rows`` of ``store`` decoded as a decode task would, in row order,
    leaving out the rows whose latents hold NaN or Inf."""
    ordered = sorted(rows)
    parts = []
    for first in sorted({r - r % store.shard_rows for r in ordered}):  # a read per shard,
        inside = [r - first for r in ordered if first <= r < first + store.shard_rows]
        block = store.read_latents(first + inside[0], first + inside[-1] + 1)  # so that an
        parts.append(block[[i - inside[0] for i in inside]])  # error names a row range
    latents = np.concatenate(parts) if parts else np.zeros((0, *store.latent_shape))
    finite = finite_rows(latents.reshape(len(latents), -1))
    kept = latents[finite].astype(np.float32)
    pixels = (
        decode_latents(decoder, kept, device) if len(kept) else np.zeros((0, 0, 0, 0), np.uint8)
    )
    used = tuple(r for r, ok in zip(ordered, finite.tolist(), strict=True) if ok)
    return CanaryPixels(rows=used, pixels=pixels, device=str(device))


def check_here(decoder: torch.nn.Module, store: LatentStore, device: torch.device) -> CanaryResult:
    """The store's canary decoded by ``decoder`` in this process and compared with the
    recorded pixels; a drift raises :class:`~latentbatch.stores.canary.CanaryError`."""
    decoded = canary_pixels(decoder, store, store.meta["canary"]["rows"], device)
    return check_canary(store, decoded.pixels, decoded.rows)


_CHECKED: OrderedDict[str, CanaryResult] = OrderedDict()  # by decode run, this process
_REMEMBERED_RUNS = 64


def check_on_worker(store: LatentStore, model_id: str, run: str) -> CanaryResult:
    """Worker side of every decode task: :func:`check_here` with the worker's decoder,
    once per worker process and decode ``run``, before the task decodes anything (a
    worker with another torch, or a faulty GPU, is stopped at its first shard). A refusal
    names the worker."""
    if run not in _CHECKED:
        decoder, device = cached_model(model_id, "decoder")
        try:
            _CHECKED[run] = check_here(decoder, store, device)
        except CanaryError as exc:  # other workers may have written shards by now
            said = str(exc).replace("nothing was decoded", "this worker decoded nothing")
            raise CanaryError(f"Dask worker {_worker_name()}: {said}") from None
        while len(_CHECKED) > _REMEMBERED_RUNS:
            _CHECKED.popitem(last=False)
    return _CHECKED[run]


def _worker_name() -> str:
    try:
        return str(get_worker().name)
    except ValueError:
        return "(this process)"


def decode_canary(job: CanaryJob) -> CanaryPixels:
    """Worker side: :func:`canary_pixels` with the worker's decoder."""
    decoder, device = cached_model(job.model_id, "decoder")
    store = open_store(job.store_url, job.storage_options)
    return canary_pixels(decoder, store, job.rows, device)


def canary_on(client: Client, store: LatentStore, model_id: str, rows: list[int]) -> CanaryPixels:
    """The canary ``rows`` decoded on one of ``client``'s workers (a GPU one when there
    is one), whose decoder plugin is registered (see :func:`decode_canary`)."""
    job = _job(store, model_id, rows)
    decoded: CanaryPixels = run_task(client, decode_canary, job, resources=gpu_resources(client))
    return decoded


def _check_remotely(job: CanaryJob) -> CanaryResult:
    store = open_store(job.store_url, job.storage_options)
    return check_on_worker(store, job.model_id, job.run)


def check_first(client: Client, store: LatentStore, model_id: str, run: str) -> CanaryResult:
    """The first check of a decode, on one worker (a GPU one when there is one) before
    anything of the output is created; every other worker checks at its first shard."""
    job = _job(store, model_id, store.meta["canary"]["rows"], run)
    result: CanaryResult = run_task(client, _check_remotely, job, resources=gpu_resources(client))
    return result
