"""query-latents: a selection, nearest-neighbour or worst-reconstructed query with a UI
form; leaves a table of the results (the first 1,000 rows) and a preview grid."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.orchestration import preview_artifact, summary_artifact
from flows.params import StoreUrl, described
from latentbatch.previews import selection_preview
from latentbatch.stores import query
from latentbatch.stores.store import open_store

PREVIEW = 16
SHOWN = 1000  # rows of the answer kept in the table and the flow's result


@task(name="query", cache_policy=NO_CACHE)
def query_task(
    store_url: str,
    ids: list[str] | None,
    rows: str | None,
    label: int | None,
    where: list[str],
    near: str | None,
    k: int,
    metric: query.Metric,
    worst: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """The first :data:`SHOWN` rows of the answer and how many rows it has (a selection
    is streamed a store shard at a time, so its size does not matter)."""
    store = open_store(store_url)
    found = query.answer(
        store,
        ids=ids,
        rows=[query.parse_rows(rows)] if rows else None,
        label=label,
        where=where,
        near=near or None,
        worst_k=worst or None,
        k=k,
        metric=metric,
    )
    shown: list[dict[str, Any]] = []
    count = 0
    for part in found.chunks:
        if len(shown) < SHOWN:
            shown += query.result_rows(store, part[: SHOWN - len(shown)], found.neighbours)
        count += len(part)
    if found.neighbours is not None:
        shown = [{**r, "distance": round(r["distance"], 5)} for r in shown]
    return shown, count


@flow(name="query-latents", log_prints=True)
@described
def query_latents(
    store: StoreUrl = "out/stores/mnist5k.zarr",
    ids: Annotated[list[str] | None, Field(description="Select these ids")] = None,
    rows: Annotated[str | None, Field(description="Row range I:J")] = None,
    label: Annotated[int | None, Field(description="Only rows with this label")] = None,
    where: Annotated[
        list[str] | None, Field(description="Predicates such as 'label >= 5' or 'psnr < 20'")
    ] = None,
    near: Annotated[str | None, Field(description="Nearest neighbours of this id")] = None,
    k: Annotated[int, Field(ge=1, description="How many neighbours")] = 10,
    metric: Annotated[Literal["l2", "cosine"], Field(description="Distance")] = "l2",
    worst: Annotated[
        int | None, Field(ge=1, description="The rows reconstructed worst at encode time")
    ] = None,
    model_dir: Annotated[
        str | None, Field(description="The store's model, for the preview")
    ] = None,
) -> list[dict[str, object]]:
    results, count = query_task(store, ids, rows, label, where or [], near, k, metric, worst)
    summary_artifact("query-results", f"Query of {store}", results or [{"result": "empty"}])
    if model_dir and results:
        opened = open_store(store)
        shown = [int(r["row"]) for r in results[:PREVIEW]]
        preview_artifact(
            "query-preview",
            "Query results",
            selection_preview(model_dir, opened, shown),
            f"First {len(shown)} of {count} results.",
        )
    print(f"{count} rows" + (f" (the first {SHOWN} kept)" if count > SHOWN else ""))
    return results


if __name__ == "__main__":
    query_latents()
