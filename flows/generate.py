"""generate-latents: draw new latents per label from a store's fitted Gaussians into a
derived store; leaves a summary and a picture (a line of generated images per label)."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.orchestration import (
    derived_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import ModelDir, Scheduler, StorageBlock, StoreUrl, Workers, described
from latentbatch.uses.derive import DeriveResult
from latentbatch.uses.generation import generate


@retrying_task("generate")
def generate_task(
    reference: str,
    store: str,
    count: int,
    labels: list[int] | None,
    seed: int,
    temperature: float,
    model_dir: str,
    scheduler: str | None,
    workers: int | None,
    options: dict[str, Any] | None,
) -> DeriveResult:
    return generate(
        reference,
        store,
        count=count,
        labels=labels,
        seed=seed,
        temperature=temperature,
        model=model_dir,
        storage_options=options,
        scheduler=scheduler,
        workers=workers,
    )


@flow(name="generate-latents", log_prints=True)
@described
def generate_latents(
    reference: Annotated[
        str, Field(description="The store whose latents (and labels) are fitted")
    ] = "out/stores/mnist5k.zarr",
    store: StoreUrl = "out/stores/generated.zarr",
    model_dir: ModelDir = "models/seed-mnist5k",
    count: Annotated[int, Field(ge=1, le=1_000_000, description="Samples per label")] = 100,
    labels: Annotated[
        list[int] | None, Field(description="Only these labels (empty: every label)")
    ] = None,
    seed: Annotated[int, Field(description="The same seed writes the same store")] = 0,
    temperature: Annotated[
        float, Field(gt=0, le=4, description="Below 1: samples nearer their label's mean")
    ] = 1.0,
    scheduler: Scheduler = None,
    workers: Workers = None,
    storage_block: StorageBlock = None,
) -> dict[str, object]:
    options = storage_options(storage_block)
    result = generate_task(
        reference, store, count, labels, seed, temperature, model_dir, scheduler, workers, options
    )
    summary = result.to_dict()
    summary_artifact("generate-summary", f"Generated into {store}", [summary])
    derived_artifact(
        "generate-preview",
        "Generated images, a line per label",
        model_dir,
        store,
        f"The first samples of each label of {store} (seed {seed}, temperature {temperature})",
        options,
    )
    print(f"{result.rows} samples in {store} ({result.written} written now)")
    return summary


if __name__ == "__main__":
    generate_latents()
