"""import-latents: latents made elsewhere (npy files, arrays, safetensors, WebDataset tars,
Zarr) into a latent store of the autoencoder that made them; leaves a summary and a
picture of the first rows decoded."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field

from flows.orchestration import (
    derived_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import ModelDir, Scheduler, StorageBlock, StoreUrl, Workers, described
from latentbatch.uses.import_latents import ImportResult, import_latents


@retrying_task("import")
def import_task(
    model_dir: str,
    source: str,
    store: str,
    latents: Literal["scaled", "raw"],
    scaling_factor: list[float] | None,
    shift_factor: list[float] | None,
    scheduler: str | None,
    workers: int | None,
    options: dict[str, Any] | None,
    convention: str = "model",
    latents_mean: list[float] | None = None,
    latents_std: list[float] | None = None,
    packed: bool = False,
) -> ImportResult:
    return import_latents(
        model_dir,
        source,
        store,
        latents=latents,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        convention=convention,
        latents_mean=latents_mean,
        latents_std=latents_std,
        packed=packed,
        storage_options=options,
        scheduler=scheduler,
        workers=workers,
    )


@flow(name="import-latents", log_prints=True)
@described
def import_latents_flow(
    source: Annotated[
        str,
        Field(
            description="The latents: a folder or .zip of .npy files (dataset.json labels), "
            ".npy/.npz, .safetensors, WebDataset .tar, or a Zarr store (PATH::ARRAY)"
        ),
    ] = "latents/",
    store: StoreUrl = "out/stores/imported.zarr",
    model_dir: ModelDir = "models/seed-mnist5k",
    latents: Annotated[
        Literal["scaled", "raw"],
        Field(description="scaled (as the diffusion model sees them) or raw (the autoencoder's)"),
    ] = "scaled",
    convention: Annotated[
        Literal["model", "sd", "sdxl", "sd3", "flux1", "flux2", "dc-ae", "qwen", "repa"],
        Field(description="The source's convention (the model's config fills what is not given)"),
    ] = "model",
    scaling_factor: Annotated[
        list[float] | None,
        Field(description="The source's scaling factor: one value, or one per channel"),
    ] = None,
    shift_factor: Annotated[
        list[float] | None,
        Field(description="The source's shift (or bias): one value, or one per channel"),
    ] = None,
    latents_mean: Annotated[
        list[float] | None, Field(description="The source's per-channel mean (sdxl, qwen)")
    ] = None,
    latents_std: Annotated[
        list[float] | None, Field(description="The source's per-channel std (sdxl, qwen)")
    ] = None,
    packed: Annotated[
        bool, Field(description="Sequence latents packed 2x2 (FLUX.1, Qwen-Image)")
    ] = False,
    scheduler: Scheduler = None,
    workers: Workers = None,
    storage_block: StorageBlock = None,
) -> dict[str, object]:
    options = storage_options(storage_block)
    result = import_task(
        model_dir, source, store, latents, scaling_factor, shift_factor, scheduler, workers,
        options, convention, latents_mean, latents_std, packed,
    )  # fmt: skip
    summary = result.to_dict()
    summary_artifact("import-summary", f"Imported into {store}", [summary])
    derived_artifact(
        "import-preview",
        "The first imported rows, decoded",
        model_dir,
        store,
        result.warning or f"{result.derived.rows} rows from {source} ({result.layout})",
        options,
    )
    if result.warning is not None:
        print(f"warning: {result.warning}")
    print(f"{result.derived.rows} rows in {store} ({result.derived.written} written now)")
    return summary


if __name__ == "__main__":
    import_latents_flow()
