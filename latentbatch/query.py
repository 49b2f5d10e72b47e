"""Questions asked of a latent store without decoding it.

- :func:`select`: rows by ids, row ranges, label, and predicates over per-row fields
  (``row``, ``label``), all combined with AND; the answer is sorted row numbers.
- :func:`to_xarray`: the selected latents as an ``xarray.DataArray`` with the store's
  dimension names and the ids as ``sample`` coordinate.
- :func:`statistics`: per-channel mean, std, min and max of the committed latents,
  computed out of core with Dask, one shard at a time; optionally saved in the store.
- :func:`nearest`: exact L2 or cosine neighbours of a query latent over the committed
  rows, streamed shard by shard through Dask (each block keeps only its own top k), so
  memory stays bounded whatever the store size.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np

from latentbatch.errors import LatentbatchError
from latentbatch.store import LatentStore

Metric = Literal["l2", "cosine"]
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_PREDICATE = re.compile(r"^\s*(row|label)\s*(==|!=|<=|>=|<|>)\s*(-?\d+)\s*$")


class QueryError(LatentbatchError):
    """A query does not fit the store."""


def parse_rows(text: str) -> tuple[int, int]:
    """``"I:J"`` → ``(I, J)`` (either side may be empty: ``":100"``, ``"4000:"``)."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start else 0, int(stop) if stop else -1)
    except ValueError:
        raise QueryError(f"row range {text!r} is not I:J (for example 0:100)") from None


def parse_predicate(text: str) -> tuple[str, Callable[[Any, Any], Any], int]:
    """``"label >= 5"`` → (field, operator, value); fields are ``row`` and ``label``."""
    match = _PREDICATE.match(text)
    if match is None:
        raise QueryError(
            f"predicate {text!r} is not FIELD OP INTEGER with FIELD row or label and OP one of "
            f"{' '.join(_OPS)} (for example 'label >= 5')"
        )
    return match[1], _OPS[match[2]], int(match[3])


def _committed(store: LatentStore) -> da.Array:
    """The committed latents as a Dask array with one block per store shard."""
    array = da.from_zarr(store.latents, chunks=(store.shard_rows, *store.latent_shape))
    return array[: store.count]


def select(
    store: LatentStore,
    *,
    ids: Sequence[str] | None = None,
    rows: Sequence[tuple[int, int]] | None = None,
    label: int | None = None,
    where: Sequence[str] = (),
) -> np.ndarray:
    """Sorted row numbers that match every given condition (all rows when none)."""
    count = store.count
    keep = np.ones(count, dtype=bool)
    if ids is not None:
        index = {sample_id: row for row, sample_id in enumerate(store.read_ids(0, count))}
        unknown = [i for i in ids if i not in index]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5])
            raise QueryError(f"{len(unknown)} ids are not in {store.url}: {shown}")
        wanted = np.zeros(count, dtype=bool)
        wanted[[index[i] for i in ids]] = True
        keep &= wanted
    if rows is not None:
        wanted = np.zeros(count, dtype=bool)
        for start, stop in rows:
            wanted[start : count if stop == -1 else stop] = True
        keep &= wanted
    predicates = [parse_predicate(p) for p in where]
    needs_labels = label is not None or any(f == "label" for f, _, _ in predicates)
    if needs_labels and not store.has_labels:
        raise QueryError(f"{store.url} has no labels; select by ids or rows instead")
    labels = store.read_labels(0, count) if needs_labels else None
    if label is not None:
        keep &= labels == label
    numbers = np.arange(count)
    for field, op, value in predicates:
        keep &= op(numbers if field == "row" else labels, value)
    return np.flatnonzero(keep)


def read_rows(store: LatentStore, rows: np.ndarray) -> np.ndarray:
    """Latents of the given rows (any order), as float32."""
    if len(rows) == 0:
        return np.zeros((0, *store.latent_shape), np.float32)
    return np.asarray(store.latents.get_orthogonal_selection((rows,)), dtype=np.float32)


def to_xarray(store: LatentStore, rows: np.ndarray) -> Any:
    """Selected latents as an ``xarray.DataArray`` (dims sample, channel, y, x)."""
    import xarray as xr

    ids = store.read_ids(0, store.count)
    return xr.DataArray(
        read_rows(store, rows),
        dims=("sample", "channel", "y", "x"),
        coords={"sample": [ids[r] for r in rows], "row": ("sample", rows)},
        name="latents",
        attrs={"store": store.url, "model_id": store.model_id},
    )


@dataclass(frozen=True)
class Statistics:
    """Per-channel statistics of the committed latents."""

    count: int
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    overall_std: float

    @property
    def scaling_factor(self) -> float:
        """Diffusion-style latent scaling: 1 / overall standard deviation."""
        return 1.0 / self.overall_std if self.overall_std > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "scaling_factor": self.scaling_factor}


def statistics(store: LatentStore, save: bool = False) -> Statistics:
    """Per-channel mean, std, min, max (float64 accumulation), out of core."""
    if store.count == 0:
        raise QueryError(f"{store.url} has no committed rows")
    latents = _committed(store).astype(np.float64)
    axes = (0, 2, 3)
    mean, std, low, high, overall = dask.compute(
        latents.mean(axis=axes), latents.std(axis=axes), latents.min(axis=axes),
        latents.max(axis=axes), latents.std(),
    )  # fmt: skip
    result = Statistics(
        store.count,
        [float(v) for v in mean],
        [float(v) for v in std],
        [float(v) for v in low],
        [float(v) for v in high],
        float(overall),
    )
    if save:
        store.write_meta(stats=result.to_dict())
    return result


@dataclass(frozen=True)
class Neighbour:
    row: int
    id: str
    distance: float


def _block_top_k(
    block: np.ndarray, query: np.ndarray, k: int, metric: Metric, offset: int
) -> np.ndarray:
    """``(k', 2)`` array of (distance, row) of the block's k nearest rows."""
    flat = block.reshape(len(block), -1).astype(np.float32)
    if metric == "l2":
        distances = np.sqrt(np.maximum(((flat - query) ** 2).sum(axis=1), 0.0))
    else:
        norms = np.linalg.norm(flat, axis=1) * np.linalg.norm(query)
        distances = 1.0 - (flat @ query) / np.where(norms > 0, norms, 1.0)
    take = min(k, len(distances))
    best = np.argpartition(distances, take - 1)[:take] if take < len(distances) else np.arange(take)
    return np.stack(
        [distances[best].astype(np.float64), (best + offset).astype(np.float64)], axis=1
    )


def nearest(
    store: LatentStore,
    query: np.ndarray,
    k: int = 10,
    metric: Metric = "l2",
    exclude: Sequence[int] = (),
) -> list[Neighbour]:
    """The ``k`` committed rows nearest to ``query`` (a latent), nearest first; ties by row."""
    if metric not in ("l2", "cosine"):
        raise QueryError(f"unknown metric {metric!r}; use l2 or cosine")
    if query.shape != store.latent_shape:
        raise QueryError(
            f"query latent has shape {query.shape}, the store holds {store.latent_shape}"
        )
    available = store.count - len(set(exclude))
    if not 1 <= k <= available:
        raise QueryError(
            f"-k must be between 1 and {available} (the rows of {store.url} one can return)"
        )
    flat_query = query.reshape(-1).astype(np.float32)
    want = k + len(exclude)
    latents = _committed(store)
    offsets = np.cumsum((0, *latents.chunks[0][:-1]))
    parts = [
        dask.delayed(_block_top_k)(block, flat_query, want, metric, int(offset))
        for block, offset in zip(latents.to_delayed().ravel(), offsets, strict=True)
    ]
    candidates = np.concatenate(dask.compute(*parts))
    order = np.lexsort((candidates[:, 1], candidates[:, 0]))
    excluded = set(exclude)
    chosen = [(float(d), int(r)) for d, r in candidates[order] if int(r) not in excluded][:k]
    ids = store.ids.get_orthogonal_selection((np.array([r for _, r in chosen]),))
    return [
        Neighbour(r, str(i), d) for (d, r), i in zip(chosen, np.asarray(ids).tolist(), strict=True)
    ]


def encode_image(model_dir: Path, store: LatentStore, path: Path) -> np.ndarray:
    """Encode one image file with the store's model (the conversion rule of
    :mod:`latentbatch.datasets` makes it fit the model's size and mode)."""
    import torch
    from PIL import Image

    from latentbatch.checkpoint import load_model
    from latentbatch.datasets import MAX_PIXELS, Geometry, conform, open_image
    from latentbatch.encode import encode_images

    encoder, info = load_model(model_dir, "encoder")
    if info.model_id != store.model_id:
        raise QueryError(
            f"{model_dir} is model {info.model_id[:12]} but {store.url} holds latents of "
            f"{store.model_id[:12]}; pass the model that made the store"
        )
    try:
        image: Image.Image = open_image(Path(path), MAX_PIXELS)
    except ValueError as exc:
        raise QueryError(f"--near-image {path}: {exc}") from exc
    pixels = conform(image, Geometry(info.config.image_size, info.config.channels))
    return encode_images(encoder, pixels[None], torch.device("cpu"))[0]


def decode_rows(model_dir: Path, store: LatentStore, rows: np.ndarray) -> np.ndarray:
    """Decode selected rows in this process: ``uint8 (n, H, W, C)``."""
    if len(rows) == 0:
        raise QueryError("the selection is empty; there is nothing to decode")
    return decode_in_process(model_dir, read_rows(store, rows))


def decode_selection(
    model_dir: Path, store: LatentStore, rows: np.ndarray, out: str, fmt: str
) -> dict[str, Any]:
    """Decode just the selected rows into ``out`` as one shard (tar, png or zarr) plus a
    manifest that lists the rows; returns the manifest."""
    from latentbatch.checkpoint import read_info
    from latentbatch.shards import (
        FORMATS,
        create_zarr_output,
        encode_png,
        read_manifest,
        write_manifest,
        write_png_shard,
        write_tar_shard,
        write_zarr_shard,
    )

    if fmt not in FORMATS:
        raise QueryError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if read_manifest(out, store.storage_options) is not None:
        raise QueryError(f"{out} already holds a decode; choose another folder for the selection")
    images = decode_rows(model_dir, store, rows)
    all_ids = store.read_ids(0, store.count)
    ids = [all_ids[r] for r in rows]
    options = store.storage_options
    if fmt == "zarr":
        create_zarr_output(out, options, len(rows), images.shape[1:], len(rows), len(rows))
        record = write_zarr_shard(out, options, 0, 0, images)
    else:
        pngs = [encode_png(image) for image in images]
        if fmt == "tar":
            labels = store.read_labels(0, store.count)[rows].tolist() if store.has_labels else None
            record = write_tar_shard(out, options, 0, 0, ids, pngs, labels)
        else:
            record = write_png_shard(out, options, 0, 0, ids, pngs)
    manifest = {
        "format": 1,
        "store": {"url": store.url, "uuid": store.uuid, "count": store.count},
        "model_id": read_info(model_dir).model_id,
        "output_format": fmt,
        "count": len(rows),
        "selection": [int(r) for r in rows],
        "shards": [record.to_dict()],
    }
    write_manifest(out, options, manifest)
    return manifest


def decode_in_process(model_dir: Path, latents: np.ndarray) -> np.ndarray:
    """Decode latents ``(n, C, h, w)`` in this process: ``uint8 (n, H, W, C)``."""
    import torch

    from latentbatch.checkpoint import load_model
    from latentbatch.decode import decode_latents

    decoder, _ = load_model(model_dir, "decoder")
    return decode_latents(decoder, latents.astype(np.float32), torch.device("cpu"))
