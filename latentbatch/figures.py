"""Pictures people would rather see than read: reconstruction grids, training curves and
rate–distortion plots."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from latentbatch.storage.fs import write_bytes


def image_grid(rows: Sequence[np.ndarray], scale: int = 1, gap: int = 2) -> Image.Image:
    """Tile rows of ``uint8 (n, H, W, C)`` images into one picture, one row per array."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("image_grid needs at least one image in every row")
    height, width, channels = rows[0].shape[1:]
    n = max(len(r) for r in rows)
    canvas = np.full(
        (len(rows) * (height + gap) + gap, n * (width + gap) + gap, channels), 255, np.uint8
    )
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = gap + i * (height + gap), gap + j * (width + gap)
            canvas[y : y + height, x : x + width] = image
    picture = Image.fromarray(canvas.squeeze(-1) if channels == 1 else canvas)
    if scale != 1:
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    return picture


def save_picture(picture: Image.Image, path: Path) -> None:
    """Write a picture as PNG, atomically."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def reconstruction_grid(originals: np.ndarray, reconstructions: np.ndarray) -> Image.Image:
    """Originals above, reconstructions below, scaled up so small images stay visible."""
    scale = max(1, 96 // originals.shape[1])
    return image_grid([originals, reconstructions], scale=scale)


def save_training_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Plot train/validation loss and validation PSNR/SSIM per epoch to a PNG."""
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(9, 3.5), dpi=100, layout="constrained")
    loss_axes, psnr_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    loss_axes.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axes.legend()
    psnr_axes.plot(epochs, [h["val_psnr"] for h in history], marker="o", color="tab:green")
    psnr_axes.set(xlabel="epoch", ylabel="PSNR (dB)", title="Validation PSNR and SSIM")
    ssim_axes = psnr_axes.twinx()
    ssim_axes.plot(epochs, [h["val_ssim"] for h in history], marker="s", color="tab:purple")
    ssim_axes.set_ylabel("SSIM")
    for axes in (loss_axes, psnr_axes):
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    write_bytes(path, buffer.getvalue())


def save_rate_distortion(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str = ""
) -> None:
    """PSNR and MS-SSIM against stored bits per pixel, one line per name: a sweep (each
    point annotated with its ``label``: a quality, a lambda) or a single point (a model),
    to a PNG."""
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    psnr_axes, ssim_axes = figure.subplots(1, 2)
    for name, points in curves.items():
        ordered = sorted(points, key=lambda p: p["bpp"])
        bpp = [p["bpp"] for p in ordered]
        single = len(ordered) == 1
        style = {"marker": "*", "markersize": 14, "linestyle": ""} if single else {"marker": "o"}
        for axes, key in ((psnr_axes, "psnr"), (ssim_axes, "ms_ssim")):
            axes.plot(bpp, [p[key] for p in ordered], label=name, **style)
            for p in ordered:
                if p.get("label") is not None:
                    axes.annotate(
                        str(p["label"]), (p["bpp"], p[key]), fontsize=7, alpha=0.7,
                        textcoords="offset points", xytext=(3, -9),
                    )  # fmt: skip
    psnr_axes.set(xlabel="stored bits per pixel", ylabel="PSNR (dB)", title="PSNR")
    ssim_axes.set(xlabel="stored bits per pixel", ylabel="MS-SSIM", title="MS-SSIM")
    for axes in (psnr_axes, ssim_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    write_bytes(path, buffer.getvalue())
