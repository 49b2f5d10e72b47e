"""What the command line's sub-commands share: options, console, JSON, progress bars."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from latentbatch.errors import LatentbatchError
from latentbatch.progress import Progress as TaskProgress


def make_console(stderr: bool = False) -> Console:
    """A console sized to the terminal (or $COLUMNS) at the time of the call."""
    return Console(stderr=stderr)


DEFAULT_MODELS = Path("models")


SchedulerOption = Annotated[
    str | None,
    typer.Option(
        help="Dask scheduler address \\[default: $DASK_SCHEDULER_ADDRESS, else a local cluster]."
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Workers of the local cluster \\[default: one per core or GPU]; more workers "
        "than GPUs share them (small images keep a GPU busier that way).",
    ),
]
StorageOption = Annotated[
    list[str] | None,
    typer.Option("--storage-option", help="KEY=VALUE for s3fs (repeatable), e.g. endpoint_url=..."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ProgressOption = Annotated[bool, typer.Option(help="Show a progress bar.")]
StoreArgument = Annotated[
    str, typer.Argument(metavar="STORE", help="Latent store: a local path or s3:// URL.")
]
StoreOption = Annotated[str, typer.Option(help="Latent store: a local path or s3:// URL.")]
ModelOption = Annotated[
    str, typer.Option(help="Model directory: a local path or s3:// URL (see --storage-option).")
]
ImageCodecOption = Annotated[
    str, typer.Option("--image-codec", help="Images in tar shards: png, webp or jpeg.")
]
IdsOption = Annotated[str | None, typer.Option(help="Comma-separated ids.")]
RowsOption = Annotated[list[str] | None, typer.Option(help="Row range I:J (repeatable).")]
WhereOption = Annotated[
    list[str] | None,
    typer.Option(help="Predicate such as 'label >= 5', 'row < 100', 'psnr < 20' or 'anomaly > 3'."),
]
QualityOption = Annotated[
    int | None, typer.Option(help="Quality 1-100 of webp and jpeg images \\[default: 90].")
]


@contextmanager
def task_progress(label: str, enabled: bool) -> Iterator[Callable[[TaskProgress], None]]:
    """A progress bar (images, images/s, ETA) fed by engine progress callbacks; it appears
    with the first finished task, so errors before any work print nothing else."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.0f} img/s"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, disable=not enabled, console=make_console(stderr=True))
    task = bar.add_task(label, total=None, rate=0.0)

    def update(progress: TaskProgress) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(
            task, completed=progress.done_items, total=progress.total_items, rate=progress.rate
        )

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def emit_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True))


ShardRowsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Rows per store shard (new stores) \\[default: 16 MiB of latents, at most 1,024].",
    ),
]
ChunkRowsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Rows per inner chunk (new stores) \\[default: 1 MiB of latents, at most 128].",
    ),
]
SizeOption = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="Image size for a model that takes any size (a diffusers autoencoder): SIDE, "
        "HEIGHTxWIDTH, or native (the folder's one size) \\[default: the model's own].",
    ),
]


def parse_size(text: str | None) -> tuple[int, int] | Literal["native"] | None:
    """``--size``: ``512`` → (512, 512), ``512x768`` → height 512, width 768; ``native``."""
    if text is None:
        return None
    if text == "native":
        return "native"
    height, _, width = text.lower().partition("x")
    try:
        sides = (int(height), int(width or height))
    except ValueError:
        raise LatentbatchError(
            f"--size {text!r} is not SIDE, HEIGHTxWIDTH or native; e.g. --size 512x768"
        ) from None
    return sides
