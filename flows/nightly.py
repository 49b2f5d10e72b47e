"""nightly-bulk-decode: decode every store under a root whose output is missing or stale.

A store that fails (its canary drifted, say), is damaged, or whose output folder holds
another store's decode does not stop the others; the run then ends Failed and names each.
The report has a row per store: what was done, why, and for a decoded store its model id,
how its canary compared, shards written and skipped, seconds and images/s. An output that
another writer holds (a manual decode, a second stack) is skipped, not failed; an output
considered up to date is verified against its manifest and its own store (sizes and
ids; ``verify_full``: sha256 too), each shard as a task on the run's cluster, and fails,
named, when it does not match.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed
from pydantic import Field

from flows.decode import decode_summary
from flows.orchestration import (
    ProgressReporter,
    preview_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import (
    DecodePrecision,
    ImageCodecName,
    ImagesPerShard,
    OutputFormat,
    Quality,
    Scheduler,
    StorageBlock,
    Workers,
    described,
)
from latentbatch.choices import Format
from latentbatch.decode import decode
from latentbatch.engine.cluster import connect, map_results
from latentbatch.engine.kernel import Precision
from latentbatch.ids import short_id
from latentbatch.outputs.catalog import BulkItem, models_by_id, plan_bulk
from latentbatch.outputs.codecs import ImageCodec, check_codec
from latentbatch.outputs.verify import verify_output
from latentbatch.previews import decoded_preview
from latentbatch.storage.lease import LeaseHeldError
from latentbatch.stores.store import open_store

PREVIEW_STORES, PREVIEW_IMAGES = 3, 8
# the numbers of a decoded store's row (decode_summary's); empty for the other rows
NUMBERS = (
    "model_id", "canary", "shards_written", "shards_skipped", "seconds", "images_per_second"
)  # fmt: skip


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(root: str, out_root: str, options: dict[str, Any] | None) -> list[BulkItem]:
    return plan_bulk(root, out_root, options)


@retrying_task("decode-store", task_run_name="decode {item.entry.relative}")
def decode_store(
    item: BulkItem,
    models: dict[str, str],
    fmt: Format,
    codec: ImageCodec,
    client: Any,
    options: dict[str, Any] | None,
    images_per_shard: int | None = None,
    precision: Precision = "auto",
) -> dict[str, object]:
    model_id = open_store(item.entry.url, options).model_id  # validates the store
    if model_id not in models:
        raise LookupError(f"no model with id {short_id(model_id)} under the models root")
    progress = ProgressReporter("nightly-progress", f"Decoding {item.entry.url}")
    try:
        result = decode(
            models[model_id],
            item.entry.url,
            item.out,
            fmt=fmt,
            codec=codec,
            images_per_shard=images_per_shard,
            storage_options=options,
            client=client,
            on_progress=progress,
            precision=precision,
        )
    except LeaseHeldError as held:  # another writer is at it: its output, not our failure
        return {"held": str(held)}
    return decode_summary(result, item.entry.url)


@task(name="verify", cache_policy=NO_CACHE, task_run_name="verify {item.entry.relative}")
def verify_task(
    item: BulkItem, options: dict[str, Any] | None, full: bool, client: Any
) -> list[str]:
    """What is wrong with an up-to-date output, a line per problem (empty: it verifies):
    each shard checked as a task on the run's cluster."""
    found = verify_output(
        item.out, options, store_url=item.entry.url, full=full,
        mapper=lambda fn, checks: (r for r, _ in map_results(client, fn, checks)),
    )  # fmt: skip
    return [f"{p.shard}: {p.kind}, {p.detail}" for p in found.problems]


@flow(name="nightly-bulk-decode", log_prints=True)
@described
def nightly_bulk_decode(
    root: Annotated[
        str, Field(description="Folder or s3:// prefix to scan for latent stores")
    ] = "out/stores",
    out_root: Annotated[
        str, Field(description="Outputs go to OUT_ROOT/<store path without .zarr>")
    ] = "out/decoded",
    models_root: Annotated[
        str,
        Field(description="Folder or s3:// prefix of model directories, matched by model id"),
    ] = "models",
    output_format: OutputFormat = "tar",
    scheduler: Scheduler = None,
    workers: Workers = None,
    image_codec: ImageCodecName = "png",
    quality: Quality = None,
    storage_block: StorageBlock = None,
    images_per_shard: ImagesPerShard = None,
    precision: DecodePrecision = "auto",
    verify_full: Annotated[
        bool,
        Field(
            description="Hash every shard of the up-to-date outputs (sha256) besides checking "
            "sizes and ids"
        ),
    ] = False,
) -> State[Any]:
    options = storage_options(storage_block)
    codec = check_codec(image_codec, quality)
    items = plan_task(root, out_root, options)
    models = models_by_id(models_root, options)
    report: list[dict[str, object]] = []
    failed: list[str] = []
    pictures: list[Any] = []
    previewed: list[str] = []
    todo = [i for i in items if i.needs_decode]
    with connect(scheduler, workers) as client:
        for item in items:
            row: dict[str, object] = {"store": item.entry.url, "out": item.out}
            row |= {"before": item.status, **dict.fromkeys(NUMBERS)}
            if item.status == "damaged":
                failed.append(item.entry.url)
                row |= {"action": "failed", "detail": f"store is damaged: {item.detail}"}
            elif item.status == "foreign":
                failed.append(item.entry.url)
                reason = item.detail or "it holds the decode of another store"
                row |= {"action": "failed", "detail": f"output not ours: {reason}"}
            elif not item.needs_decode:
                problems = verify_task(item, options, verify_full, client)
                if problems:
                    failed.append(item.entry.url)
                    shown = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
                    detail = f"output does not match its manifest ({len(problems)}): {shown}"
                    row |= {"action": "failed", "detail": detail}
                else:
                    how = "sha256 and ids" if verify_full else "sizes and ids"
                    row |= {"action": "skipped", "detail": f"output is {item.status} ({how} ok)"}
            else:
                state = decode_store(
                    item,
                    models,
                    output_format,
                    codec,
                    client,
                    options,
                    images_per_shard,
                    precision,
                    return_state=True,
                )
                if state.is_completed() and "held" in state.result():
                    row |= {"action": "skipped", "detail": str(state.result()["held"])[:300]}
                elif state.is_completed():
                    summary = state.result()
                    row |= {"action": "decoded", "detail": f"{summary['decoded']} images"}
                    row |= {key: summary[key] for key in NUMBERS}
                    if len(previewed) < PREVIEW_STORES:
                        model = models[str(summary["model_id"])]
                        rows = decoded_preview(model, item.out, PREVIEW_IMAGES, options)
                        if not pictures or rows[0].shape[1:] == pictures[0].shape[1:]:
                            pictures += rows  # one picture holds images of one size
                            previewed.append(item.entry.relative)
                else:
                    failed.append(item.entry.url)
                    row |= {"action": "failed", "detail": str(state.message)[:300]}
            report.append(row)
            print(f"{row['action']:>8} {item.entry.url}: {row['detail']}")
    summary_artifact(
        "nightly-summary", f"Nightly bulk decode of {root}", report or [{"store": "none found"}]
    )
    if pictures:
        preview_artifact(
            "nightly-preview",
            "Tonight's decodes",
            pictures,
            f"First {PREVIEW_IMAGES} images of {', '.join(previewed)}: source images above "
            "their decoded images where the source is known, decoded images alone otherwise.",
            scale=max(1, 96 // pictures[0].shape[1]),
        )
    if failed:
        return Failed(message=f"{len(failed)} of {len(items)} stores failed: {', '.join(failed)}")
    return Completed(message=f"{len(todo)} decoded, {len(items) - len(todo)} skipped")


if __name__ == "__main__":
    nightly_bulk_decode()
