"""reconstruction-pipeline: train (or reuse), encode, decode, measure: the main job.

Run it directly (``python -m flows.pipeline``) for the main job: it prints the flow run's
id, the output locations and the summary table. The chain itself is
:func:`latentbatch.pipeline.run_pipeline`, the same one ``latentbatch demo`` runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from pydantic import Field

from flows.orchestration import (
    ProgressReporter,
    picture_artifact,
    preview_artifact,
    summary_artifact,
)
from flows.params import DataSource, Scheduler, Workers, described
from latentbatch.models.checkpoint import CURVES, RECONSTRUCTIONS
from latentbatch.pipeline import PipelineResult, run_pipeline
from latentbatch.previews import output_preview
from latentbatch.progress import VERBOSE_ENV

PREVIEW = 8


@task(name="run-pipeline", cache_policy=NO_CACHE)
def pipeline_task(
    data: str,
    preset: str,
    epochs: int,
    seed: int,
    workdir: str,
    scheduler: str | None,
    workers: int | None,
) -> PipelineResult:
    return run_pipeline(
        Path(workdir),
        source=data,
        preset=preset,
        epochs=epochs,
        seed=seed,
        scheduler=scheduler,
        workers=workers,
        progress=False,
        on_decode_progress=ProgressReporter("pipeline-progress", f"Decoding {data}"),
    )


@flow(name="reconstruction-pipeline", log_prints=True)
@described
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
    result = pipeline_task(data, preset, epochs, seed, workdir, scheduler, workers)
    summary = result.summary()
    summary_artifact("pipeline-summary", "Reconstruction pipeline summary", [summary])
    picture_artifact(
        "pipeline-reconstructions",
        "Validation originals (top) and reconstructions (bottom)",
        result.training.reconstructions,
    )
    preview_artifact(
        "pipeline-preview",
        "Originals (top) and decoded reconstructions (bottom)",
        output_preview(result.training.model_dir, data, result.out, PREVIEW),
        f"{PREVIEW} images of {data} after train → encode → decode.",
    )
    run = FlowRunContext.get()
    run_id = str(run.flow_run.id) if run is not None and run.flow_run is not None else ""
    get_run_logger().info("flow run %s finished: %s", run_id, summary)
    return {**summary, "flow_run_id": run_id}


def main(argv: list[str]) -> None:
    """The main job: run the flow on embedded defaults and print what it made
    (``-v``: Dask's INFO logs too)."""
    if "-v" in argv or "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"
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
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"  {key:<26} {shown}")


if __name__ == "__main__":
    main(sys.argv[1:])
