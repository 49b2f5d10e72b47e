"""The ``latentbatch`` command line.

Every sub-command exits 0 on success and, on bad input, 1 with a one-line ``error: ...``
on stderr. ``--json`` output is stable for scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from latentbatch import checkpoint
from latentbatch.config import LOSSES, PRESETS, ModelConfig, TrainConfig, preset_config
from latentbatch.datasets import SOURCES, native_geometry
from latentbatch.errors import LatentbatchError
from latentbatch.train import TrainResult, train

app = typer.Typer(
    name="latentbatch",
    help="Encode images into sharded Zarr v3 latent stores and decode them at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List and show model directories.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _console() -> Console:
    """A console sized to the terminal (or $COLUMNS) at the time of the call."""
    return Console()


DEFAULT_MODELS = Path("models")


def _emit_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True))


def _model_config(
    preset: str, data: str, image_size: int | None, channels: int | None, latent: int | None
) -> ModelConfig:
    native = native_geometry(data)
    config = preset_config(preset, channels or native.channels, image_size or native.size)
    if latent is not None:
        config = ModelConfig(
            config.preset, config.channels, config.image_size, config.widths, latent
        )
    return config


def _report_training(result: TrainResult) -> None:
    console = _console()
    final = result.final
    verb = "reused" if result.reused else "trained"
    console.print(f"[bold]{verb}[/] model {result.model_id[:12]} in {result.model_dir}")
    console.print(
        f"  epochs {int(final['epoch'])}, validation PSNR {final['val_psnr']:.2f} dB, "
        f"SSIM {final['val_ssim']:.3f}"
    )
    console.print(f"  weights          {result.model_dir / checkpoint.WEIGHTS}")
    console.print(f"  config           {result.model_dir / checkpoint.CONFIG}")
    console.print(f"  reconstructions  {result.reconstructions}")
    console.print(f"  curves           {result.curves}")


@app.command("train")
def train_command(
    data: Annotated[str, typer.Option(help=f"Image source: {', '.join(SOURCES)}.")] = "mnist5k",
    preset: Annotated[str, typer.Option(help=f"Architecture: {' or '.join(PRESETS)}.")] = "seed",
    epochs: Annotated[
        int, typer.Option(min=1, help="Total epochs (a resumed run continues).")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the split, initial weights and order.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Model directory \\[default: models/PRESET-DATA].")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=2, help="Use only the first N images.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    loss: Annotated[str, typer.Option(help=f"Loss: {' or '.join(LOSSES)}.")] = "bce",
    image_size: Annotated[
        int | None, typer.Option(help="Side in pixels \\[default: the source's].")
    ] = None,
    channels: Annotated[int | None, typer.Option(help="1 or 3 \\[default: the source's].")] = None,
    latent_channels: Annotated[
        int | None, typer.Option(help="Override the preset's latent channels.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue a compatible run found in --out.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train an autoencoder and write a model directory with pictures of what it learned."""
    model_config = _model_config(preset, data, image_size, channels, latent_channels)
    train_config = TrainConfig(data, epochs, seed, batch_size, lr, loss, limit=limit)
    if out is None:
        name = data.removeprefix("folder:").rstrip("/").replace("/", "-").replace(":", "-")
        out = DEFAULT_MODELS / f"{preset}-{name}"
    result = train(
        model_config, train_config, out, resume=resume, progress=progress and not as_json
    )
    if as_json:
        _emit_json(
            {
                "model_dir": str(result.model_dir),
                "model_id": result.model_id,
                "reused": result.reused,
                "history": list(result.history),
                "reconstructions": str(result.reconstructions),
                "curves": str(result.curves),
            }
        )
    else:
        _report_training(result)


def _model_summary(info: checkpoint.ModelInfo) -> dict[str, Any]:
    history = info.meta.get("training", {}).get("history", [])
    final = history[-1] if history else {}
    return {
        "path": str(info.path),
        "model_id": info.model_id,
        "preset": info.config.preset,
        "image": f"{info.config.image_size}x{info.config.image_size}x{info.config.channels}",
        "latent": list(info.config.latent_shape),
        "source": info.meta.get("source", {}).get("spec"),
        "epochs": len(history),
        "val_psnr": final.get("val_psnr"),
        "val_ssim": final.get("val_ssim"),
    }


@models_app.command("list")
def models_list(
    root: Annotated[
        Path, typer.Argument(help="Folder to search for model directories.")
    ] = DEFAULT_MODELS,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the model directories under ROOT."""
    if not root.is_dir():
        raise LatentbatchError(f"{root} is not a folder; train a model first (latentbatch train)")
    rows, broken = [], []
    for config_path in sorted(root.rglob(checkpoint.CONFIG)):
        try:
            rows.append(_model_summary(checkpoint.read_info(config_path.parent)))
        except LatentbatchError as exc:
            broken.append({"path": str(config_path.parent), "error": str(exc)})
    if as_json:
        _emit_json({"models": rows, "broken": broken})
        return
    console = _console()
    table = Table("path", "id", "preset", "image", "latent", "source", "epochs", "val PSNR")
    for row in rows:
        psnr = row["val_psnr"]
        table.add_row(
            row["path"],
            row["model_id"][:12],
            row["preset"],
            row["image"],
            "x".join(map(str, row["latent"])),
            str(row["source"]),
            str(row["epochs"]),
            "-" if psnr is None else f"{psnr:.2f} dB",
        )
    console.print(table)
    for entry in broken:
        console.print(f"[red]unreadable[/] {entry['path']}: {entry['error']}")


@models_app.command("show")
def models_show(
    model_dir: Annotated[Path, typer.Argument(help="A model directory.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole config.json and id.")
    ] = False,
) -> None:
    """Show one model directory: id, architecture, data and metrics."""
    info = checkpoint.read_info(model_dir)
    if as_json:
        _emit_json({**info.meta, "model_id": info.model_id, "path": str(info.path)})
        return
    summary = _model_summary(info)
    console = _console()
    for key, value in summary.items():
        console.print(f"{key:>10}  {value}")
    for row in info.meta.get("training", {}).get("history", []):
        console.print(
            f"     epoch {int(row['epoch']):>3}: loss {row['train_loss']:.4f}"
            f"/{row['val_loss']:.4f}, PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.3f}"
        )


@app.command("demo")
def demo_command(
    models: Annotated[Path, typer.Option(help="Where model directories go.")] = DEFAULT_MODELS,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The main job on embedded defaults: train (or reuse) the seed model on mnist5k."""
    result = train(
        preset_config("seed"),
        TrainConfig("mnist5k", epochs, seed=0),
        models / "seed-mnist5k",
        progress=progress,
    )
    _report_training(result)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="latentbatch", standalone_mode=False)
    except LatentbatchError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as exc:
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", 2))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
