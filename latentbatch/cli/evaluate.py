"""``latentbatch evaluate``: a model's rate and distortion beside JPEG and WebP."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from latentbatch.choices import QUALITIES
from latentbatch.cli.common import JsonOption, StorageOption, emit_json, make_console
from latentbatch.errors import ConfigError
from latentbatch.storage.fs import is_remote, parse_options

if TYPE_CHECKING:
    from latentbatch.evaluation import Split

PLOT = "rate-distortion.png"


def evaluate_command(
    model: Annotated[
        list[str],
        typer.Argument(
            help="Model directories (paths or s3:// URLs): several codec models, one per "
            "--lambda, plot as one curve."
        ),
    ],
    data: Annotated[str, typer.Option(help="Image source (see latentbatch train --help).")],
    split: Annotated[
        str, typer.Option(help="validation (the training's held-out rows) or all.")
    ] = "validation",
    quality: Annotated[
        list[int] | None,
        typer.Option(help=f"JPEG/WebP quality (repeatable) \\[default: {QUALITIES}]."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help=f"Rate-distortion plot \\[default: MODEL/{PLOT}, or ./{PLOT}]."),
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """A model's stored bits per pixel, PSNR and MS-SSIM beside JPEG and WebP.

    Of a model's latent store (or several models'), beside Pillow's JPEG and WebP on the
    same images, with a rate-distortion plot."""
    from latentbatch.evaluation import evaluate
    from latentbatch.figures import save_rate_distortion

    if split not in ("validation", "all"):
        raise ConfigError(f"--split {split!r} is not validation or all")
    chosen: Split = "validation" if split == "validation" else "all"
    result = evaluate(
        model,
        data,
        split=chosen,
        qualities=tuple(quality or QUALITIES),
        options=parse_options(storage_option),
    )
    if plot is None:
        plot = Path(PLOT) if is_remote(model[0]) else Path(model[0]) / PLOT
    title = f"{data} ({result.split}, {result.images} images)"
    save_rate_distortion(result.curves(), plot, title)
    if as_json:
        emit_json({**result.to_dict(), "plot": str(plot)})
        return
    table = Table("", "quality", "bits/pixel", "PSNR", "MS-SSIM", "estimated", title=title)
    for row in result.rows():
        table.add_row(
            row["what"],
            "" if row.get("quality") is None else str(row["quality"]),
            f"{row['bpp']:.3f}",
            f"{row['psnr']:.2f} dB",
            f"{row['ms_ssim']:.4f}",
            "" if row.get("estimated_bpp") is None else f"{row['estimated_bpp']:.3f}",
        )
    console = make_console()
    console.print(table)
    console.print(f"plot: {plot}")
