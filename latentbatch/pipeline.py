"""The end-to-end chain: train (or reuse) → encode → decode → measure.

This is the product's main job on embedded defaults; flows and the command line call it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latentbatch.checkpoint import load_model
from latentbatch.cluster import Progress, connect
from latentbatch.config import TrainConfig, preset_config
from latentbatch.datasets import Geometry, open_source
from latentbatch.decode import DecodeResult, decode
from latentbatch.encode import EncodeResult, encode
from latentbatch.quality import psnr, to_unit
from latentbatch.shards import read_output
from latentbatch.store import open_store
from latentbatch.train import TrainResult, train

_EVAL_BATCH = 1024


@dataclass(frozen=True)
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
    geometry = Geometry(info.config.image_size, info.config.channels)
    source = open_source(source_spec, geometry, limit)
    ids, decoded = read_output(out_url)
    index = {sample_id: i for i, sample_id in enumerate(source.ids)}
    originals = source.read(0, len(source))[[index[i] for i in ids]]
    reference = to_unit(torch.from_numpy(originals))
    with torch.inference_mode():
        roundtrip = torch.cat(
            [model(reference[i : i + _EVAL_BATCH]) for i in range(0, len(reference), _EVAL_BATCH)]
        )
    return Quality(
        len(ids),
        psnr(reference, to_unit(torch.from_numpy(decoded))),
        psnr(reference, roundtrip),
    )


@dataclass(frozen=True)
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
    models: Path,
    source: str = "mnist5k",
    preset: str = "seed",
    epochs: int = 10,
    seed: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_decode_progress: Callable[[Progress], None] | None = None,
) -> PipelineResult:
    """Train or reuse ``models/PRESET-SOURCE``, encode ``source`` into
    ``workdir/SOURCE.zarr``, decode it afresh into ``workdir/SOURCE-decoded`` (tar)."""
    native = open_source(source, limit=2).geometry
    model_config = preset_config(preset, native.channels, native.size)
    training = train(
        model_config,
        TrainConfig(source, epochs, seed),
        models / f"{preset}-{source}",
        progress=progress,
    )
    store = workdir / f"{source}-{preset}.zarr"
    out = workdir / f"{source}-{preset}-decoded"
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
    return PipelineResult(training, encoding, decoding, quality, str(store), str(out))
