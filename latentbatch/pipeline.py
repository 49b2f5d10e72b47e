"""The end-to-end chain: train (or reuse) → encode → decode → measure.

This is the product's main job on embedded defaults. ``python3 dev.py demo`` (through the
``reconstruction-pipeline`` flow) and ``latentbatch demo`` both call :func:`run_pipeline`,
and both lay a run out the same way (:func:`pipeline_paths`)::

    WORKDIR/
      models/PRESET-SOURCE/          the model directory
      SOURCE-PRESET.zarr             the latent store
      SOURCE-PRESET-decoded/         tar shards + manifest.json

:func:`encode_preview`, :func:`output_preview`, :func:`decoded_preview` and
:func:`selection_preview` make the
pictures that the flows publish and ``latentbatch query --grid`` saves.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from latentbatch.checkpoint import ModelLocation, load_model, read_info
from latentbatch.cluster import Progress, connect
from latentbatch.config import TrainConfig
from latentbatch.datasets import Geometry, ImageSource, open_source
from latentbatch.decode import DecodeResult, decode, decode_in_process, decode_rows
from latentbatch.encode import EncodeResult, encode
from latentbatch.errors import LatentbatchError
from latentbatch.manifest import read_manifest
from latentbatch.model import to_unit
from latentbatch.quality import psnr
from latentbatch.shards import read_output
from latentbatch.storage import StorageOptions
from latentbatch.store import LatentStore, Rows, open_store
from latentbatch.train import TrainResult, model_config_for, train

_EVAL_BATCH = 1024


def _source_for(
    model_dir: ModelLocation,
    source_spec: str,
    limit: int | None = None,
    options: StorageOptions | None = None,
) -> ImageSource:
    """``source_spec`` opened at the geometry of the model in ``model_dir``."""
    config = read_info(model_dir, options).config
    return open_source(source_spec, Geometry(config.image_size, config.channels), limit)


def _originals(source: ImageSource, ids: list[str]) -> np.ndarray:
    """The source images with the given ids, in that order."""
    index = {sample_id: i for i, sample_id in enumerate(source.ids)}
    return source.read(0, len(source))[[index[i] for i in ids]]


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
    model, _ = load_model(model_dir)
    source = _source_for(model_dir, source_spec, limit)
    ids, decoded = read_output(out_url)
    reference = to_unit(torch.from_numpy(_originals(source, ids)))
    with torch.inference_mode():
        roundtrip = torch.cat(
            [model(reference[i : i + _EVAL_BATCH]) for i in range(0, len(reference), _EVAL_BATCH)]
        )
    return Quality(
        images=len(ids),
        pipeline_psnr=psnr(reference, to_unit(torch.from_numpy(decoded))),
        float32_psnr=psnr(reference, roundtrip),
    )


def output_preview(model_dir: Path, source_spec: str, out_url: str, n: int = 8) -> list[np.ndarray]:
    """Rows of a picture: the first ``n`` decoded images of ``out_url`` (bottom) under the
    source images they came from (top)."""
    ids, decoded = read_output(out_url, limit=n)
    return [_originals(_source_for(model_dir, source_spec), ids), decoded]


def decoded_preview(
    model_dir: ModelLocation, out_url: str, n: int = 8, options: StorageOptions | None = None
) -> list[np.ndarray]:
    """Rows of a picture of any finished decode: its first ``n`` images (bottom) under the
    source images they came from (top) when the store's first source still opens and
    holds them; only the decoded row otherwise."""
    ids, decoded = read_output(out_url, options, limit=n)
    manifest = read_manifest(out_url, options)
    try:
        sources = open_store(manifest.store.url, options).meta["sources"] if manifest else []
    except LatentbatchError:  # the store is gone: the decoded row alone
        sources = []
    try:
        originals = _originals(_source_for(model_dir, sources[0]["spec"], None, options), ids)
    except (LatentbatchError, IndexError, KeyError):  # gone, moved, or not these ids
        return [decoded]
    return [originals, decoded]


def encode_preview(
    model_dir: ModelLocation,
    source_spec: str,
    store_url: str,
    n: int = 8,
    options: StorageOptions | None = None,
) -> list[np.ndarray]:
    """Rows of a picture: the first ``n`` images of a source encoded into a store (top)
    over their stored latents decoded in this process (bottom)."""
    source = _source_for(model_dir, source_spec, None, options)
    store = open_store(store_url, options)
    records = [s for s in store.meta["sources"] if s["spec"] == source.spec]
    start = int(records[-1]["rows"][0]) if records else 0
    stop = min(store.count, start + n)
    ids = store.read_ids(start, stop)
    decoded = decode_in_process(model_dir, store.read_latents(start, stop), options)
    return [_originals(source, ids), decoded]


def selection_preview(
    model_dir: ModelLocation,
    store: LatentStore,
    rows: Rows,
    query_latent: np.ndarray | None = None,
    per_row: int = 8,
) -> list[np.ndarray]:
    """Rows of a picture of a query's answer: the first ``4 * per_row`` selected rows
    decoded, ``per_row`` to a line; for a nearest-neighbour query, one line holding the
    query decoded and then its first ten neighbours."""
    images = decode_rows(model_dir, store, list(rows)[: 4 * per_row])
    if query_latent is not None:
        query_image = decode_in_process(model_dir, query_latent[None], store.storage_options)
        return [np.concatenate([query_image, images[:10]])]
    return [images[i : i + per_row] for i in range(0, len(images), per_row)]


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
        model_dir=(workdir / "models" if models is None else Path(models)) / f"{preset}-{source}",
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
