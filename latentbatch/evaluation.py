"""Rate and distortion of a model's latent store, beside JPEG and WebP on the same images.

The model's point is measured the way a store holds its latents: the images are encoded
into a temporary latent store (the same writer as ``latentbatch encode``), its bits per
pixel are the latents' bytes on disk over the images' pixels (what ``latentbatch
inspect`` reports), and the images are decoded back from the stored latents. JPEG and
WebP are Pillow's, at a sweep of qualities, their bits per pixel the bytes of the
encoded files. Every point has PSNR (mean over images, :func:`quality.psnr`) and MS-SSIM
(:func:`quality.ms_ssim`).

For a model trained on the same source the images are its validation split (the seeded
split of training, from ``config.json``); ``split="all"`` takes every image.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from latentbatch.choices import QUALITIES
from latentbatch.config import TrainConfig
from latentbatch.engine.kernel import decode_latents, encode_images
from latentbatch.errors import ConfigError
from latentbatch.ids import short_id
from latentbatch.models.autoencoder import Autoencoder, to_unit
from latentbatch.models.checkpoint import ModelInfo, ModelLocation
from latentbatch.models.quality import ms_ssim, psnr
from latentbatch.models.weights import load_model
from latentbatch.sources.images import Geometry, open_source
from latentbatch.storage.fs import StorageOptions
from latentbatch.stores.store import create_store, shard_ranges
from latentbatch.train import split as training_split

Split = Literal["validation", "all"]
CODECS = ("jpeg", "webp")


@dataclass(frozen=True, kw_only=True)
class Point:
    """One rate–distortion point: stored bits per pixel, PSNR (dB) and MS-SSIM; for a
    quantised model also the bits per pixel its entropy model estimates (what an ideal
    coder would store), for a codec its quality setting."""

    bpp: float
    psnr: float
    ms_ssim: float
    quality: int | None = None
    estimated_bpp: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"bpp": self.bpp, "psnr": self.psnr, "ms_ssim": self.ms_ssim}
        if self.estimated_bpp is not None:
            values["estimated_bpp"] = self.estimated_bpp
        return values if self.quality is None else {"quality": self.quality, **values}


@dataclass(frozen=True, kw_only=True)
class ModelPoint:
    """A model's point, and which model it is (its ``--lambda`` for the codec preset)."""

    model_id: str
    preset: str
    rate_lambda: float | None
    point: Point

    @property
    def name(self) -> str:
        trade = f", lambda {self.rate_lambda:g}" if self.rate_lambda is not None else ""
        return f"{self.preset} {short_id(self.model_id)}{trade}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "preset": self.preset,
            "lambda": self.rate_lambda,
            **self.point.to_dict(),
        }


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """One or more models' points and the codecs' curves, on the same images."""

    models: tuple[ModelPoint, ...]
    source: str
    split: Split
    images: int
    codecs: dict[str, tuple[Point, ...]]

    @property
    def model(self) -> Point:
        """The (first) model's point."""
        return self.models[0].point

    def to_dict(self) -> dict[str, Any]:
        first = self.models[0]
        return {
            "model_id": first.model_id,
            "preset": first.preset,
            "source": self.source,
            "split": self.split,
            "images": self.images,
            "model": first.point.to_dict(),
            "models": [m.to_dict() for m in self.models],
            **{name: [p.to_dict() for p in points] for name, points in self.codecs.items()},
        }

    def curves(self) -> dict[str, list[dict[str, Any]]]:
        """The points to plot, by name: each codec-preset model a point of one curve per
        preset labelled with its lambda, any other model its own point, and each codec's
        sweep labelled with its quality."""
        named: dict[str, list[dict[str, Any]]] = {}
        for m in self.models:
            if m.rate_lambda is not None:
                named.setdefault(f"latentbatch {m.preset} (lambda)", []).append(
                    {**m.point.to_dict(), "label": f"{m.rate_lambda:g}"}
                )
            else:
                named[m.name] = [m.point.to_dict()]
        for name, points in self.codecs.items():
            named[f"Pillow {name.upper()}"] = [
                {**p.to_dict(), "label": str(p.quality)} for p in points
            ]
        return named

    def rows(self) -> list[dict[str, Any]]:
        """One table row per point: what, quality, bits per pixel, PSNR, MS-SSIM."""
        rows = [{"what": m.name, **m.point.to_dict()} for m in self.models]
        for name, points in self.codecs.items():
            rows += [{"what": f"Pillow {name.upper()}", **p.to_dict()} for p in points]
        return rows


def evaluation_images(
    info: ModelInfo, source_spec: str, split: Split = "validation"
) -> tuple[np.ndarray, Split]:
    """The images to evaluate on (``uint8 (n, H, W, C)`` at the model's geometry) and
    which they are: the training's validation rows when the model was trained on
    ``source_spec`` (the same seeded split), else, or with ``split="all"``, every image
    of the source."""
    geometry = Geometry.of(info.config)
    trained = info.meta.get("training", {}).get("config")
    config = TrainConfig.from_dict(trained) if isinstance(trained, dict) else None
    if split == "validation" and config is not None and config.source == source_spec:
        source = open_source(source_spec, geometry, config.limit, config.seed)
        images = source.read(0, len(source))
        _, val_rows = training_split(len(images), config.val_fraction, config.seed)
        return images[val_rows.numpy()], "validation"
    source = open_source(source_spec, geometry)
    return source.read(0, len(source)), "all"


def model_point(model: Autoencoder, info: ModelInfo, images: np.ndarray) -> Point:
    """Encode ``images`` into a temporary store, measure its latents' bits per pixel and
    the quality of the images decoded from the stored latents."""
    encoder, decoder = model.encoder, model.decoder
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="latentbatch-evaluate-") as folder:
        store = create_store(
            str(Path(folder) / "evaluate.zarr"),
            model_id=info.model_id,
            config=info.config,
            capacity=len(images),
            quantization=info.quantization,
        )
        for start, stop in shard_ranges(0, len(images), store.shard_rows):
            latents = encode_images(encoder, images[start:stop], cpu)
            ids = [f"evaluate-{i:07d}" for i in range(start, stop)]
            store.write_rows(start, latents, ids, np.full(stop - start, -1, np.int32))
        store.write_meta(count=len(images))
        bpp = float(store.report(with_bytes=True)["bits_per_pixel"])
        stored = store.read_latents(0, len(images)).astype(np.float32)
    decoded = decode_latents(decoder, stored, cpu)
    estimated = None
    if model.prior is not None:
        with torch.inference_mode():
            bits = float(model.prior.bits(torch.from_numpy(stored)).sum())
        estimated = bits / (len(images) * images.shape[1] * images.shape[2])
    return _measure(images, decoded, bpp, estimated_bpp=estimated)


def _measure(
    images: np.ndarray,
    decoded: np.ndarray,
    bpp: float,
    quality: int | None = None,
    estimated_bpp: float | None = None,
) -> Point:
    reference = to_unit(torch.from_numpy(images))
    test = to_unit(torch.from_numpy(decoded))
    return Point(
        bpp=bpp,
        psnr=psnr(reference, test),
        ms_ssim=ms_ssim(reference, test),
        quality=quality,
        estimated_bpp=estimated_bpp,
    )


def codec_point(images: np.ndarray, codec: str, quality: int) -> Point:
    """``images`` through Pillow's ``codec`` (jpeg or webp) at ``quality``: the bytes of
    the encoded files over the pixels, and the quality of the decoded images."""
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    channels = images.shape[-1]
    mode = "L" if channels == 1 else "RGB"
    total = 0
    decoded = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if channels == 1 else image).save(
            buffer, format=codec.upper(), quality=quality
        )
        total += buffer.tell()
        back = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode))
        decoded[i] = back[..., None] if channels == 1 else back
    pixels = images.shape[0] * images.shape[1] * images.shape[2]
    return _measure(images, decoded, 8 * total / pixels, quality)


def evaluate(
    model_dirs: ModelLocation | Sequence[ModelLocation],
    source_spec: str,
    *,
    split: Split = "validation",
    qualities: Sequence[int] = QUALITIES,
    options: StorageOptions | None = None,
) -> Evaluation:
    """The models' points and JPEG's and WebP's curves on the same images (the first
    model's validation split; every model must be validated on the same rows)."""
    if not qualities or any(not 1 <= q <= 100 for q in qualities):
        raise ConfigError(f"qualities {list(qualities)} must be integers from 1 to 100")
    locations = [model_dirs] if isinstance(model_dirs, str | Path) else list(model_dirs)
    if not locations:
        raise ConfigError("name at least one model directory to evaluate")
    points: list[ModelPoint] = []
    images: np.ndarray | None = None
    used: Split = split
    for location in locations:
        model, info = load_model(location, options=options)  # read and hashed once
        assert isinstance(model, Autoencoder)
        theirs, their_split = evaluation_images(info, source_spec, split)
        if images is None:
            images, used = theirs, their_split
        elif their_split != used or not np.array_equal(theirs, images):
            raise ConfigError(
                f"{location} is validated on other images of {source_spec} than "
                f"{locations[0]} (another split or geometry); evaluate them separately, "
                "or with --split all"
            )
        points.append(
            ModelPoint(
                model_id=info.model_id,
                preset=info.config.preset,
                rate_lambda=info.rate_lambda,
                point=model_point(model, info, images),
            )
        )
    assert images is not None
    curves = {
        name: tuple(codec_point(images, name, q) for q in sorted(qualities)) for name in CODECS
    }
    return Evaluation(
        models=tuple(points), source=source_spec, split=used, images=len(images), codecs=curves
    )
