"""The ``latentbatch`` command line.

Every sub-command exits 0 on success and, on bad input, 1 with a one-line ``error: ...``
on stderr. ``--json`` output is stable for scripts.

Quick questions start quickly: at import only typer, rich and the engine-free modules
(choices, config, checkpoint, errors, progress) load; each command imports the engine
(torch, distributed, xarray, matplotlib) when it needs it, in its body.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from latentbatch.choices import FORMATS, SOURCES
from latentbatch.cli.common import (
    ChunkRowsOption,
    ImageCodecOption,
    JsonOption,
    ModelOption,
    ProgressOption,
    QualityOption,
    SchedulerOption,
    ShardRowsOption,
    SizeOption,
    StorageOption,
    StoreOption,
    WorkersOption,
    emit_json,
    make_console,
    parse_size,
    task_progress,
)
from latentbatch.cli.evaluate import evaluate_command
from latentbatch.cli.models import models_app
from latentbatch.cli.stack import stack_app
from latentbatch.cli.stores import (
    inspect_command,
    query_command,
    score_command,
    stats_command,
    stores_command,
)
from latentbatch.cli.uses import (
    generate_command,
    import_command,
    interpolate_command,
    shift_command,
)
from latentbatch.config import DEFAULT_LAMBDA, LOSSES, PRESETS, TrainConfig
from latentbatch.errors import LatentbatchError, TaskError
from latentbatch.ids import short_id
from latentbatch.models import checkpoint
from latentbatch.progress import VERBOSE_ENV
from latentbatch.storage.fs import parse_options

if TYPE_CHECKING:
    from latentbatch.train import TrainResult

app = typer.Typer(
    name="latentbatch",
    help="Encode images into sharded Zarr v3 latent stores and decode them at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Dask's INFO logs too.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error, too.")
    ] = False,
) -> None:
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by the embedded cluster, inherited by workers
    # --debug is read by main(), which reports the errors


def _report_training(result: TrainResult) -> None:
    console = make_console()
    final = result.final
    verb = "reused" if result.reused else "trained"
    console.print(f"[bold]{verb}[/] model {short_id(result.model_id)} in {result.model_dir}")
    console.print(
        f"  epochs {int(final['epoch'])}, validation PSNR {final['val_psnr']:.2f} dB, "
        f"SSIM {final['val_ssim']:.3f}"
        + (f", estimated {final['val_bpp']:.3f} bits per pixel" if "val_bpp" in final else "")
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
        int | None,
        typer.Option(
            min=1, help="Total epochs (a resumed run continues) \\[default: 10; codec 40]."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, initial weights and order.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Model directory \\[default: models/PRESET-DATA].")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=2, help="Use only the first N images.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="\\[default: 32; codec 64]")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate \\[default: 1e-3; codec 2e-3].")
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help=f"Loss: {' or '.join(LOSSES)} \\[default: bce; codec mse].")
    ] = None,
    rate_lambda: Annotated[
        float | None,
        typer.Option(
            "--lambda",
            help="codec preset: the rate-distortion trade-off; larger buys PSNR with bits "
            f"\\[default: {DEFAULT_LAMBDA}].",
        ),
    ] = None,
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
    from latentbatch.train import model_config_for, train

    model_config = model_config_for(
        preset, data, image_size=image_size, channels=channels, latent_channels=latent_channels
    )
    train_config = TrainConfig.for_preset(
        preset,
        data,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        learning_rate=lr,
        loss=loss,
        limit=limit,
        rate_lambda=rate_lambda,
    )
    out = out or checkpoint.model_dir_for(preset, data)
    result = train(
        model_config, train_config, out, resume=resume, progress=progress and not as_json
    )
    if as_json:
        emit_json(result.to_dict())
    else:
        _report_training(result)


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
    shard_rows: ShardRowsOption = None,
    chunk_rows: ChunkRowsOption = None,
    latent_dtype: Annotated[
        str | None,
        typer.Option(
            help="float16 or float32 (new stores) \\[default: float16; codec models: int8]."
        ),
    ] = None,
    size: SizeOption = None,
    precision: Annotated[
        str,
        typer.Option(
            help="The encoder's precision: auto (fp32 on CPU; on a GPU fp16, but fp32 for a "
            "model whose config says force_upcast), fp32, bf16 or fp16."
        ),
    ] = "auto",
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Encode a data source into a latent store (one Dask task per store shard)."""
    from latentbatch.encode import encode
    from latentbatch.engine.kernel import check_precision
    from latentbatch.stores.store import Layout

    with task_progress("encoding", progress and not as_json) as update:
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
            size=parse_size(size),
            precision=check_precision(precision),
        )
    if as_json:
        emit_json(result.to_dict())
    elif result.skipped:
        make_console().print(f"{data} is already in {store}; nothing to do")
    else:
        verb = "resumed" if result.resumed else "encoded"
        make_console().print(
            f"{verb} {result.encoded} images of {data} into {store} "
            f"rows {result.rows[0]}-{result.rows[1]} in {result.seconds:.1f} s "
            f"({result.images_per_second:.0f} images/s)"
        )
    if result.warning is not None:
        make_console(stderr=True).print(f"warning: {result.warning}", highlight=False)


@app.command("decode")
def decode_command(
    model: ModelOption,
    store: StoreOption,
    out: Annotated[str, typer.Option(help="Output folder: a local path or s3:// URL.")],
    output_format: Annotated[
        str, typer.Option("--format", help=f"One of {', '.join(FORMATS)}.")
    ] = "tar",
    image_codec: ImageCodecOption = "png",
    quality: QualityOption = None,
    images_per_shard: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Images per output shard, exactly \\[default: 10240, fewer for large images "
            "(512 MiB of pixels) or small stores (spread over 32 shards)].",
        ),
    ] = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    allow_model_mismatch: Annotated[
        bool, typer.Option(help="Decode a store made by another model (same latent shape).")
    ] = False,
    skip_canary: Annotated[
        bool, typer.Option(help="Do not check the store's canary (a decoder changed on purpose).")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Latents per decoder call \\[default: 256 on CPU, 4096 on GPU]."),
    ] = None,
    batch_invariance_check: Annotated[
        bool,
        typer.Option(
            help="Also decode the canary rows one at a time and at the working batch, and "
            "report their largest pixel difference."
        ),
    ] = False,
    precision: Annotated[
        str,
        typer.Option(
            help="The decoder's precision: auto (fp32 on CPU; on a GPU fp16 for a model "
            "whose config says force_upcast: false, else bf16 where the GPU has it, else "
            "fp32), fp32, bf16 or fp16. A batch whose bf16 or fp16 output holds NaN or Inf "
            "is decoded again in fp32, and counted."
        ),
    ] = "auto",
    storage_option: StorageOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Decode a latent store into image shards (one Dask task per output shard)."""
    from latentbatch.decode import decode
    from latentbatch.engine.kernel import check_precision
    from latentbatch.outputs.codecs import check_codec
    from latentbatch.outputs.shards import check_format

    with task_progress("decoding", progress and not as_json) as update:
        result = decode(
            model,
            store,
            out,
            fmt=check_format(output_format),
            codec=check_codec(image_codec, quality),
            images_per_shard=images_per_shard,
            allow_model_mismatch=allow_model_mismatch,
            skip_canary=skip_canary,
            storage_options=parse_options(storage_option),
            scheduler=scheduler,
            workers=workers,
            batch_size=batch_size,
            on_progress=update,
            batch_invariance_check=batch_invariance_check,
            precision=check_precision(precision),
        )
    if as_json:
        emit_json(result.to_dict())
        return
    if result.upcast_sentence is not None:
        make_console(stderr=True).print(f"warning: {result.upcast_sentence}", highlight=False)
    if result.batch_invariance is not None:
        make_console().print(
            f"batch invariance: the canary rows decoded one at a time and in one batch differ "
            f"by at most {result.batch_invariance} levels",
            highlight=False,
        )
    make_console().print(
        f"decoded {result.decoded} of {result.count} images into {out} "
        f"({len(result.shards_written)} shards written, {len(result.shards_skipped)} already done) "
        f"in {result.seconds:.1f} s ({result.images_per_second:.0f} images/s); "
        f"canary {result.canary}"
    )
    if result.tiled:
        make_console().print(
            "each image is over the decode memory budget per worker, so it was decoded in "
            "tiles (diffusers' tiled decode; raise $LATENTBATCH_DECODE_MEMORY_MIB to decode "
            "whole images)",
            highlight=False,
        )


app.command("inspect")(inspect_command)


@app.command("verify")
def verify_command(
    out: Annotated[str, typer.Argument(metavar="OUT", help="Output folder: path or s3:// URL.")],
    store: Annotated[
        str | None,
        typer.Option(
            help="Check OUT's ids against this store's committed rows \\[default: the store "
            "its manifest names, when it opens]."
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full/--quick",
            help="Hash every shard (sha256) and check its ids; --quick: sizes only.",
        ),
    ] = True,
    scheduler: SchedulerOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Check the shards on a local cluster of N workers (large outputs) "
            "\\[default: in this process, unless --scheduler].",
        ),
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check an output against its manifest: every shard's sha256 and ids (--quick: sizes).

    Every listed shard there with its recorded size and sha256, none extra, no gap, and
    each shard holding its store's ids in order (the store the manifest names, or
    --store). --quick checks sizes only, which cannot tell a shard of the same size."""
    from latentbatch.outputs.verify import VerifyError, verify_output

    options = parse_options(storage_option)
    if scheduler is None and workers is None:
        result = verify_output(out, options, store_url=store, full=full, ids=full)
    else:
        from latentbatch.engine.cluster import map_results, using

        with using(None, scheduler, workers) as client:
            result = verify_output(
                out, options, store_url=store, full=full, ids=full,
                mapper=lambda fn, checks: (r for r, _ in map_results(client, fn, checks)),
            )  # fmt: skip
    if as_json:
        emit_json(result.to_dict())
    else:
        console = make_console()
        for problem in result.problems:
            line = f"{problem.kind:>10}  {problem.shard}: {problem.detail}"
            console.print(line, highlight=False, soft_wrap=True)
        how = "sha256" if full else "sizes only (--quick: a shard of the same size passes)"
        if result.store:
            how += f", ids against {result.store}"
        elif result.unchecked:
            how += f"; ids not checked: {result.unchecked}"
        verdict = "ok" if result.ok else f"{len(result.problems)} problems"
        console.print(
            f"{out}: {result.shards} shards, {result.images} images checked ({how}): {verdict}",
            highlight=False,
            soft_wrap=True,
        )
    if not result.ok:
        raise VerifyError(
            f"{out} does not match its manifest ({len(result.problems)} problems, each named "
            "above); run the decode again into a new folder, or remove the output"
        )


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
    """The main job on embedded defaults: train, encode and decode mnist5k.

    Train (or reuse) the seed model on mnist5k, encode all 5,000 images, decode them to
    tar shards on a local Dask cluster."""
    from latentbatch.pipeline import run_pipeline

    with task_progress("decoding", progress and not as_json) as update:
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
        emit_json(summary)
        return
    _report_training(result.training)
    console = make_console()
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


# the sub-commands whose code lives in the package's other modules, in --help order
app.command("stores")(stores_command)
app.command("query")(query_command)
app.command("stats")(stats_command)
app.command("score")(score_command)
app.command("evaluate")(evaluate_command)
app.command("generate")(generate_command)
app.command("interpolate")(interpolate_command)
app.command("shift")(shift_command)
app.command("import")(import_command)
app.add_typer(models_app, name="models")
app.add_typer(stack_app, name="stack")


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    command = typer.main.get_command(app)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(args=argv, prog_name="latentbatch", standalone_mode=False)
    except LatentbatchError as exc:
        if debug:
            traceback.print_exc()
            if isinstance(exc, TaskError) and exc.worker_traceback:
                typer.echo(f"the worker's traceback:\n{exc.worker_traceback}", err=True)
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
