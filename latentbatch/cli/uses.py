"""``latentbatch generate``, ``interpolate``, ``shift`` and ``import``: operations that write
a derived store (see :mod:`latentbatch.uses.derive`), and with ``--grid`` a picture of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from latentbatch.cli.common import (
    ChunkRowsOption,
    IdsOption,
    JsonOption,
    ProgressOption,
    RowsOption,
    SchedulerOption,
    ShardRowsOption,
    StorageOption,
    StoreArgument,
    StoreOption,
    WhereOption,
    WorkersOption,
    emit_json,
    make_console,
    task_progress,
)
from latentbatch.errors import DataError, LatentbatchError
from latentbatch.storage.fs import parse_options

if TYPE_CHECKING:
    from latentbatch.uses.derive import DeriveResult

DerivedModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="The stores' model: path or URL; records the new store's canary (needed for --grid).",
    ),
]
GridOption = Annotated[Path | None, typer.Option(help="Write a picture of the new store (PNG).")]
SeedOption = Annotated[int, typer.Option(help="Seed: the same seed writes the same store.")]


def _report(result: DeriveResult, as_json: bool, what: str) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    if result.skipped:
        message = f"{result.store} already holds this {result.operation}; nothing to do"
    else:
        verb = {"import": "imported"}.get(result.operation, "wrote")
        verb = "resumed, and wrote" if result.resumed else verb
        message = f"{verb} {result.written} {what} into {result.store} in {result.seconds:.1f} s"
    make_console().print(message, highlight=False, soft_wrap=True)


def _grid(grid: Path | None, model: str | None, store_url: str, options: dict[str, Any]) -> None:
    if grid is None or model is None:
        return
    from latentbatch.figures import image_grid, save_picture
    from latentbatch.previews import derived_preview
    from latentbatch.stores.store import open_store

    store = open_store(store_url, options)
    pictures = derived_preview(model, store)
    save_picture(image_grid(pictures, scale=max(1, 64 // pictures[0].shape[1])), grid)


def _needs_model(grid: Path | None, model: str | None) -> None:
    if grid is not None and model is None:
        raise LatentbatchError("--grid needs --model (the stores' model directory)")


def generate_command(
    reference: Annotated[
        str, typer.Option("--from", help="The store whose latents are fitted (its labels too).")
    ],
    store: StoreOption,
    count: Annotated[int, typer.Option(min=1, help="Samples per label.")] = 100,
    label: Annotated[
        list[int] | None,
        typer.Option(help="Only this label (repeatable) \\[default: every label of --from]."),
    ] = None,
    seed: SeedOption = 0,
    temperature: Annotated[
        float, typer.Option(help="Below 1: samples nearer their label's mean.")
    ] = 1.0,
    model: DerivedModelOption = None,
    grid: GridOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Draw new latents per label from a store's fitted Gaussians into a new store."""
    from latentbatch.uses.generation import generate

    _needs_model(grid, model)
    options = parse_options(storage_option)
    with task_progress("generating", progress and not as_json) as update:
        result = generate(
            reference,
            store,
            count=count,
            labels=label,
            seed=seed,
            temperature=temperature,
            model=model,
            storage_options=options,
            scheduler=scheduler,
            workers=workers,
            on_progress=update,
        )
    _grid(grid, model, store, options)
    _report(result, as_json, "samples")


def interpolate_command(
    store_url: StoreArgument,
    from_id: Annotated[str, typer.Option("--from", help="The id the interpolation starts at.")],
    to_id: Annotated[str, typer.Option("--to", help="The id it ends at.")],
    store: StoreOption,
    steps: Annotated[int, typer.Option(min=2, help="Latents, both ends included.")] = 9,
    method: Annotated[
        str, typer.Option(help="linear (a straight line) or slerp (a great circle).")
    ] = "linear",
    model: DerivedModelOption = None,
    grid: GridOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Latents between two rows of a store, into a new store."""
    from latentbatch.uses.manipulation import Interpolation, interpolate

    _needs_model(grid, model)
    options = parse_options(storage_option)
    result = interpolate(
        store_url,
        from_id,
        to_id,
        store,
        steps=steps,
        method=cast(Interpolation, method),  # checked by interpolate, before any work
        model=model,
        storage_options=options,
        scheduler=scheduler,
        workers=workers,
    )
    _grid(grid, model, store, options)
    _report(result, as_json, "steps")


def shift_command(
    store_url: StoreArgument,
    from_label: Annotated[int, typer.Option(help="The label the rows have.")],
    to_label: Annotated[int, typer.Option(help="The label they are moved towards.")],
    store: StoreOption,
    strength: Annotated[float, typer.Option(help="1: the whole way; 0.5: half of it.")] = 1.0,
    method: Annotated[
        str,
        typer.Option(
            help="matching (the labels' rows paired by optimal transport), gaussian (their "
            "Gaussians mapped) or mean (the means' difference)."
        ),
    ] = "matching",
    seed: Annotated[
        int, typer.Option(help="Seed of the rows a matching pairs when a label has over 2,000.")
    ] = 0,
    reference: Annotated[
        str | None,
        typer.Option(help="Store of the labels' means and spreads \\[default: STORE]."),
    ] = None,
    ids: IdsOption = None,
    rows: RowsOption = None,
    label: Annotated[
        int | None,
        typer.Option(
            help="Only rows with this label \\[default: --from-label, when nothing else "
            "chooses rows]."
        ),
    ] = None,
    where: WhereOption = None,
    model: DerivedModelOption = None,
    grid: GridOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Move chosen rows from one label towards another, into a new store."""
    from latentbatch.stores.query import parse_rows
    from latentbatch.uses.manipulation import ShiftMethod, shift

    _needs_model(grid, model)
    options = parse_options(storage_option)
    with task_progress("shifting", progress and not as_json) as update:
        result = shift(
            store_url,
            store,
            from_label=from_label,
            to_label=to_label,
            strength=strength,
            method=cast(ShiftMethod, method),  # checked by shift, before any work
            seed=seed,
            reference_url=reference,
            ids=ids.split(",") if ids else None,
            rows=[parse_rows(r) for r in rows] if rows else None,
            label=label,
            where=where or (),
            model=model,
            storage_options=options,
            scheduler=scheduler,
            workers=workers,
            on_progress=update,
        )
    _grid(grid, model, store, options)
    _report(result, as_json, "shifted rows")


def import_command(
    model: Annotated[str, typer.Option(help="The autoencoder that made the latents: path or URL.")],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="The latents, a path or URL: a folder or .zip of .npy files (dataset.json "
            "labels), an .npy/.npz array, .safetensors, WebDataset .tar, or a Zarr store "
            "(PATH::ARRAY).",
        ),
    ],
    store: StoreOption,
    latents: Annotated[
        str,
        typer.Option(
            help="scaled (as the diffusion model sees them) or raw (the autoencoder's own)."
        ),
    ] = "scaled",
    convention: Annotated[
        str,
        typer.Option(
            help="The source's convention: model (the model's own), sd, sdxl, sd3, flux1, "
            "flux2, dc-ae, qwen or repa; the model's config fills what is not given."
        ),
    ] = "model",
    scaling_factor: Annotated[
        str | None,
        typer.Option(
            help="The source's scaling factor: a number, a list (one per channel: "
            "0.2,0.3,...) or a .json/.npy file \\[default: the model's config]."
        ),
    ] = None,
    shift: Annotated[
        str | None,
        typer.Option(help="The source's shift (or bias), as --scaling-factor."),
    ] = None,
    latents_mean: Annotated[
        str | None,
        typer.Option(help="The source's per-channel mean (sdxl, qwen), as --scaling-factor."),
    ] = None,
    latents_std: Annotated[
        str | None,
        typer.Option(help="The source's per-channel std (sdxl, qwen), as --scaling-factor."),
    ] = None,
    packed: Annotated[
        str | None,
        typer.Option(
            help="2x2: the rows are sequence latents (h*w/4, 4C), packed 2x2 as FLUX.1's "
            "and Qwen-Image's pipelines pack them."
        ),
    ] = None,
    shard_rows: ShardRowsOption = None,
    chunk_rows: ChunkRowsOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Import latents made elsewhere into a store (one Dask task per store shard)."""
    from latentbatch.stores.store import Layout
    from latentbatch.uses.import_latents import Latents, import_latents, parse_values

    if packed not in (None, "2x2"):
        raise DataError(f"--packed {packed!r}: the one packing is 2x2")
    with task_progress("importing", progress and not as_json) as update:
        result = import_latents(
            model,
            source,
            store,
            latents=cast(Latents, latents),  # checked by import_latents first
            convention=convention,
            scaling_factor=parse_values(scaling_factor, "--scaling-factor"),
            shift_factor=parse_values(shift, "--shift"),
            latents_mean=parse_values(latents_mean, "--latents-mean"),
            latents_std=parse_values(latents_std, "--latents-std"),
            packed=packed == "2x2",
            layout=Layout(shard_rows, chunk_rows),
            storage_options=parse_options(storage_option),
            scheduler=scheduler,
            workers=workers,
            on_progress=update,
        )
    if as_json:
        emit_json(result.to_dict())
    else:
        _report(result.derived, False, "rows")
        if result.mean_of_mean_and_std:
            make_console().print(
                "its arrays hold a mean and a std per channel: the means are stored",
                highlight=False,
            )
    if result.warning is not None:
        make_console(stderr=True).print(
            f"warning: {result.warning}", highlight=False, soft_wrap=True
        )
