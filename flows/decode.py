"""decode-latents: a latent store → image shards; leaves progress, a summary and a preview."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.orchestration import (
    ProgressReporter,
    preview_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import (
    DecodePrecision,
    ImageCodecName,
    ImagesPerShard,
    ModelDir,
    OutputFormat,
    Quality,
    Scheduler,
    StorageBlock,
    StoreUrl,
    Workers,
    described,
)
from latentbatch.choices import Format
from latentbatch.decode import DecodeResult, decode
from latentbatch.engine.kernel import Precision
from latentbatch.outputs.codecs import check_codec
from latentbatch.outputs.shards import read_output

PREVIEW = 16


@retrying_task("decode")
def decode_task(
    model_dir: str,
    store: str,
    out: str,
    output_format: Format,
    scheduler: str | None,
    workers: int | None,
    allow_model_mismatch: bool,
    image_codec: str = "png",
    quality: int | None = None,
    storage_block: str | None = None,
    images_per_shard: int | None = None,
    precision: Precision = "auto",
) -> DecodeResult:
    progress = ProgressReporter("decode-progress", f"Decoding {store} into {out}")
    return decode(
        model_dir,
        store,
        out,
        fmt=output_format,
        codec=check_codec(image_codec, quality),
        images_per_shard=images_per_shard,
        storage_options=storage_options(storage_block),
        scheduler=scheduler,
        workers=workers,
        allow_model_mismatch=allow_model_mismatch,
        on_progress=progress,
        precision=precision,
    )


def decode_summary(result: DecodeResult, store: str) -> dict[str, object]:
    return {
        "store": store,
        "out": result.out,
        "images": result.count,
        "decoded": result.decoded,
        "shards_written": len(result.shards_written),
        "shards_skipped": len(result.shards_skipped),
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "model_id": result.manifest.model_id,
        "canary": result.canary,
        "batches": result.batches,
        "fp32_again": result.fp32_again,
    }


@flow(name="decode-latents", log_prints=True)
@described
def decode_latents(
    model_dir: ModelDir = "models/seed-mnist5k",
    store: StoreUrl = "out/stores/mnist5k.zarr",
    out: Annotated[
        str, Field(description="Output folder: local path or s3:// URL")
    ] = "out/decoded/mnist5k",
    output_format: OutputFormat = "tar",
    scheduler: Scheduler = None,
    workers: Workers = None,
    allow_model_mismatch: Annotated[
        bool, Field(description="Decode a store of another model")
    ] = False,
    image_codec: ImageCodecName = "png",
    quality: Quality = None,
    storage_block: StorageBlock = None,
    images_per_shard: ImagesPerShard = None,
    precision: DecodePrecision = "auto",
) -> dict[str, object]:
    result = decode_task(
        model_dir,
        store,
        out,
        output_format,
        scheduler,
        workers,
        allow_model_mismatch,
        image_codec,
        quality,
        storage_block,
        images_per_shard,
        precision,
    )
    summary = decode_summary(result, store)
    summary_artifact("decode-summary", "Decode summary", [summary])
    ids, images = read_output(out, storage_options(storage_block), limit=PREVIEW)
    preview_artifact(
        "decode-preview",
        "Decoded images",
        [images[: PREVIEW // 2], images[PREVIEW // 2 :]],
        f"First {len(ids)} images of {out}: {', '.join(ids[:4])}, ...",
    )
    print(f"decoded {result.decoded} of {result.count} images into {out}")
    return summary


if __name__ == "__main__":
    decode_latents()
