"""reconstruction-pipeline: train (or reuse), encode, decode: the end-to-end demo.

Run it directly (``python -m flows.pipeline``) for the main job: it prints the flow run's
id, the output locations and the summary table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from pydantic import Field

from flows.decode import decode_latents
from flows.encode import encode_images
from flows.params import DataSource, Scheduler, Workers
from flows.train import train_autoencoder
from latentbatch.checkpoint import CURVES, RECONSTRUCTIONS, read_info
from latentbatch.datasets import Geometry, open_source
from latentbatch.orchestration import preview_artifact, summary_artifact
from latentbatch.pipeline import Quality, measure_quality
from latentbatch.shards import read_output

PREVIEW = 8


@task(name="measure-quality", cache_policy=NO_CACHE)
def quality_task(model_dir: str, data: str, out: str) -> Quality:
    return measure_quality(Path(model_dir), data, out)


@flow(name="reconstruction-pipeline", log_prints=True)
def reconstruction_pipeline(
    data: DataSource = "mnist5k",
    preset: Annotated[str, Field(description="seed or compact")] = "seed",
    epochs: Annotated[int, Field(ge=1, description="Training epochs")] = 10,
    seed: Annotated[int, Field(description="Training seed")] = 0,
    workdir: Annotated[
        str, Field(description="Where the model, store and output go")
    ] = "out/pipeline",
    scheduler: Scheduler = None,
    workers: Workers = None,
) -> dict[str, object]:
    model_dir = f"{workdir}/models/{preset}-{data}"
    store = f"{workdir}/{data}-{preset}.zarr"
    out = f"{workdir}/{data}-{preset}-decoded"
    trained = train_autoencoder(data, preset, epochs, seed, model_dir)  # type: ignore[arg-type]
    encoded = encode_images(model_dir, data, store, False, scheduler, workers)
    decoded = decode_latents(
        model_dir, store, out, "tar", scheduler, workers, False, return_state=True
    )
    if not decoded.is_completed():
        raise RuntimeError(f"decode-latents ended {decoded.name}: {decoded.message}")
    decoded_summary = decoded.result()
    quality = quality_task(model_dir, data, out)
    summary = {
        "model_id": trained["model_id"],
        "val_psnr_db": trained["val_psnr_db"],
        "images": decoded_summary["images"],
        "encoded_this_run": encoded["images"],
        "decode_images_per_second": decoded_summary["images_per_second"],
        "psnr_decoded_db": round(quality.pipeline_psnr, 3),
        "psnr_float32_db": round(quality.float32_psnr, 3),
        "psnr_cost_db": round(quality.cost_db, 3),
        "model_dir": model_dir,
        "store": store,
        "out": out,
    }
    summary_artifact("pipeline-summary", "Reconstruction pipeline summary", [summary])
    info = read_info(Path(model_dir))
    source = open_source(
        data, Geometry(info.config.image_size, info.config.channels), limit=PREVIEW
    )
    _, decoded_images = read_output(out, limit=PREVIEW)
    preview_artifact(
        "pipeline-preview",
        "Originals (top) and decoded reconstructions (bottom)",
        [source.read(0, PREVIEW), decoded_images],
        f"{PREVIEW} images of {data} after train → encode → decode.",
    )
    run = get_run_context()
    get_run_logger().info("flow run %s finished: %s", run.flow_run.id, summary)  # type: ignore[union-attr]
    return {**summary, "flow_run_id": str(run.flow_run.id)}  # type: ignore[union-attr]


def main() -> None:
    """The main job: run the flow on embedded defaults and print what it made."""
    summary = reconstruction_pipeline()
    print(f"\nflow run {summary['flow_run_id']} (reconstruction-pipeline)")
    ui = os.environ.get("PREFECT_UI_URL")
    if ui:
        print(f"  {ui.rstrip('/')}/runs/flow-run/{summary['flow_run_id']}")
    model_dir = Path(str(summary["model_dir"]))
    print(f"  model      {model_dir} (model.safetensors, config.json)")
    print(f"  pictures   {model_dir / RECONSTRUCTIONS}, {model_dir / CURVES}")
    print(f"  store      {summary['store']}")
    print(f"  decoded    {summary['out']} (tar shards, manifest.json)")
    print("\nsummary")
    for key, value in summary.items():
        if key not in ("model_dir", "store", "out", "flow_run_id"):
            print(f"  {key:<26} {value}")


if __name__ == "__main__":
    main()
