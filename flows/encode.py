"""encode-images: a data source → a latent store; leaves a summary and a preview."""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow
from pydantic import Field

from flows.orchestration import (
    ProgressReporter,
    preview_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import DataSource, ModelDir, Scheduler, StorageBlock, StoreUrl, Workers, described
from latentbatch.encode import EncodeResult, encode
from latentbatch.engine.kernel import Precision
from latentbatch.previews import encode_preview

PREVIEW = 8


@retrying_task("encode")
def encode_task(
    model_dir: str,
    data: str,
    store: str,
    append: bool,
    scheduler: str | None,
    workers: int | None,
    storage_block: str | None = None,
    precision: Precision = "auto",
) -> EncodeResult:
    progress = ProgressReporter("encode-progress", f"Encoding {data} into {store}")
    return encode(
        model_dir,
        data,
        store,
        append=append,
        storage_options=storage_options(storage_block),
        scheduler=scheduler,
        workers=workers,
        on_progress=progress,
        precision=precision,
    )


@flow(name="encode-images", log_prints=True)
@described
def encode_images(
    model_dir: ModelDir = "models/seed-mnist5k",
    data: DataSource = "mnist5k",
    store: StoreUrl = "out/stores/mnist5k.zarr",
    append: Annotated[
        bool, Field(description="Add to an existing store of the same model")
    ] = False,
    scheduler: Scheduler = None,
    workers: Workers = None,
    storage_block: StorageBlock = None,
    precision: Annotated[
        Literal["auto", "fp32", "bf16", "fp16"],
        Field(
            description="The encoder's precision (auto: fp32 on CPU; on a GPU fp16, but fp32 "
            "for a model whose config says force_upcast)"
        ),
    ] = "auto",
) -> dict[str, object]:
    result = encode_task(
        model_dir, data, store, append, scheduler, workers, storage_block, precision
    )
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
    preview_artifact(
        "encode-preview",
        "Originals (top) and their stored latents decoded (bottom)",
        encode_preview(model_dir, data, store, PREVIEW, storage_options(storage_block)),
        f"First {PREVIEW} images of {data} in {store}.",
    )
    print(f"encoded {result.encoded} images of {data} into {store}")
    return summary


if __name__ == "__main__":
    encode_images()
