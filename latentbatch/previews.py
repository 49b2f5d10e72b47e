"""Pictures of what the engine did, for the flows' artifacts and ``--grid`` files: rows
of ``uint8 (n, H, W, C)`` images that :func:`latentbatch.figures.image_grid` lays out.

- :func:`encode_preview`: a source's first images over their stored latents decoded;
- :func:`output_preview`, :func:`decoded_preview`: a finished decode under its originals;
- :func:`selection_preview`: a query's answer (a nearest-neighbour query's query first);
- :func:`anomaly_preview`: chosen rows' source images above their reconstructions;
- :func:`derived_preview`: a derived store (:mod:`latentbatch.uses.derive`): a grid of
  generated images per label, an interpolation strip, or before/after pairs of a shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentbatch.decode import decode_in_process, decode_rows
from latentbatch.errors import LatentbatchError
from latentbatch.models.checkpoint import ModelLocation, read_info
from latentbatch.models.weights import LoadedModel, loaded
from latentbatch.outputs.manifest import read_manifest
from latentbatch.outputs.shards import read_output
from latentbatch.sources.images import Geometry, ImageSource, open_source
from latentbatch.storage.fs import StorageOptions
from latentbatch.stores.query import select
from latentbatch.stores.store import LatentStore, Rows, open_store
from latentbatch.uses.derive import lineage_of


def source_for(
    model_dir: ModelLocation,
    source_spec: str,
    limit: int | None = None,
    options: StorageOptions | None = None,
) -> ImageSource:
    """``source_spec`` opened at the geometry of the model in ``model_dir``."""
    config = read_info(model_dir, options).config
    return open_source(source_spec, Geometry.of(config), limit)


def source_images(source: ImageSource, ids: list[str]) -> np.ndarray:
    """The source images with the given ids, in that order."""
    index = {sample_id: i for i, sample_id in enumerate(source.ids)}
    return source.read(0, len(source))[[index[i] for i in ids]]


def output_preview(model_dir: Path, source_spec: str, out_url: str, n: int = 8) -> list[np.ndarray]:
    """Rows of a picture: the first ``n`` decoded images of ``out_url`` (bottom) under the
    source images they came from (top)."""
    ids, decoded = read_output(out_url, limit=n)
    return [source_images(source_for(model_dir, source_spec), ids), decoded]


def decoded_preview(
    model_dir: ModelLocation, out_url: str, n: int = 8, options: StorageOptions | None = None
) -> list[np.ndarray]:
    """Rows of a picture of any finished decode: its first ``n`` images (bottom) under the
    source images they came from (top) when the store's first source still opens and
    holds them; only the decoded row otherwise."""
    ids, decoded = read_output(out_url, options, limit=n)
    manifest = read_manifest(out_url, options)
    try:
        sources = open_store(manifest.store.url, options).meta["sources"] if manifest else []
    except LatentbatchError:  # the store is gone: the decoded row alone
        sources = []
    try:
        originals = source_images(source_for(model_dir, sources[0]["spec"], None, options), ids)
    except (LatentbatchError, IndexError, KeyError):  # gone, moved, or not these ids
        return [decoded]
    return [originals, decoded]


def encode_preview(
    model_dir: ModelLocation,
    source_spec: str,
    store_url: str,
    n: int = 8,
    options: StorageOptions | None = None,
) -> list[np.ndarray]:
    """Rows of a picture: the first ``n`` images of a source encoded into a store (top)
    over their stored latents decoded in this process (bottom)."""
    source = source_for(model_dir, source_spec, None, options)
    store = open_store(store_url, options)
    records = [s for s in store.meta["sources"] if s["spec"] == source.spec]
    start = int(records[-1]["rows"][0]) if records else 0
    stop = min(store.count, start + n)
    ids = store.read_ids(start, stop)
    decoded = decode_in_process(model_dir, store.read_latents(start, stop), options)
    return [source_images(source, ids), decoded]


def selection_preview(
    model: ModelLocation | LoadedModel,
    store: LatentStore,
    rows: Rows,
    query_latent: np.ndarray | None = None,
    per_row: int = 8,
) -> list[np.ndarray]:
    """Rows of a picture of a query's answer: the first ``4 * per_row`` selected rows
    decoded, ``per_row`` to a line; for a nearest-neighbour query, one line holding the
    query decoded and then its first ten neighbours. ``model`` is a location, or a model
    already loaded (:func:`latentbatch.models.weights.loaded`)."""
    model = loaded(model, store.storage_options)
    images = decode_rows(model, store, list(rows)[: 4 * per_row])
    if query_latent is not None:
        query_image = decode_in_process(model, query_latent[None])
        return [np.concatenate([query_image, images[:10]])]
    return [images[i : i + per_row] for i in range(0, len(images), per_row)]


def anomaly_preview(
    model: ModelLocation | LoadedModel, store: LatentStore, rows: Rows
) -> list[np.ndarray]:
    """Rows of a picture of chosen rows (the most anomalous, say): their source images
    (top) above their reconstructions decoded from the store (bottom) when every row's
    source still opens; the reconstructions alone otherwise."""
    model = loaded(model, store.storage_options)
    rows = [int(r) for r in rows]
    decoded = decode_rows(model, store, rows)
    geometry = Geometry.of(model.info.config)
    opened: dict[str, ImageSource] = {}
    originals = []
    try:
        for row in rows:
            record = next(s for s in store.meta["sources"] if s["rows"][0] <= row < s["rows"][1])
            if record["spec"] not in opened:
                opened[record["spec"]] = open_source(record["spec"], geometry)
            index = row - int(record["rows"][0])
            originals.append(opened[record["spec"]].read(index, index + 1)[0])
    except (LatentbatchError, StopIteration, IndexError, KeyError):  # gone or moved
        return [decoded]
    return [np.stack(originals), decoded]


def derived_preview(
    model: ModelLocation | LoadedModel, store: LatentStore, per_row: int = 10
) -> list[np.ndarray]:
    """Rows of a picture of a derived store, by its operation: for a generate, the first
    ``per_row`` samples of each label (a line per label, at most 10 labels); for an
    interpolation, its strip (``per_row`` evenly spaced steps, ends included, when it has
    more); for a shift, the first ``per_row`` chosen rows decoded from the parent store
    (top) above their shifted latents decoded (bottom)."""
    lineage = lineage_of(store)
    if lineage is None:
        raise LatentbatchError(f"{store.url} is not a derived store; it has no lineage to picture")
    model = loaded(model, store.storage_options)
    operation = lineage["operation"]
    if operation == "generate":
        count = int(lineage["parameters"]["count"])
        labels = lineage["parameters"]["labels"][:10]
        return [
            decode_rows(model, store, range(i * count, i * count + min(count, per_row)))
            for i in range(len(labels))
        ]
    if operation == "import":  # the first rows
        return [decode_rows(model, store, range(min(per_row, store.count)))]
    if operation == "interpolate":
        steps = np.unique(np.linspace(0, store.count - 1, min(per_row, store.count)).round())
        return [decode_rows(model, store, steps.astype(np.int64))]
    shown = range(min(per_row, store.count))
    prefix = f"shift-L{lineage['parameters']['from_label']}-L{lineage['parameters']['to_label']}-"
    ids = [i.removeprefix(prefix) for i in store.read("ids", list(shown)).tolist()]
    shifted = decode_rows(model, store, shown)
    try:
        parent = open_store(lineage["parents"][0]["url"], store.storage_options)
        rows = select(parent, ids=ids)  # ascending, as the shift wrote them
    except LatentbatchError:  # the parent is gone or changed: the shifted row alone
        return [shifted]
    return [decode_rows(model, parent, rows), shifted]
