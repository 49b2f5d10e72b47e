"""query-latents: a selection or nearest-neighbour query with a UI form; leaves a table
of the results and a preview grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.params import StoreUrl
from latentbatch import query
from latentbatch.orchestration import preview_artifact, summary_artifact
from latentbatch.store import open_store

PREVIEW = 16


@task(name="query", cache_policy=NO_CACHE)
def query_task(
    store_url: str,
    ids: list[str] | None,
    rows: str | None,
    label: int | None,
    where: list[str],
    near: str | None,
    k: int,
    metric: str,
) -> list[dict[str, object]]:
    store = open_store(store_url)
    ranges = [query.parse_rows(rows)] if rows else None
    selected = query.select(store, ids=ids, rows=ranges, label=label, where=where)
    distances: list[float] | None = None
    if near:
        row = int(query.select(store, ids=[near])[0])
        latent = query.read_rows(store, np.array([row]))[0]
        found = query.nearest(store, latent, k, metric, exclude=[row])  # type: ignore[arg-type]
        selected, distances = np.array([n.row for n in found]), [n.distance for n in found]
    all_ids = store.read_ids(0, store.count)
    labels = store.read_labels(0, store.count) if store.has_labels else None
    results: list[dict[str, object]] = []
    for i, r in enumerate(selected):
        entry: dict[str, object] = {"row": int(r), "id": all_ids[r]}
        if labels is not None:
            entry["label"] = int(labels[r])
        if distances is not None:
            entry["distance"] = round(distances[i], 5)
        results.append(entry)
    return results


@flow(name="query-latents", log_prints=True)
def query_latents(
    store: StoreUrl = "out/stores/mnist5k.zarr",
    ids: Annotated[list[str] | None, Field(description="Select these ids")] = None,
    rows: Annotated[str | None, Field(description="Row range I:J")] = None,
    label: Annotated[int | None, Field(description="Only rows with this label")] = None,
    where: Annotated[list[str] | None, Field(description="Predicates such as 'label >= 5'")] = None,
    near: Annotated[str | None, Field(description="Nearest neighbours of this id")] = None,
    k: Annotated[int, Field(ge=1, description="How many neighbours")] = 10,
    metric: Annotated[Literal["l2", "cosine"], Field(description="Distance")] = "l2",
    model_dir: Annotated[
        str | None, Field(description="The store's model, for the preview")
    ] = None,
) -> list[dict[str, object]]:
    results = query_task(store, ids, rows, label, where or [], near, k, metric)
    summary_artifact("query-results", f"Query of {store}", results[:1000] or [{"result": "empty"}])
    if model_dir and results:
        opened = open_store(store)
        images = query.decode_rows(
            Path(model_dir), opened, np.array([r["row"] for r in results[:PREVIEW]])
        )
        preview_artifact(
            "query-preview",
            "Query results",
            [images[i : i + 8] for i in range(0, len(images), 8)],
            f"First {len(images)} of {len(results)} results.",
        )
    print(f"{len(results)} rows")
    return results


if __name__ == "__main__":
    query_latents()
