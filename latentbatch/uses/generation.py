"""Generate: draw new latents from each label's Gaussian of a reference store
(:mod:`latentbatch.uses.fit`) into a derived store (:mod:`latentbatch.uses.derive`).

Rows come label by label, ``count`` of each, with ids ``sample-L3-000017`` (``sample-
000017`` for a store without labels) and the label asked for. Each shard's rows are
drawn by a generator seeded with ``(seed, the shard's first row)``, so a store is the
same whatever the workers. The fit is written into the new store before any task runs,
and each task reads it there (:func:`latentbatch.uses.fit.keep_fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client

from latentbatch.errors import LatentbatchError
from latentbatch.models.checkpoint import ModelLocation
from latentbatch.progress import Progress
from latentbatch.storage.fs import StorageOptions
from latentbatch.stores.store import LatentStore, open_store
from latentbatch.uses.derive import DeriveResult, Lineage, Parent, derive, is_kept, like
from latentbatch.uses.fit import FIT, UNLABELLED, fit_latents, keep_fit, kept_fit, requested_labels

MAX_COUNT = 1_000_000


class GenerateError(LatentbatchError):
    """A generate asked for something it cannot draw."""


def sample_id(label: int, index: int) -> str:
    """``sample-L3-000017``; ``sample-000017`` without a label."""
    return f"sample-{index:06d}" if label == UNLABELLED else f"sample-L{label}-{index:06d}"


@dataclass(frozen=True, kw_only=True)
class SamplePart:
    """Rows ``[start, stop)`` of a generate: ``count`` rows per label of ``labels``, drawn
    from the fit that the derived store ``store_url`` (of ``uuid``) keeps."""

    store_url: str
    uuid: str
    storage_options: dict[str, Any]
    labels: tuple[int, ...]
    count: int
    seed: int
    temperature: float
    start: int
    stop: int

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        rows = np.arange(self.start, self.stop)
        labels = np.asarray(self.labels, np.int64)[rows // self.count]
        rng = np.random.default_rng([self.seed, self.start])
        fit = kept_fit(self.store_url, self.uuid, self.storage_options)
        latents = fit.sample(labels, rng, self.temperature)
        ids = [
            sample_id(int(label), int(row % self.count))
            for label, row in zip(labels, rows, strict=True)
        ]
        return latents, ids, labels


def generate(
    reference_url: str,
    store_url: str,
    *,
    count: int,
    labels: Sequence[int] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    model: ModelLocation | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DeriveResult:
    """``count`` new latents per label (every label of the reference when none is
    given) into the derived store ``store_url``."""
    if not 1 <= count <= MAX_COUNT:
        raise GenerateError(f"--count {count} must lie between 1 and {MAX_COUNT:,}")
    if not 0 < temperature <= 4:
        raise GenerateError(f"--temperature {temperature} must lie in (0, 4]; 1 draws as fitted")
    reference = open_store(reference_url, storage_options)
    fit = fit_latents(reference)
    chosen = tuple(requested_labels(fit, labels))
    lineage = Lineage(
        operation="generate",
        parameters={
            "count": count,
            "labels": list(chosen),
            "temperature": temperature,
            "method": f"a Gaussian per label in the top {fit.rank} principal directions",
        },
        seed=seed,
        parents=(Parent.of(reference),),
    )
    made: list[LatentStore] = []

    def setup(out: LatentStore) -> None:
        made.append(out)
        if not is_kept(out, FIT):
            keep_fit(out, fit)

    return derive(
        store_url,
        create=lambda meta: like(reference, store_url, count * len(chosen), storage_options, meta),
        model_id=reference.model_id,
        lineage=lineage,
        rows=count * len(chosen),
        part=lambda a, b: SamplePart(
            store_url=store_url,
            uuid=made[0].uuid,
            storage_options=dict(storage_options or {}),
            labels=chosen,
            count=count,
            seed=seed,
            temperature=temperature,
            start=a,
            stop=b,
        ),
        setup=setup,
        model=model,
        storage_options=storage_options,
        client=client,
        scheduler=scheduler,
        workers=workers,
        on_progress=on_progress,
    )
