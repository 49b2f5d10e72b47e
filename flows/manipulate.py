"""manipulate-latents: interpolate between two rows, or shift rows from one label towards
another, into a derived store; leaves a summary and a picture (the interpolation strip,
or before/after pairs of the shift)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field

from flows.orchestration import (
    derived_artifact,
    retrying_task,
    storage_options,
    summary_artifact,
)
from flows.params import ModelDir, Scheduler, StorageBlock, StoreUrl, Workers, described
from latentbatch.errors import LatentbatchError
from latentbatch.uses.derive import DeriveResult
from latentbatch.uses.manipulation import interpolate, shift


@retrying_task("manipulate")
def manipulate_task(
    operation: str,
    store: str,
    out: str,
    settings: dict[str, Any],
    model_dir: str,
    scheduler: str | None,
    workers: int | None,
    options: dict[str, Any] | None,
) -> DeriveResult:
    common: dict[str, Any] = {
        "model": model_dir, "storage_options": options, "scheduler": scheduler,
        "workers": workers,
    }  # fmt: skip
    if operation == "interpolate":
        if not settings["from_id"] or not settings["to_id"]:
            raise LatentbatchError("interpolate needs from_id and to_id, two ids of the store")
        return interpolate(
            store, settings["from_id"], settings["to_id"], out, steps=settings["steps"],
            method=settings["interpolation"], **common,
        )  # fmt: skip
    if settings["from_label"] is None or settings["to_label"] is None:
        raise LatentbatchError("shift needs from_label and to_label")
    return shift(
        store, out, from_label=settings["from_label"], to_label=settings["to_label"],
        strength=settings["strength"], method=settings["shift_method"],
        reference_url=settings["reference"] or None, **common,
    )  # fmt: skip


@flow(name="manipulate-latents", log_prints=True)
@described
def manipulate_latents(
    operation: Annotated[
        Literal["interpolate", "shift"],
        Field(description="interpolate between two ids, or shift a label's rows to another"),
    ] = "shift",
    store: StoreUrl = "out/stores/mnist5k.zarr",
    out: Annotated[str, Field(description="The new (derived) store")] = "out/stores/shifted.zarr",
    model_dir: ModelDir = "models/seed-mnist5k",
    from_id: Annotated[str, Field(description="interpolate: the id it starts at")] = "",
    to_id: Annotated[str, Field(description="interpolate: the id it ends at")] = "",
    steps: Annotated[
        int, Field(ge=2, le=10_000, description="interpolate: latents, both ends included")
    ] = 9,
    interpolation: Annotated[
        Literal["linear", "slerp"], Field(description="interpolate: along a line or a great circle")
    ] = "linear",
    from_label: Annotated[
        int | None, Field(description="shift: the label of the rows shifted")
    ] = 3,
    to_label: Annotated[int | None, Field(description="shift: the label they move towards")] = 8,
    strength: Annotated[
        float, Field(ge=-4, le=4, description="shift: 1 the whole way, 0.5 half of it")
    ] = 1.0,
    shift_method: Annotated[
        Literal["matching", "gaussian", "mean"],
        Field(
            description="shift: pair the labels' rows, map their Gaussians, or add the "
            "means' difference"
        ),
    ] = "matching",
    reference: Annotated[
        str, Field(description="shift: store of the labels' means (empty: the store itself)")
    ] = "",
    scheduler: Scheduler = None,
    workers: Workers = None,
    storage_block: StorageBlock = None,
) -> dict[str, object]:
    options = storage_options(storage_block)
    settings = {
        "from_id": from_id, "to_id": to_id, "steps": steps, "interpolation": interpolation,
        "from_label": from_label, "to_label": to_label, "strength": strength,
        "shift_method": shift_method, "reference": reference,
    }  # fmt: skip
    result = manipulate_task(
        operation, store, out, settings, model_dir, scheduler, workers, options
    )
    summary = result.to_dict()
    summary_artifact("manipulate-summary", f"{operation} of {store} into {out}", [summary])
    title = (
        f"Interpolation from {from_id} to {to_id} ({interpolation})"
        if operation == "interpolate"
        else f"Shift from label {from_label} to {to_label}: before (top), after (bottom)"
    )
    derived_artifact(
        "manipulate-preview", title, model_dir, out, f"{result.rows} rows in {out}", options
    )
    print(f"{operation}: {result.rows} rows in {out} ({result.written} written now)")
    return summary


if __name__ == "__main__":
    manipulate_latents()
