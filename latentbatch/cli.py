"""The ``latentbatch`` command line.

Every sub-command exits 0 on success and, on bad input, 1 with a one-line ``error: ...``
on stderr. ``--json`` output is stable for scripts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from latentbatch import catalog, checkpoint, query, stack
from latentbatch.cluster import Progress as TaskProgress
from latentbatch.config import LOSSES, PRESETS, TrainConfig
from latentbatch.datasets import SOURCES
from latentbatch.decode import decode, decode_selection
from latentbatch.encode import encode, encode_file
from latentbatch.errors import LatentbatchError
from latentbatch.figures import image_grid, save_picture
from latentbatch.pipeline import run_pipeline, selection_preview
from latentbatch.shards import FORMATS, check_format
from latentbatch.storage import parse_options
from latentbatch.store import Layout, open_store
from latentbatch.train import TrainResult, default_model_dir, model_config_for, train

app = typer.Typer(
    name="latentbatch",
    help="Encode images into sharded Zarr v3 latent stores and decode them at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List and show model directories.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _console(stderr: bool = False) -> Console:
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
    typer.Option(min=1, help="Workers of the local cluster \\[default: one per core or GPU]."),
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
ModelOption = Annotated[Path, typer.Option(help="Model directory.")]


@contextmanager
def _task_progress(label: str, enabled: bool) -> Iterator[Callable[[TaskProgress], None]]:
    """A progress bar (images, images/s, ETA) fed by engine progress callbacks; it appears
    with the first finished task, so errors before any work print nothing else."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.0f} img/s"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, disable=not enabled, console=_console(stderr=True))
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


def _emit_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True))


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
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Train an autoencoder and write a model directory with pictures of what it learned."""
    model_config = model_config_for(
        preset, data, image_size=image_size, channels=channels, latent_channels=latent_channels
    )
    train_config = TrainConfig(data, epochs, seed, batch_size, lr, loss, limit=limit)
    out = out or default_model_dir(preset, data)
    result = train(
        model_config, train_config, out, resume=resume, progress=progress and not as_json
    )
    if as_json:
        _emit_json(result.to_dict())
    else:
        _report_training(result)


@models_app.command("list")
def models_list(
    root: Annotated[
        Path, typer.Argument(help="Folder to search for model directories.")
    ] = DEFAULT_MODELS,
    as_json: JsonOption = False,
) -> None:
    """List the model directories under ROOT."""
    if not root.is_dir():
        raise LatentbatchError(f"{root} is not a folder; train a model first (latentbatch train)")
    listing = checkpoint.find_models(root)
    rows = [checkpoint.summary(info) for info in listing.models]
    broken = [{"path": str(path), "error": error} for path, error in listing.broken]
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
    console = _console()
    for key, value in checkpoint.summary(info).items():
        console.print(f"{key:>10}  {value}")
    for row in info.meta.get("training", {}).get("history", []):
        console.print(
            f"     epoch {int(row['epoch']):>3}: loss {row['train_loss']:.4f}"
            f"/{row['val_loss']:.4f}, PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.3f}"
        )


@app.command("encode")
def encode_command(
    model: ModelOption,
    data: Annotated[str, typer.Option(help=f"Image source: {', '.join(SOURCES)}.")],
    store: StoreOption,
    append: Annotated[
        bool, typer.Option(help="Add to an existing store of the same model.")
    ] = False,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    shard_rows: Annotated[int, typer.Option(min=1, help="Rows per shard (new stores).")] = 1024,
    chunk_rows: Annotated[
        int, typer.Option(min=1, help="Rows per inner chunk (new stores).")
    ] = 128,
    latent_dtype: Annotated[str, typer.Option(help="float16 or float32 (new stores).")] = "float16",
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Encode a data source into a latent store (one Dask task per store shard)."""
    with _task_progress("encoding", progress and not as_json) as update:
        result = encode(
            model,
            data,
            store,
            append=append,
            limit=limit,
            layout=Layout(shard_rows, chunk_rows, latent_dtype),
            storage_options=parse_options(storage_option),
            scheduler=scheduler,
            workers=workers,
            on_progress=update,
        )
    if as_json:
        _emit_json(result.to_dict())
    elif result.skipped:
        _console().print(f"{data} is already in {store}; nothing to do")
    else:
        verb = "resumed" if result.resumed else "encoded"
        _console().print(
            f"{verb} {result.encoded} images of {data} into {store} "
            f"rows {result.rows[0]}-{result.rows[1]} in {result.seconds:.1f} s "
            f"({result.images_per_second:.0f} images/s)"
        )


@app.command("decode")
def decode_command(
    model: ModelOption,
    store: StoreOption,
    out: Annotated[str, typer.Option(help="Output folder: a local path or s3:// URL.")],
    output_format: Annotated[
        str, typer.Option("--format", help=f"One of {', '.join(FORMATS)}.")
    ] = "tar",
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    allow_model_mismatch: Annotated[
        bool, typer.Option(help="Decode a store made by another model (same latent shape).")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Latents per decoder call \\[default: 256 on CPU, 4096 on GPU]."),
    ] = None,
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Decode a latent store into image shards (one Dask task per output shard)."""
    with _task_progress("decoding", progress and not as_json) as update:
        result = decode(
            model,
            store,
            out,
            fmt=check_format(output_format),
            allow_model_mismatch=allow_model_mismatch,
            storage_options=parse_options(storage_option),
            scheduler=scheduler,
            workers=workers,
            batch_size=batch_size,
            on_progress=update,
        )
    if as_json:
        _emit_json(result.to_dict())
        return
    _console().print(
        f"decoded {result.decoded} of {result.count} images into {out} "
        f"({len(result.shards_written)} shards written, {len(result.shards_skipped)} already done) "
        f"in {result.seconds:.1f} s ({result.images_per_second:.0f} images/s)"
    )


@app.command("inspect")
def inspect_command(
    store: StoreArgument,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a latent store: rows, shapes, chunking, model, bytes and bits per pixel."""
    report = open_store(store, parse_options(storage_option)).report()
    if as_json:
        _emit_json(report)
        return
    console = _console()
    bpp = report["bits_per_pixel"]
    rows_text = (
        f"{report['count']} committed, {report['written_rows']} written, "
        f"capacity {report['capacity']}"
    )
    chunking = (
        f"{report['chunk_rows']} rows per chunk, {report['shard_rows']} per shard, "
        f"{report['shards']} shards"
    )
    sources = ", ".join(
        f"{s['spec']} rows {s['rows'][0]}-{s['rows'][1]}" for s in report["sources"]
    )
    rows = [
        ("store", report["store"]),
        ("rows", rows_text),
        ("pending", report["pending"] or "none"),
        ("latents", f"{'x'.join(map(str, report['latent_shape']))} {report['latent_dtype']}"),
        ("chunking", chunking),
        ("model", f"{report['model_id']} ({report['model']['preset']})"),
        (
            "images",
            f"{report['image']['height']}x{report['image']['width']} {report['image']['mode']}",
        ),
        ("labels", "yes" if report["labels"] else "no"),
        ("sources", sources or "none"),
        ("on disk", f"{report['bytes']['total']:,} bytes (latents {report['bytes']['latents']:,})"),
        ("bits/pixel", "-" if bpp is None else f"{bpp:.2f}"),
    ]
    for key, value in rows:
        console.print(f"{key:>10}  {value}", highlight=False)


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option(help="Where the store and decoded shards go.")] = Path(
        "out/demo"
    ),
    models: Annotated[
        Path | None, typer.Option(help="Where model directories go \\[default: WORKDIR/models].")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """The main job on embedded defaults: train (or reuse) the seed model on mnist5k,
    encode all 5,000 images, decode them to tar shards on a local Dask cluster."""
    with _task_progress("decoding", progress and not as_json) as update:
        result = run_pipeline(
            workdir,
            models=models,
            epochs=epochs,
            scheduler=scheduler,
            workers=workers,
            progress=progress and not as_json,
            on_decode_progress=update,
        )
    summary = result.summary()
    if as_json:
        _emit_json(summary)
        return
    _report_training(result.training)
    console = _console()
    console.print(
        f"[bold]store[/]   {result.store} ({result.encoding.encoded} images encoded this run)"
    )
    console.print(f"[bold]decoded[/] {result.out} ({result.decoding.count} images, manifest.json)")
    table = Table("measure", "value", title="Reconstruction summary")
    table.add_row("images decoded", f"{result.decoding.decoded}")
    table.add_row("decode throughput", f"{result.decoding.images_per_second:.0f} images/s")
    table.add_row("PSNR, decoded tar shards", f"{result.quality.pipeline_psnr:.3f} dB")
    table.add_row("PSNR, float32 in memory", f"{result.quality.float32_psnr:.3f} dB")
    table.add_row("cost of float16 + 8-bit", f"{result.quality.cost_db:.3f} dB")
    console.print(table)


@app.command("stores")
def stores_command(
    root: Annotated[str, typer.Argument(help="Folder or s3:// prefix to search.")],
    outputs: Annotated[
        str | None, typer.Option(help="Output root of bulk decodes, to report each store's output.")
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every latent store under ROOT: rows, latents, model, created, bytes, output."""
    rows = catalog.describe_stores(root, outputs, parse_options(storage_option))
    if as_json:
        _emit_json({"root": root, "stores": rows})
        return
    table = Table("store", "rows", "latents", "model", "created", "bytes", "output")
    for row in rows:
        table.add_row(
            row["store"],
            str(row["count"]),
            "x".join(map(str, row["latent_shape"])) + f" {row['latent_dtype']}",
            row["model_id"][:12],
            row["created"],
            f"{row['bytes']:,}",
            row["output"] or "-",
        )
    _console().print(table)


@app.command("query")
def query_command(
    store_url: StoreArgument,
    ids: Annotated[str | None, typer.Option(help="Comma-separated ids.")] = None,
    rows: Annotated[list[str] | None, typer.Option(help="Row range I:J (repeatable).")] = None,
    label: Annotated[int | None, typer.Option(help="Only rows with this label.")] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="Predicate such as 'label >= 5' or 'row < 100'.")
    ] = None,
    near: Annotated[str | None, typer.Option(help="Nearest neighbours of this id.")] = None,
    near_image: Annotated[
        Path | None, typer.Option(help="Nearest neighbours of this image (needs --model).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    metric: Annotated[str, typer.Option(help="l2 or cosine.")] = "l2",
    model: Annotated[
        Path | None,
        typer.Option(help="The store's model directory (for --near-image, --decode, --grid)."),
    ] = None,
    decode_to: Annotated[
        str | None, typer.Option("--decode", help="Decode the result into this folder.")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="tar, zarr or png for --decode.")
    ] = "tar",
    grid: Annotated[
        Path | None, typer.Option(help="Write a preview grid PNG of the result.")
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Select rows of a store, or find nearest neighbours, without decoding the store."""
    store = open_store(store_url, parse_options(storage_option))
    if (decode_to or grid or near_image) and model is None:
        raise LatentbatchError(
            "--near-image, --decode and --grid need --model (the store's model directory)"
        )
    selected = query.select(
        store,
        ids=ids.split(",") if ids else None,
        rows=[query.parse_rows(r) for r in rows] if rows else None,
        label=label,
        where=where or (),
    )
    neighbours = None
    query_latent = None
    exclude: list[int] = []
    if near is not None:
        query_latent, row = query.latent_of(store, near)
        exclude = [row]
    elif near_image is not None and model is not None:
        query_latent = encode_file(model, near_image, store.model_id)
    if query_latent is not None:
        neighbours = query.nearest(store, query_latent, k, query.check_metric(metric), exclude)
        selected = np.array([n.row for n in neighbours])
    result = query.result_rows(store, selected, neighbours)
    if decode_to is not None and model is not None:
        decode_selection(model, store, selected, decode_to, check_format(output_format))
    if grid is not None and model is not None and len(selected):
        pictures = selection_preview(model, store, selected, query_latent)
        save_picture(image_grid(pictures, scale=max(1, 64 // pictures[0].shape[1])), grid)
    if as_json:
        _emit_json({"store": store_url, "count": len(result), "results": result})
        return
    table = Table(
        "row",
        "id",
        *(["label"] if store.has_labels else []),
        *(["distance"] if neighbours else []),
    )
    for entry in result[:200]:
        cells = [str(entry["row"]), entry["id"]]
        if store.has_labels:
            cells.append(str(entry["label"]))
        if neighbours:
            cells.append(f"{entry['distance']:.4f}")
        table.add_row(*cells)
    console = _console()
    console.print(table)
    console.print(f"{len(result)} rows" + (" (first 200 shown)" if len(result) > 200 else ""))


@app.command("stats")
def stats_command(
    store_url: StoreArgument,
    save: Annotated[
        bool, typer.Option(help="Store the statistics in the store's attributes.")
    ] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per-channel mean, std, min and max of the committed latents, and 1/std scaling."""
    store = open_store(store_url, parse_options(storage_option), writable=save)
    stats = query.statistics(store, save=save)
    if as_json:
        _emit_json(stats.to_dict())
        return
    table = Table("channel", "mean", "std", "min", "max", title=f"{stats.count} latents")
    for c, values in enumerate(zip(stats.mean, stats.std, stats.min, stats.max, strict=True)):
        table.add_row(str(c), *(f"{v:.5f}" for v in values))
    console = _console()
    console.print(table)
    console.print(
        f"scaling factor (1 / std) {stats.scaling_factor:.5f}" + (" (saved)" if save else "")
    )


stack_app = typer.Typer(help="A local Prefect + Dask stack on 127.0.0.1.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
StackHome = Annotated[Path, typer.Option(help="Folder of PIDs, logs and addresses.")]


@stack_app.command("up")
def stack_up(
    home: StackHome = stack.DEFAULT_HOME,
    project: Annotated[
        Path, typer.Option(help="Repository root (holds deploy/prefect.yaml).")
    ] = Path(),
    workers: Annotated[int, typer.Option(min=1, help="Dask worker processes.")] = 2,
    port: Annotated[int, typer.Option(help="Preferred Prefect server port.")] = 4200,
) -> None:
    """Start a Prefect server, worker and deployments and a Dask cluster on 127.0.0.1."""
    info = stack.up(home, project, workers, port)
    console = _console()
    console.print(f"Prefect UI      {info.ui_url}", highlight=False)
    console.print(f"Prefect API     {info.api_url}", highlight=False)
    console.print(f"Dask scheduler  {info.scheduler}", highlight=False)
    console.print(f"Dask dashboard  {info.dashboard}", highlight=False)
    console.print(f"PIDs and logs   {info.home}", highlight=False)
    console.print(f"use it:         set -a; . {info.home / 'stack.env'}; set +a", highlight=False)


@stack_app.command("down")
def stack_down(home: StackHome = stack.DEFAULT_HOME) -> None:
    """Stop exactly the processes that `stack up` started."""
    stopped = stack.down(home)
    _console().print(
        f"stopped {', '.join(stopped) if stopped else 'nothing (no stack was running)'}"
    )


@stack_app.command("status")
def stack_status(
    home: StackHome = stack.DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Tell which stack processes run and whether the server answers."""
    report = stack.status(home)
    if as_json:
        _emit_json(report)
        return
    console = _console()
    for name, pid in report["processes"].items():
        console.print(
            f"{name:>16}  {'running, pid ' + str(pid) if pid else 'stopped'}", highlight=False
        )
    console.print(f"{'server':>16}  {'healthy' if report['server_healthy'] else 'not answering'}")


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
    except typer.TyperException as exc:  # usage errors: typer's click prints them itself
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        return int(getattr(exc, "exit_code", 2))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
