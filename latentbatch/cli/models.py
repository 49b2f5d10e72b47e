"""``latentbatch models list|show``: model directories."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from latentbatch.cli.common import (
    DEFAULT_MODELS,
    JsonOption,
    StorageOption,
    emit_json,
    make_console,
)
from latentbatch.errors import LatentbatchError
from latentbatch.ids import short_id
from latentbatch.models import checkpoint
from latentbatch.storage.fs import filesystem, parse_options

models_app = typer.Typer(help="List and show model directories.", no_args_is_help=True)


@models_app.command("list")
def models_list(
    root: Annotated[
        str, typer.Argument(help="Folder or s3:// prefix to search for model directories.")
    ] = str(DEFAULT_MODELS),
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the model directories under ROOT."""
    options = parse_options(storage_option)
    fs, path = filesystem(root, options)
    if not fs.isdir(path):
        raise LatentbatchError(f"{root} is not a folder; train a model first (latentbatch train)")
    listing = checkpoint.find_models(root, options)
    rows = [checkpoint.summary(info) for info in listing.models]
    broken = [{"path": str(path), "error": error} for path, error in listing.broken]
    if as_json:
        emit_json({"models": rows, "broken": broken})
        return
    console = make_console()
    table = Table("path", "id", "preset", "image", "latent", "source", "epochs", "val PSNR")
    for row in rows:
        psnr = row["val_psnr"]
        table.add_row(
            row["path"],
            short_id(row["model_id"]),
            row["preset"],
            row["image"],
            "x".join(map(str, row["latent"])),
            row["source"] or "-",
            "-" if row["epochs"] is None else str(row["epochs"]),
            "-" if psnr is None else f"{psnr:.2f} dB",
        )
    console.print(table)
    for entry in broken:
        console.print(f"[red]unreadable[/] {entry['path']}: {entry['error']}")


@models_app.command("show")
def models_show(
    model_dir: Annotated[str, typer.Argument(help="A model directory: path or s3:// URL.")],
    storage_option: StorageOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole config.json and id.")
    ] = False,
) -> None:
    """Show one model directory: id, architecture, data and metrics."""
    info = checkpoint.read_info(model_dir, parse_options(storage_option))
    if as_json:
        emit_json({**info.meta, "model_id": info.model_id, "path": info.location})
        return
    console = make_console()
    shown = {k: v for k, v in checkpoint.summary(info).items() if v is not None}
    width = max(10, *(len(k) for k in shown))
    for key, value in shown.items():
        console.print(f"{key:>{width}}  {value}", highlight=False, soft_wrap=True)
    for row in info.meta.get("training", {}).get("history", []):
        console.print(
            f"     epoch {int(row['epoch']):>3}: loss {row['train_loss']:.4f}"
            f"/{row['val_loss']:.4f}, PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.3f}"
            + (f", {row['val_bpp']:.3f} bpp" if "val_bpp" in row else "")
        )
