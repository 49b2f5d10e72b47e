"""The end-to-end chain: train (or reuse) → encode → decode → measure.

This is the product's main job on embedded defaults. ``python3 dev.py demo`` (through the
``reconstruction-pipeline`` flow) and ``latentbatch demo`` both call :func:`run_pipeline`,
and both lay a run out the same way (:func:`pipeline_paths`)::

    WORKDIR/
      models/PRESET-SOURCE/          the model directory
      SOURCE-PRESET.zarr             the latent store
      SOURCE-PRESET-decoded/         tar shards + manifest.json

The model directory is named by :func:`latentbatch.models.checkpoint.model_dir_for`, the rule
``latentbatch train`` and the flows use too.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latentbatch.config import TrainConfig
from latentbatch.decode import DecodeResult, decode
from latentbatch.encode import EncodeResult, encode
from latentbatch.engine.cluster import connect
from latentbatch.models.autoencoder import to_unit
from latentbatch.models.checkpoint import model_dir_for
from latentbatch.models.quality import psnr
from latentbatch.models.weights import load_model
from latentbatch.outputs.shards import read_output
from latentbatch.previews import source_images
from latentbatch.progress import Progress
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import open_store
from latentbatch.train import TrainResult, model_config_for, train

_EVAL_BATCH = 1024


@dataclass(frozen=True, kw_only=True)
class Quality:
    """PSNR of the decoded output and of a float32 in-memory round trip, same images."""

    images: int
    pipeline_psnr: float
    float32_psnr: float

    @property
    def cost_db(self) -> float:
        """What float16 latents and 8-bit output cost, in dB."""
        return self.float32_psnr - self.pipeline_psnr


def measure_quality(
    model_dir: Path, source_spec: str, out_url: str, limit: int | None = None
) -> Quality:
    """Compare a finished decode with the source images it came from."""
    model, info = load_model(model_dir)
    source = open_source(source_spec, Geometry.of(info.config), limit)
    ids, decoded = read_output(out_url)
    reference = to_unit(torch.from_numpy(source_images(source, ids)))
    with torch.inference_mode():
        roundtrip = torch.cat(
            [model(reference[i : i + _EVAL_BATCH]) for i in range(0, len(reference), _EVAL_BATCH)]
        )
    return Quality(
        images=len(ids),
        pipeline_psnr=psnr(reference, to_unit(torch.from_numpy(decoded))),
        float32_psnr=psnr(reference, roundtrip),
    )


@dataclass(frozen=True, kw_only=True)
class PipelinePaths:
    """Where one run of the chain puts its model, store and output."""

    model_dir: Path
    store: Path
    out: Path


def pipeline_paths(
    workdir: Path, source: str, preset: str, models: Path | None = None
) -> PipelinePaths:
    """The layout of the module docstring (``models`` replaces ``WORKDIR/models``)."""
    workdir = Path(workdir)
    return PipelinePaths(
        model_dir=model_dir_for(preset, source, workdir / "models" if models is None else models),
        store=workdir / f"{source}-{preset}.zarr",
        out=workdir / f"{source}-{preset}-decoded",
    )


@dataclass(frozen=True, kw_only=True)
class PipelineResult:
    training: TrainResult
    encoding: EncodeResult
    decoding: DecodeResult
    quality: Quality
    store: str
    out: str

    def summary(self) -> dict[str, object]:
        """Flat, JSON-ready numbers of the run."""
        return {
            "model_dir": str(self.training.model_dir),
            "model_id": self.training.model_id,
            "val_psnr": self.training.final["val_psnr"],
            "store": self.store,
            "encoded": self.encoding.encoded,
            "out": self.out,
            "images": self.decoding.count,
            "decoded": self.decoding.decoded,
            "decode_seconds": self.decoding.seconds,
            "decode_images_per_second": self.decoding.images_per_second,
            **{k: v for k, v in asdict(self.quality).items() if k != "images"},
            "psnr_cost_db": self.quality.cost_db,
        }


def run_pipeline(
    workdir: Path,
    *,
    models: Path | None = None,
    source: str = "mnist5k",
    preset: str = "seed",
    epochs: int = 10,
    seed: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_decode_progress: Callable[[Progress], None] | None = None,
) -> PipelineResult:
    """Train or reuse the model, encode ``source`` into the store (a store of an older
    model is replaced), decode it afresh into tar shards and measure the PSNR; paths as
    :func:`pipeline_paths` lays them out."""
    paths = pipeline_paths(workdir, source, preset, models)
    training = train(
        model_config_for(preset, source),
        TrainConfig.for_preset(preset, source, epochs=epochs, seed=seed),
        paths.model_dir,
        progress=progress,
    )
    store, out = paths.store, paths.out
    stale = (store / "zarr.json").exists() and open_store(str(store)).model_id != training.model_id
    if stale:
        shutil.rmtree(store)  # the demo's own store, made by an older model
    if out.exists():
        shutil.rmtree(out)  # the demo decodes afresh each time, to measure throughput
    with connect(scheduler, workers) as client:
        encoding = encode(training.model_dir, source, str(store), client=client)
        decoding = decode(
            training.model_dir, str(store), str(out), client=client, on_progress=on_decode_progress
        )
    quality = measure_quality(training.model_dir, source, str(out))
    return PipelineResult(
        training=training,
        encoding=encoding,
        decoding=decoding,
        quality=quality,
        store=str(store),
        out=str(out),
    )
