"""evaluate-model: a model's stored bits per pixel, PSNR and MS-SSIM beside JPEG and WebP;
leaves the table and the rate-distortion plot."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.orchestration import picture_artifact, storage_options, summary_artifact
from flows.params import DataSource, ModelDir, StorageBlock, described
from latentbatch.choices import QUALITIES
from latentbatch.evaluation import Evaluation, evaluate
from latentbatch.figures import save_rate_distortion
from latentbatch.ids import short_id


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    model_dir: str,
    data: str,
    split: Literal["validation", "all"],
    qualities: tuple[int, ...],
    storage_block: str | None,
) -> Evaluation:
    return evaluate(
        model_dir, data, split=split, qualities=qualities, options=storage_options(storage_block)
    )


@flow(name="evaluate-model", log_prints=True)
@described
def evaluate_model(
    model_dir: ModelDir = "models/seed-mnist5k",
    data: DataSource = "mnist5k",
    split: Annotated[
        Literal["validation", "all"],
        Field(description="validation: the training's held-out rows; all: every image"),
    ] = "validation",
    qualities: Annotated[
        tuple[int, ...], Field(description="JPEG and WebP qualities to compare with (1-100)")
    ] = QUALITIES,
    storage_block: StorageBlock = None,
) -> dict[str, Any]:
    result = evaluate_task(model_dir, data, split, qualities, storage_block)
    rows = [
        {key: round(value, 4) if isinstance(value, float) else value for key, value in r.items()}
        for r in result.rows()
    ]
    summary_artifact("evaluate-table", "Rate and distortion", rows)
    title = f"{data} ({result.split}, {result.images} images)"
    with tempfile.TemporaryDirectory() as folder:
        plot = Path(folder) / "rate-distortion.png"
        save_rate_distortion(result.curves(), plot, title)
        picture_artifact(
            "evaluate-plot",
            "Rate-distortion: PSNR and MS-SSIM against stored bits per pixel",
            plot,
            f"Model {short_id(result.models[0].model_id)} on {title}; JPEG and WebP from Pillow.",
        )
    model = result.model
    print(f"{model.bpp:.3f} bits/pixel, {model.psnr:.2f} dB, MS-SSIM {model.ms_ssim:.4f}")
    return result.to_dict()


if __name__ == "__main__":
    evaluate_model()
