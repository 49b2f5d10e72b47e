"""train-autoencoder: train (or resume) a model; leaves a summary, reconstructions, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.orchestration import picture_artifact, summary_artifact
from flows.params import DataSource, described
from latentbatch.config import DEFAULT_LAMBDA, TrainConfig
from latentbatch.ids import short_id
from latentbatch.models.checkpoint import model_dir_for
from latentbatch.train import TrainResult, model_config_for, train


@task(name="train", cache_policy=NO_CACHE)
def train_task(
    data: str,
    preset: str,
    epochs: int | None,
    seed: int,
    out: str | None,
    rate_lambda: float | None,
) -> TrainResult:
    config = model_config_for(preset, data)
    settings = TrainConfig.for_preset(
        preset, data, epochs=epochs, seed=seed, rate_lambda=rate_lambda
    )
    directory = Path(out) if out else model_dir_for(preset, data)
    return train(config, settings, directory, progress=False)


@flow(name="train-autoencoder", log_prints=True)
@described
def train_autoencoder(
    data: DataSource = "mnist5k",
    preset: Annotated[
        Literal["seed", "compact", "codec"],
        Field(description="Architecture preset (codec: a learned lossy codec, int8 latents)"),
    ] = "seed",
    epochs: Annotated[
        int | None,
        Field(ge=1, description="Total epochs; empty: the preset's (10, codec 40)"),
    ] = None,
    seed: Annotated[int, Field(description="Seed of split, weights and batch order")] = 0,
    out: Annotated[
        str | None, Field(description="Model directory; empty: models/PRESET-DATA")
    ] = None,
    rate_lambda: Annotated[
        float | None,
        Field(
            gt=0,
            description=f"codec preset: rate-distortion trade-off, larger buys PSNR with bits; "
            f"empty: {DEFAULT_LAMBDA}",
        ),
    ] = None,
) -> dict[str, object]:
    result = train_task(data, preset, epochs, seed, out, rate_lambda)
    final = result.final
    summary = {
        "model_dir": str(result.model_dir),
        "model_id": result.model_id,
        "epochs": int(final["epoch"]),
        "val_psnr_db": round(final["val_psnr"], 3),
        "val_ssim": round(final["val_ssim"], 4),
        **({"val_bpp_estimated": round(final["val_bpp"], 4)} if "val_bpp" in final else {}),
        "reused": result.reused,
    }
    summary_artifact("train-summary", "Training summary", [summary])
    picture_artifact(
        "train-reconstructions",
        "Validation originals (top) and reconstructions (bottom)",
        result.reconstructions,
    )
    picture_artifact("train-curves", "Loss and validation PSNR/SSIM per epoch", result.curves)
    print(f"model {short_id(result.model_id)} in {result.model_dir}: {final['val_psnr']:.2f} dB")
    return summary


if __name__ == "__main__":
    train_autoencoder()
