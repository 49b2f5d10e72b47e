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

from latentbatch.checkpoint import ModelInfo, ModelLocation, load_model
from latentbatch.config import TrainConfig
from latentbatch.datasets import Geometry, open_source
from latentbatch.decode import decode_latents
from latentbatch.encode import encode_images
from latentbatch.errors import ConfigError
from latentbatch.model import Autoencoder, to_unit
from latentbatch.quality import ms_ssim, psnr
from latentbatch.storage import StorageOptions
from latentbatch.store import create_store, shard_ranges
from latentbatch.train import split as training_split

Split = Literal["validation", "all"]
QUALITIES = (5, 10, 20, 30, 50, 70, 90)
CODECS = ("jpeg", "webp")


@dataclass(frozen=True, kw_only=True)
class Point:
    """One rate–distortion point: stored bits per pixel, PSNR (dB) and MS-SSIM."""

    bpp: float
    psnr: float
    ms_ssim: float
    quality: int | None = None  # a codec's quality setting

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"bpp": self.bpp, "psnr": self.psnr, "ms_ssim": self.ms_ssim}
        return values if self.quality is None else {"quality": self.quality, **values}


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """A model's point and the codecs' curves on the same images."""

    model_id: str
    preset: str
    source: str
    split: Split
    images: int
    model: Point
    codecs: dict[str, tuple[Point, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "preset": self.preset,
            "source": self.source,
            "split": self.split,
            "images": self.images,
            "model": self.model.to_dict(),
            **{name: [p.to_dict() for p in points] for name, points in self.codecs.items()},
        }

    def curves(self) -> dict[str, list[dict[str, Any]]]:
        """The points to plot, by name: the model's one point and each codec's sweep."""
        named = {f"model {self.model_id[:12]} ({self.preset})": [self.model.to_dict()]}
        for name, points in self.codecs.items():
            named[f"Pillow {name.upper()}"] = [p.to_dict() for p in points]
        return named

    def rows(self) -> list[dict[str, Any]]:
        """One table row per point: what, quality, bits per pixel, PSNR, MS-SSIM."""
        rows = [{"what": f"model ({self.preset})", **self.model.to_dict()}]
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
    geometry = Geometry(info.config.image_size, info.config.channels)
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
        )
        for start, stop in shard_ranges(0, len(images), store.shard_rows):
            latents = encode_images(encoder, images[start:stop], cpu)
            ids = [f"evaluate-{i:07d}" for i in range(start, stop)]
            store.write_rows(start, latents, ids, np.full(stop - start, -1, np.int32))
        store.write_meta(count=len(images))
        bpp = float(store.report()["bits_per_pixel"])
        stored = store.read_latents(0, len(images)).astype(np.float32)
    decoded = decode_latents(decoder, stored, cpu)
    return _measure(images, decoded, bpp)


def _measure(
    images: np.ndarray, decoded: np.ndarray, bpp: float, quality: int | None = None
) -> Point:
    reference = to_unit(torch.from_numpy(images))
    test = to_unit(torch.from_numpy(decoded))
    return Point(
        bpp=bpp, psnr=psnr(reference, test), ms_ssim=ms_ssim(reference, test), quality=quality
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
    model_dir: ModelLocation,
    source_spec: str,
    *,
    split: Split = "validation",
    qualities: Sequence[int] = QUALITIES,
    options: StorageOptions | None = None,
) -> Evaluation:
    """The model's point and JPEG's and WebP's curves on the same images."""
    if not qualities or any(not 1 <= q <= 100 for q in qualities):
        raise ConfigError(f"qualities {list(qualities)} must be integers from 1 to 100")
    model, info = load_model(model_dir, options=options)  # read and hashed once
    assert isinstance(model, Autoencoder)
    images, used = evaluation_images(info, source_spec, split)
    point = model_point(model, info, images)
    curves = {
        name: tuple(codec_point(images, name, q) for q in sorted(qualities)) for name in CODECS
    }
    return Evaluation(
        model_id=info.model_id,
        preset=info.config.preset,
        source=source_spec,
        split=used,
        images=len(images),
        model=point,
        codecs=curves,
    )
