"""Import: latents that exist elsewhere (:mod:`latentbatch.sources.latents` reads their
layouts) into a latent store of the model that made them.

The latents' convention is declared: ``scaled`` (the default: as the diffusion model sees
them, ``(z - shift) * scaling``) or ``raw`` (the autoencoder's own, as the edm2/REPA
layout stores its means), with the source's ``scaling_factor`` and ``shift_factor`` when
they differ from the model's ``config.json``. The store always holds them scaled by the
model's factors (stored as found when the source's convention is the store's). float16
latents stay float16; float32 and bfloat16 become float32.

The source is listed by Dask tasks (:mod:`latentbatch.sources.listing`), whose listing is
kept inside the store being written (``.latentbatch-listing-*``, removed when the import
ends). The import is then a derived store's operation (:mod:`latentbatch.uses.derive`):
one Dask task per store shard reads its rows' part of the listing and the files or
chunks that hold them, so the client holds a few numbers per input file group and the
tasks in flight, never an id or a file name per row; the same command run again
resumes, refused in a sentence when the source changed in between.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from distributed import Client

from latentbatch.config import Convention, Formula, ModelConfig, of_config, unpack_sequence
from latentbatch.engine.cluster import map_in_order, using
from latentbatch.errors import DataError
from latentbatch.models.checkpoint import ModelBytes, ModelLocation, read_once
from latentbatch.models.convention import scale_warning
from latentbatch.progress import Progress
from latentbatch.sources.latents import Kind, Reader
from latentbatch.sources.listing import Group, Listing, list_source, read_rows
from latentbatch.storage.fs import StorageOptions, filesystem, is_remote, join
from latentbatch.storage.lease import BOOKKEEPING
from latentbatch.stores.store import Layout, StoreError, create_store, open_store
from latentbatch.uses.derive import DeriveResult, Lineage, derive, lineage_of

Latents = Literal["scaled", "raw"]
LATENTS: tuple[Latents, ...] = ("scaled", "raw")
IMPORT_CONVENTIONS = ("model", "sd", "sdxl", "sd3", "flux1", "flux2", "dc-ae", "qwen", "repa")
"""``--convention``: the model's own, or a family's formula with the model's config
filling what is not given (see :func:`declared`)."""
_FORMULAS: dict[str, Formula] = {
    "sd": "scale-shift", "sd3": "scale-shift", "flux1": "scale-shift", "dc-ae": "scale-shift",
    "repa": "scale-shift", "sdxl": "mean-std", "qwen": "mean-std", "flux2": "mean-std",
}  # fmt: skip
Values = float | Sequence[float] | None


def parse_values(text: str | None, flag: str) -> tuple[float, ...] | None:
    """A flag's number, comma list (one per channel) or ``.json``/``.npy`` file of
    them; a sentence naming ``flag`` when it is none of those."""
    if text is None:
        return None
    try:
        if text.endswith(".npy"):
            return tuple(float(v) for v in np.load(text, allow_pickle=False).ravel())
        if text.endswith(".json"):
            with open(text) as handle:  # noqa: PTH123
                loaded = json.load(handle)
            return tuple(float(v) for v in np.ravel(loaded))
        return tuple(float(v) for v in text.split(","))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"{flag} {text!r} is not a number, a comma list of numbers or a .json/.npy file "
            f"of them ({exc})"
        ) from None


def _values(given: Values) -> tuple[float, ...] | None:
    if given is None:
        return None
    if isinstance(given, (int, float)):
        return (float(given),)
    return tuple(float(v) for v in given)


def declared(
    name: str,
    own: Convention,
    config: ModelConfig,
    *,
    scaling_factor: Values = None,
    shift: Values = None,
    latents_mean: Values = None,
    latents_std: Values = None,
) -> Convention:
    """The convention of scaled latents found elsewhere: ``name`` (one of
    :data:`IMPORT_CONVENTIONS`) chooses the formula, the values given (a number or one
    per channel) override the model's config (``own``, the model's convention)."""
    if name not in IMPORT_CONVENTIONS:
        raise DataError(f"--convention {name!r} is not one of {', '.join(IMPORT_CONVENTIONS)}")
    formula = own.formula if name == "model" else _FORMULAS[name]
    packing = own.packing if name in ("model", "flux2") else "none"
    scale, shift_, mean, std = map(_values, (scaling_factor, shift, latents_mean, latents_std))
    given = any(v is not None for v in (scale, shift_, mean, std))
    source = "given" if given else own.source
    if formula == "scale-shift":
        if name == "repa" and (scale is None or shift_ is None):
            raise DataError(
                "--convention repa takes the cache's per-channel scale and bias: give "
                "--scaling-factor and --shift (a list, or a .json or .npy file of them)"
            )
        mine = own.formula == "scale-shift"
        return Convention(
            formula="scale-shift",
            scale=scale or (own.scale if mine else (config.scaling_factor,)),
            shift=shift_ or (own.shift if mine else (config.shift_factor,)),
            source=source,
        )
    mine = own.formula == "mean-std"
    mean = mean or shift_ or (own.shift if mine else None)
    std = std or (own.std if mine else None)
    if not mean or not std:
        raise DataError(
            f"--convention {name} undoes a per-channel mean and std, which the model's "
            "config.json does not hold: give --latents-mean and --latents-std"
        )
    default_scale = (1.0,) if name in ("qwen", "flux2") else (own.scale if mine else
                                                              (config.scaling_factor,))  # fmt: skip
    return Convention(
        formula="mean-std", scale=scale or default_scale, shift=mean, std=std,
        packing=packing, source=source,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Scaling:
    """How found latents become stored ones: ``raw`` ones (the autoencoder's own), or
    scaled ones by the ``source`` convention, are stored by the model's ``target``
    convention; ``packed`` sequence latents (FLUX.1's, Qwen-Image's) are unpacked
    first."""

    raw: bool
    source: Convention
    target: Convention
    packed: bool = False

    @property
    def as_found(self) -> bool:
        """Stored exactly as found (their convention is the store's)."""
        same = dataclasses.replace(self.source, source=self.target.source) == self.target
        return not self.raw and not self.packed and same

    def apply(self, latents: np.ndarray) -> np.ndarray:
        if self.as_found:
            return latents
        values = latents.astype(np.float32)
        z = values if self.raw else self.source.to_vae(values)
        return np.asarray(self.target.from_vae(z), np.float32)


@dataclass(frozen=True, kw_only=True)
class ImportPart:
    """Rows of one store shard: ``segments`` (a group of the listing, and its rows
    wanted), each row of ``shape`` (the listing's), read with the source's storage
    ``options``."""

    segments: tuple[tuple[Group, int, int], ...]
    shape: tuple[int, ...]
    channels: int
    scaling: Scaling
    options: dict[str, Any]

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        with Reader(self.options) as reader:  # each file opened once for the shard's rows
            rows, ids, labels = read_rows(self.segments, reader, self.shape)
        if self.scaling.packed:
            rows = unpack_sequence(rows)
        return self.scaling.apply(rows[:, : self.channels]), ids, labels  # a mean-and-std's mean


@dataclass(frozen=True, kw_only=True)
class ImportResult:
    """What :func:`import_latents` wrote, and what it noticed: whether it stored the
    means of mean-and-std arrays, and a warning when the latents' spread looks wrong for
    the declared convention."""

    derived: DeriveResult
    layout: Kind
    mean_of_mean_and_std: bool
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch import --json``)."""
        return {
            **self.derived.to_dict(),
            "layout": self.layout,
            "mean_of_mean_and_std": self.mean_of_mean_and_std,
            "warning": self.warning,
        }


def _refuse_a_changed_source(
    store_url: str, options: StorageOptions | None, found: Listing
) -> None:
    """Refuse to resume an import into ``store_url`` whose source no longer lists what
    it listed when the import began (files removed, added or changed): resumed, it
    would mix two listings, skipping or repeating rows. Says what changed."""
    try:
        store = open_store(store_url, options)
    except StoreError:
        return  # none yet (or not a store: the import says so when it starts)
    lineage = lineage_of(store) or {}
    began = lineage.get("parameters", {})
    if lineage.get("operation") != "import" or began.get("from") != found.spec:
        return
    if began.get("listing_sha256") in (None, found.digest):
        return
    where = ""
    for start, stop in store.each_shard():  # a shard at a time, up to the first that moved
        now = found.ids(start, min(stop, found.rows))
        pairs = zip(store.read_ids(start, stop), now, strict=False)
        moved = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if moved is not None:
            row = start + moved
            where = f"; row {row} was {store.read_ids(row, row + 1)[0]}, now {now[moved]}"
            break
    raise DataError(
        f"{found.spec} changed since the import into {store_url} began: it listed "
        f"{began.get('rows', 0):,} rows, now {found.rows:,}{where}. Import it into another "
        f"--store, or delete {store_url} and import again"
    )


def import_latents(
    model: ModelLocation,
    spec: str,
    store_url: str,
    *,
    latents: Latents = "scaled",
    scaling_factor: Values = None,
    shift_factor: Values = None,
    convention: str = "model",
    latents_mean: Values = None,
    latents_std: Values = None,
    packed: bool = False,
    layout: Layout | None = None,
    storage_options: StorageOptions | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> ImportResult:
    """Import the latents ``spec`` names (see the module docstring) into ``store_url``, a
    store of ``model``, the autoencoder that made them."""
    if latents not in LATENTS:
        raise DataError(f"--latents {latents!r} is not scaled or raw")
    read = read_once(model, storage_options)  # the weights read once, here
    config = read.info.config
    with (
        using(client, scheduler, workers) as c,
        _listing_folder(store_url, storage_options) as into,
    ):
        found = list_source(
            spec, into, storage_options, run=lambda fn, specs: map_in_order(c, fn, specs)
        )
        how = Declared(
            latents=latents, convention=convention, scaling_factor=scaling_factor,
            shift=shift_factor, latents_mean=latents_mean, latents_std=latents_std,
            packed=packed,
        )  # fmt: skip
        result = _import(found, read, store_url, how, layout, storage_options, c, on_progress)
    return ImportResult(
        derived=result,
        layout=found.kind,
        mean_of_mean_and_std=_shape(found, packed)[0] == 2 * config.latent_channels,
        warning=scale_warning(open_store(store_url, storage_options)),
    )


@contextmanager
def _listing_folder(store_url: str, options: StorageOptions | None) -> Iterator[str]:
    """A folder for this import's listing inside the store (a store folder made for it
    alone is removed with it, when the import wrote nothing)."""
    fs, path = filesystem(store_url, options)
    existed = fs.exists(path)
    into = join(store_url, f"{BOOKKEEPING}listing-{uuid.uuid4().hex[:12]}")
    try:
        yield into
    finally:
        folder = filesystem(into, options)[1]
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
        if not existed and not is_remote(store_url) and fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)


@dataclass(frozen=True, kw_only=True)
class Declared:
    """What an import is told of its source's latents (:func:`import_latents`' flags)."""

    latents: Latents
    convention: str
    scaling_factor: Values
    shift: Values
    latents_mean: Values
    latents_std: Values
    packed: bool


def _shape(found: Listing, packed: bool) -> tuple[int, ...]:
    """A row's shape ``(C, h, w)``; packed sequence latents ``(h*w/4, 4C)`` unpacked."""
    if not packed:
        return found.shape
    if len(found.shape) != 2:
        raise DataError(
            f"{found.spec} holds rows of shape {found.shape}; --packed 2x2 takes sequence "
            "latents of shape (h*w/4, 4C), as FLUX.1's and Qwen-Image's pipelines pack them"
        )
    return tuple(unpack_sequence(np.zeros((1, *found.shape), np.float32)).shape[1:])


def _batch_norm(read: ModelBytes) -> tuple[list[float], list[float]] | None:
    """FLUX.2's BatchNorm statistics from the model's weights (None for other models)."""
    if read.info.config.preset != "AutoencoderKLFlux2":
        return None
    if read.weights is None:
        raise DataError(
            f"{read.info.location}: a FLUX.2 model's convention is in its weights; give "
            "the model as a local directory to import into its store"
        )
    from safetensors.numpy import load

    tensors = load(read.weights)
    return tensors["bn.running_mean"].tolist(), tensors["bn.running_var"].tolist()


def _import(
    found: Listing,
    read: ModelBytes,
    store_url: str,
    how: Declared,
    layout: Layout | None,
    storage_options: StorageOptions | None,
    client: Client,
    on_progress: Callable[[Progress], None] | None,
) -> DeriveResult:
    """The import of the listed ``found`` into ``store_url`` (a derived store's rows)."""
    info = read.info
    config = info.config
    spec = found.spec
    shape = _shape(found, how.packed)
    channels, *spatial = shape if len(shape) == 3 else (0, 0, 0)
    if channels not in (config.latent_channels, 2 * config.latent_channels):
        raise DataError(
            f"{spec} holds latents of shape {shape} per row; {info.location} "
            f"({config.preset}) makes {config.latent_channels} channels (or "
            f"{2 * config.latent_channels}: a mean and a std)"
        )
    image = (spatial[0] * config.downsampling, spatial[1] * config.downsampling)
    own = (
        of_config(config.diffusers, _batch_norm(read))
        if config.diffusers is not None
        else Convention(formula="scale-shift")
    )
    source = declared(
        how.convention, own, config, scaling_factor=how.scaling_factor, shift=how.shift,
        latents_mean=how.latents_mean, latents_std=how.latents_std,
    )  # fmt: skip
    scaling = Scaling(raw=how.latents == "raw", source=source, target=own, packed=how.packed)
    kept = "float16" if found.dtype == "float16" and scaling.as_found else "float32"
    dtype = None if config.quantized else kept  # a codec model's latents are int8
    chosen = layout or Layout(latent_dtype=dtype)
    if chosen.latent_dtype is None and dtype is not None:
        chosen = Layout(chosen.shard_rows, chosen.chunk_rows, dtype)
    rows = found.rows
    lineage = Lineage(
        operation="import",
        parameters={
            "from": found.spec,
            "layout": found.kind,
            "latents": how.latents,
            "convention": source.to_dict(),
            "packed": how.packed,
            "mean_of_mean_and_std": channels == 2 * config.latent_channels,
            "rows": found.rows,
            "listing_sha256": found.digest,
        },
        seed=None,
        parents=(),
    )
    _refuse_a_changed_source(store_url, storage_options, found)

    def part(a: int, b: int) -> ImportPart:
        return ImportPart(
            segments=found.segments(a, b),
            shape=found.shape,
            channels=config.latent_channels,
            scaling=scaling,
            options=dict(storage_options or {}),
        )

    return derive(
        store_url,
        create=lambda meta: create_store(
            store_url,
            model_id=info.model_id,
            config=config,
            capacity=rows,
            layout=chosen,
            quantization=info.quantization,
            storage_options=storage_options,
            image=image,
            meta=meta,
        ),
        model_id=info.model_id,
        lineage=lineage,
        rows=rows,
        part=part,
        model=read,
        storage_options=storage_options,
        client=client,
        on_progress=on_progress,
    )
