"""The canary's worker task: decode a store's canary rows where the decodes run.

:mod:`latentbatch.canary` keeps and compares a store's canary; this module decodes its
rows with a model's decoder: on a Dask worker (:func:`canary_on`, the worker side
:func:`decode_canary`, with the decoder the worker's plugin holds) for encodes and
decodes, or in this process (:func:`canary_pixels`) for the in-process decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from distributed import Client

from latentbatch.cluster import gpu_resources, run_task
from latentbatch.kernel import decode_latents, finite_rows
from latentbatch.store import LatentStore, open_store
from latentbatch.workers import cached_model


@dataclass(frozen=True, kw_only=True)
class CanaryJob:
    """The canary rows of a store, to decode with a model's decoder on a worker."""

    store_url: str
    storage_options: dict[str, Any]
    model_id: str
    rows: tuple[int, ...]


def canary_pixels(
    decoder: torch.nn.Module, store: LatentStore, rows: Sequence[int], device: torch.device
) -> np.ndarray | None:
    """The canary ``rows`` of ``store`` decoded as a decode task would, in row order;
    None when a canary row's latents hold NaN or Inf (the decode task of its shard
    refuses it, naming every such row of the shard)."""
    ordered = sorted(rows)
    parts = []
    for first in sorted({r - r % store.shard_rows for r in ordered}):  # a read per shard,
        inside = [r - first for r in ordered if first <= r < first + store.shard_rows]
        block = store.read_latents(first + inside[0], first + inside[-1] + 1)  # so that an
        parts.append(block[[i - inside[0] for i in inside]])  # error names a row range
    latents = np.concatenate(parts)
    if not finite_rows(latents.reshape(len(latents), -1)).all():
        return None
    return decode_latents(decoder, latents.astype(np.float32), device)


def decode_canary(job: CanaryJob) -> tuple[np.ndarray | None, str]:
    """Worker side: :func:`canary_pixels` with the worker's decoder, and the device that
    decoded them."""
    decoder, device = cached_model(job.model_id, "decoder")
    store = open_store(job.store_url, job.storage_options)
    return canary_pixels(decoder, store, job.rows, device), str(device)


def canary_on(
    client: Client, store: LatentStore, model_id: str, rows: list[int]
) -> tuple[np.ndarray | None, str]:
    """The canary ``rows`` decoded on one of ``client``'s workers (a GPU one when there
    is one), whose decoder plugin is registered (see :func:`decode_canary`)."""
    job = CanaryJob(
        store_url=store.url,
        storage_options=dict(store.storage_options),
        model_id=model_id,
        rows=tuple(rows),
    )
    pixels, device = run_task(client, decode_canary, job, resources=gpu_resources(client))
    return pixels, device
