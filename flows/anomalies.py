"""find-anomalies: score a store's rows against a reference store of normal images;
leaves a summary, a table of the most anomalous rows, and a picture of them (source
images above their reconstructions)."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.orchestration import (
    preview_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import ModelDir, StorageBlock, StoreUrl, described
from latentbatch.previews import anomaly_preview
from latentbatch.stores.query import result_rows, worst
from latentbatch.stores.store import open_store
from latentbatch.uses.anomaly import DEFAULT_K, DEFAULT_QUANTILE, ScoreResult, score


@retrying_task("score")
def score_task(
    store: str, reference: str, k: int, quantile: float, options: dict[str, Any] | None
) -> ScoreResult:
    return score(store, reference, k=k, quantile=quantile, storage_options=options)


@flow(name="find-anomalies", log_prints=True)
@described
def find_anomalies(
    store: StoreUrl = "out/stores/mnist5k.zarr",
    reference: Annotated[
        str, Field(description="A store of normal images, encoded by the same model")
    ] = "out/stores/mnist5k.zarr",
    model_dir: ModelDir = "models/seed-mnist5k",
    k: Annotated[int, Field(ge=1, description="Reference neighbours per row")] = DEFAULT_K,
    quantile: Annotated[
        float,
        Field(gt=0, lt=1, description="Threshold: this quantile of the reference's own scores"),
    ] = DEFAULT_QUANTILE,
    top: Annotated[int, Field(ge=1, le=64, description="Most anomalous rows shown")] = 16,
    storage_block: StorageBlock = None,
) -> dict[str, object]:
    options = storage_options(storage_block)
    result = score_task(store, reference, k, quantile, options)
    summary = result.to_dict()
    summary_artifact("anomaly-summary", f"Anomaly scores of {store}", [summary])
    opened = open_store(store, options)
    rows = worst(opened, min(top, opened.count), by="anomaly")
    table = result_rows(opened, rows)
    summary_artifact("anomaly-top", f"The {len(table)} most anomalous rows", table)
    scores = ", ".join(f"{r['id']} {r['anomaly']:.2f}" for r in table[:8])
    preview_artifact(
        "anomaly-preview",
        "Most anomalous: source images (top), reconstructions (bottom)",
        anomaly_preview(model_dir, opened, rows),
        f"Highest scores first (threshold {result.threshold:.2f}): {scores}, ...",
        scale=max(1, 64 // opened.meta["image"]["height"]),
    )
    print(
        f"scored {result.scored} rows of {store}: {result.above} above the threshold "
        f"{result.threshold:.3f}"
    )
    return summary


if __name__ == "__main__":
    find_anomalies()
