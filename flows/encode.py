"""encode-images: a data source → a latent store; leaves a summary and a preview."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.params import DataSource, ModelDir, Scheduler, StoreUrl, Workers
from latentbatch.checkpoint import load_model
from latentbatch.datasets import Geometry, open_source
from latentbatch.decode import decode_latents
from latentbatch.encode import EncodeResult, encode
from latentbatch.orchestration import (
    ProgressReporter,
    preview_artifact,
    retry_transient,
    summary_artifact,
)
from latentbatch.store import open_store

PREVIEW = 8


@task(
    name="encode",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def encode_task(
    model_dir: str, data: str, store: str, append: bool, scheduler: str | None, workers: int | None
) -> EncodeResult:
    progress = ProgressReporter("encode-progress", f"Encoding {data} into {store}")
    return encode(
        Path(model_dir),
        data,
        store,
        append=append,
        scheduler=scheduler,
        workers=workers,
        on_progress=progress,
    )


@flow(name="encode-images", log_prints=True)
def encode_images(
    model_dir: ModelDir = "models/seed-mnist5k",
    data: DataSource = "mnist5k",
    store: StoreUrl = "out/stores/mnist5k.zarr",
    append: Annotated[
        bool, Field(description="Add to an existing store of the same model")
    ] = False,
    scheduler: Scheduler = None,
    workers: Workers = None,
) -> dict[str, object]:
    result = encode_task(model_dir, data, store, append, scheduler, workers)
    summary = {
        "store": store,
        "source": data,
        "rows": f"{result.rows[0]}-{result.rows[1]}",
        "images": result.encoded,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "model_id": result.model_id,
        "resumed": result.resumed,
        "already_encoded": result.skipped,
    }
    summary_artifact("encode-summary", "Encode summary", [summary])
    model, info = load_model(Path(model_dir))
    opened = open_store(store)
    source = open_source(
        data, Geometry(info.config.image_size, info.config.channels), limit=PREVIEW
    )
    start = result.rows[0] if not result.skipped else 0
    latents = opened.read_latents(start, start + PREVIEW)
    preview_artifact(
        "encode-preview",
        "Originals (top) and their stored latents decoded (bottom)",
        [source.read(0, PREVIEW), decode_latents(model.decoder, latents, torch.device("cpu"))],
        f"First {PREVIEW} images of {data} in {store}.",
    )
    print(f"encoded {result.encoded} images of {data} into {store}")
    return summary


if __name__ == "__main__":
    encode_images()
