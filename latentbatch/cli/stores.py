"""``latentbatch stores``, ``inspect``, ``query``, ``stats`` and ``score``: questions about
latent stores.

Each command imports what it needs when it runs: a query that decodes or encodes loads
torch (and the model's weights, once); the others never do."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from latentbatch.cli.common import (
    IdsOption,
    ImageCodecOption,
    JsonOption,
    ProgressOption,
    QualityOption,
    RowsOption,
    SchedulerOption,
    StorageOption,
    StoreArgument,
    WhereOption,
    WorkersOption,
    emit_json,
    make_console,
    task_progress,
)
from latentbatch.errors import LatentbatchError
from latentbatch.ids import short_id
from latentbatch.storage.fs import parse_options

if TYPE_CHECKING:
    import numpy as np

SHOWN = 200  # rows of a query's table; --json prints them all, a row at a time
GRID_ROWS = 32  # rows a --grid picture shows (selection_preview's 4 lines of 8)


def stores_command(
    root: Annotated[str, typer.Argument(help="Folder or s3:// prefix to search.")],
    outputs: Annotated[
        str | None, typer.Option(help="Output root of bulk decodes, to report each store's output.")
    ] = None,
    with_bytes: Annotated[
        bool,
        typer.Option("--bytes", help="Also list every object of each store for its bytes."),
    ] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every latent store under ROOT: rows, latents, model, created, output.

    From each store's metadata; --bytes adds its bytes on disk (a listing of every
    object)."""
    from latentbatch.outputs import catalog

    options = parse_options(storage_option)
    rows = catalog.describe_stores(root, outputs, options, with_bytes)
    if as_json:
        emit_json({"root": root, "stores": rows})
        return
    table = Table("store", "rows", "latents", "model", "created", "bytes", "output")
    for row in rows:
        if row["damaged"] is not None:
            table.add_row(row["store"], f"[red]damaged[/]: {row['damaged']}")
            continue
        table.add_row(
            row["store"],
            str(row["count"]),
            "x".join(map(str, row["latent_shape"])) + f" {row['latent_dtype']}",
            short_id(row["model_id"]),
            row["created"] + (f" ({row['derived']})" if row["derived"] else ""),
            "-" if row["bytes"] is None else f"{row['bytes']:,}",
            row["output"] or "-",
        )
    console = make_console()
    console.print(table)
    if not with_bytes and rows:
        console.print("bytes not measured: --bytes lists every object of every store")


def inspect_command(
    store: StoreArgument,
    with_bytes: Annotated[
        bool,
        typer.Option(
            "--bytes",
            help="Also list every object for bytes on disk and bits per pixel (grows with "
            "the store).",
        ),
    ] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a latent store: rows, shapes, chunking, model (--bytes: bytes, bits/pixel)."""
    from latentbatch.stores.store import open_store

    report = open_store(store, parse_options(storage_option)).report(with_bytes)
    if as_json:
        emit_json(report)
        return
    console = make_console()
    bpp = report["bits_per_pixel"]
    written = "" if report["written_rows"] is None else f"{report['written_rows']} written, "
    rows_text = f"{report['count']} committed, {written}capacity {report['capacity']}"
    per_chunk = (
        f"{report['chunk_shape'][0]} rows per chunk"
        if report["chunk_shape"][1:] == report["latent_shape"]
        else f"one channel of {report['chunk_shape'][0]} rows per chunk"
    )
    chunking = f"{per_chunk}, {report['shard_rows']} per shard, {report['shards']} shards"
    latents = f"{'x'.join(map(str, report['latent_shape']))} {report['latent_dtype']}"
    if report["quantization"] is not None:
        latents += (
            f" (integers, step {report['quantization']['step']}; "
            f"entropy model: {report['quantization']['prior']} per channel)"
        )
    held = report["convention"]
    if held is not None:
        from latentbatch.config import Convention

        latents += f" (scaled: a decode applies {Convention.from_dict(held).describe()})"
    sources = ", ".join(
        f"{s['spec']} rows {s['rows'][0]}-{s['rows'][1]}" for s in report["sources"]
    )
    rows = [
        ("store", report["store"]),
        ("rows", rows_text),
        ("pending", report["pending"] or "none"),
        ("latents", latents),
        ("chunking", chunking),
        ("model", f"{report['model_id']} ({report['model']['preset']})"),
        (
            "images",
            f"{report['image']['height']}x{report['image']['width']} {report['image']['mode']}",
        ),
        ("labels", "yes" if report["labels"] else "no"),
        (
            "PSNR",
            "none: derived rows have no original images"
            if report["lineage"]
            else "each row's at encode time"
            if report["quality"]
            else "not recorded",
        ),
        ("canary", report["canary"] or "none"),
        (
            "anomaly",
            "not scored"
            if report["anomaly"] is None
            else f"scored against {report['anomaly']['reference']['url']}, threshold "
            f"{report['anomaly']['threshold']:.3f} (quantile {report['anomaly']['quantile']})",
        ),
        ("sources", sources or "none"),
    ]
    lineage = report["lineage"]
    if lineage is not None:
        parents = ", ".join(f"{p['url']} ({p['uuid'][:8]})" for p in lineage["parents"])
        settings = ", ".join(f"{k} {v}" for k, v in lineage["parameters"].items())
        seed = "" if lineage["seed"] is None else f", seed {lineage['seed']}"
        made = f"{lineage['operation']} of {parents}" if parents else lineage["operation"]
        rows.append(("lineage", f"{made}: {settings}{seed}"))
    if report["bytes"] is None:
        rows.append(("on disk", "not measured: --bytes lists every object of the store"))
    else:
        sizes = report["bytes"]
        rows.append(("on disk", f"{sizes['total']:,} bytes (latents {sizes['latents']:,})"))
        rows.append(("bits/pixel", "-" if bpp is None else f"{bpp:.2f}"))
    for key, value in rows:
        console.print(f"{key:>10}  {value}", highlight=False, soft_wrap=True)


def query_command(
    store_url: StoreArgument,
    ids: IdsOption = None,
    rows: RowsOption = None,
    label: Annotated[int | None, typer.Option(help="Only rows with this label.")] = None,
    where: WhereOption = None,
    near: Annotated[str | None, typer.Option(help="Nearest neighbours of this id.")] = None,
    worst: Annotated[
        int | None,
        typer.Option(
            help="The K worst rows: reconstructed worst at encode time (lowest PSNR first), "
            "or with --by anomaly the most anomalous (highest score first)."
        ),
    ] = None,
    by: Annotated[str, typer.Option(help="What --worst ranks by: psnr or anomaly.")] = "psnr",
    near_image: Annotated[
        Path | None, typer.Option(help="Nearest neighbours of this image (needs --model).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    metric: Annotated[str, typer.Option(help="l2 or cosine.")] = "l2",
    model: Annotated[
        str | None,
        typer.Option(help="The store's model: path or URL (for --near-image, --decode, --grid)."),
    ] = None,
    decode_to: Annotated[
        str | None, typer.Option("--decode", help="Decode the result into this folder.")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="tar, zarr or png for --decode.")
    ] = "tar",
    image_codec: ImageCodecOption = "png",
    quality: QualityOption = None,
    grid: Annotated[
        Path | None, typer.Option(help="Write a preview grid PNG of the result.")
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Select rows of a store, or find nearest neighbours, without decoding the store."""

    from latentbatch.outputs.codecs import check_codec
    from latentbatch.stores import query
    from latentbatch.stores.store import open_store

    codec = check_codec(image_codec, quality)
    if by not in ("psnr", "anomaly"):
        raise LatentbatchError(f"--by {by!r} is not psnr or anomaly")
    store = open_store(store_url, parse_options(storage_option))
    if (decode_to or grid or near_image) and model is None:
        raise LatentbatchError(
            "--near-image, --decode and --grid need --model (the store's model directory)"
        )
    loaded_model = None
    near_latent = None
    if model is not None and (decode_to or grid or near_image):
        from latentbatch.models.weights import loaded  # torch: only for the queries that need it

        loaded_model = loaded(model, store.storage_options)  # read and checked once
    if near_image is not None and loaded_model is not None:
        from latentbatch.encode import encode_file

        near_latent = encode_file(loaded_model, near_image, store.model_id, image=store.image_size)
    found = query.answer(
        store,
        ids=ids.split(",") if ids else None,
        rows=[query.parse_rows(r) for r in rows] if rows else None,
        label=label,
        where=where or (),
        near=near,
        near_latent=near_latent,
        worst_k=worst,
        by="anomaly" if by == "anomaly" else "psnr",
        k=k,
        metric=metric,
    )
    chunks: Iterable[np.ndarray] = found.chunks
    if loaded_model is not None and (decode_to is not None or grid is not None):
        from latentbatch.decode import SELECTION_LIMIT, decode_selection
        from latentbatch.figures import image_grid, save_picture
        from latentbatch.outputs.shards import check_format
        from latentbatch.previews import selection_preview

        # the first rows only (a bounded number), the rest still streamed for the answer
        wanted = SELECTION_LIMIT + 1 if decode_to is not None else GRID_ROWS
        selected, chunks = _first_rows(chunks, wanted)
        if decode_to is not None:
            fmt = check_format(output_format)
            decode_selection(loaded_model, store, selected, decode_to, fmt, codec)
        if grid is not None and len(selected):
            pictures = selection_preview(loaded_model, store, selected, found.query_latent)
            save_picture(image_grid(pictures, scale=max(1, 64 // pictures[0].shape[1])), grid)
    neighbours = found.neighbours
    results = _checked(
        entry for part in chunks for entry in query.result_rows(store, part, neighbours)
    )
    if as_json:
        _stream_json(store_url, results)
    else:
        columns = (store.has_labels, store.has_quality, store.has_anomaly, neighbours is not None)
        _print_table(results, *columns)


def _first_rows(chunks: Iterable[np.ndarray], n: int) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """The first ``n`` rows of a streamed answer, and the whole answer again (the chunks
    taken, then the rest, still streamed)."""
    import numpy as np

    taken: list[np.ndarray] = []
    count = 0
    rest = iter(chunks)
    for part in rest:
        taken.append(part)
        count += len(part)
        if count >= n:
            break
    first = np.concatenate(taken)[:n] if taken else np.zeros(0, dtype=np.int64)
    return first, itertools.chain(taken, rest)


def _checked(results: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``results``, its first row (and so any refusal of the query) taken before a line of
    the answer is printed."""
    first = next(results, None)
    return results if first is None else itertools.chain([first], results)


def _stream_json(store_url: str, results: Iterable[dict[str, object]]) -> None:
    """``{"store", "results": [...], "count"}``, written a row at a time."""
    typer.echo(f'{{\n  "store": {json.dumps(store_url)},\n  "results": [', nl=False)
    count = 0
    for entry in results:
        typer.echo(("," if count else "") + "\n    " + json.dumps(entry, sort_keys=True), nl=False)
        count += 1
    typer.echo(("\n  " if count else "") + f'],\n  "count": {count}\n}}')


def _print_table(
    results: Iterable[dict[str, Any]], labels: bool, psnrs: bool, anomalies: bool, distances: bool
) -> None:
    """The first :data:`SHOWN` rows as a table, and how many there were in all."""
    optional = (
        ("label", labels), ("PSNR", psnrs), ("anomaly", anomalies), ("distance", distances)
    )  # fmt: skip
    table = Table("row", "id", *(name for name, shown in optional if shown))
    count = 0
    for entry in results:
        count += 1
        if count > SHOWN:
            continue
        cells = [str(entry["row"]), entry["id"]]
        if labels:
            cells.append(str(entry["label"]))
        if psnrs:
            cells.append("-" if entry["psnr"] is None else f"{entry['psnr']:.2f} dB")
        if anomalies:
            cells.append("-" if entry["anomaly"] is None else f"{entry['anomaly']:.3f}")
        if distances:
            cells.append(f"{entry['distance']:.4f}")
        table.add_row(*cells)
    console = make_console()
    console.print(table)
    console.print(f"{count} rows" + (f" (first {SHOWN} shown)" if count > SHOWN else ""))


def score_command(
    store_url: StoreArgument,
    reference: Annotated[
        str, typer.Option(help="A store of normal images, encoded by the same model.")
    ],
    k: Annotated[int, typer.Option("-k", min=1, help="Reference neighbours per row.")] = 5,
    quantile: Annotated[
        float,
        typer.Option(help="The threshold: this quantile of the reference's own scores."),
    ] = 0.99,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Score each row's anomaly against a reference store of normal images.

    The distance to the nearest reference latents (a faiss index kept beside the
    reference) and the encode-time PSNR, as z-scores against a sample of the reference's
    own rows, into the store's anomaly array: a Dask task per store shard."""
    from latentbatch.uses.anomaly import score

    with task_progress("scoring", progress and not as_json) as update:
        result = score(
            store_url,
            reference,
            k=k,
            quantile=quantile,
            storage_options=parse_options(storage_option),
            scheduler=scheduler,
            workers=workers,
            on_progress=update,
        )
    if as_json:
        emit_json(result.to_dict())
        return
    make_console().print(
        f"scored {result.scored} rows of {store_url} against {reference}: threshold "
        f"{result.threshold:.3f} (the {quantile:g} quantile of the reference's own scores), "
        f"{result.above} rows above it ({result.above / max(1, result.scored):.1%}; the "
        f"reference: {result.reference_above:.1%}); query them with --worst K --by anomaly",
        highlight=False,
        soft_wrap=True,
    )


def stats_command(
    store_url: StoreArgument,
    save: Annotated[
        bool, typer.Option(help="Store the statistics in the store's attributes.")
    ] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per-channel mean, std, min and max of the committed latents, and 1/std scaling."""
    from latentbatch.stores import query
    from latentbatch.stores.store import open_store

    store = open_store(store_url, parse_options(storage_option), writable=save)
    stats = query.statistics(store, save=save)
    if as_json:
        emit_json(stats.to_dict())
        return
    table = Table("channel", "mean", "std", "min", "max", title=f"{stats.count} latents")
    for c, values in enumerate(zip(stats.mean, stats.std, stats.min, stats.max, strict=True)):
        table.add_row(str(c), *(f"{v:.5f}" for v in values))
    console = make_console()
    console.print(table)
    console.print(
        f"scaling factor (1 / std) {stats.scaling_factor:.5f}" + (" (saved)" if save else "")
    )
    psnr = stats.psnr
    if psnr and psnr["measured"]:
        console.print(
            f"encode-time PSNR of {psnr['measured']} rows: mean {psnr['mean']:.2f} dB, "
            f"min {psnr['min']:.2f}, 1% {psnr['p1']:.2f}, 5% {psnr['p5']:.2f}, "
            f"median {psnr['p50']:.2f}, 95% {psnr['p95']:.2f}, max {psnr['max']:.2f}"
        )
