"""Latent stores, formats 1 (float latents) and 2 (integer latents): a Zarr v3 group.

::

    STORE/                       group; attributes["latentbatch"] = metadata below
      latents  [N, C, h, w]      float16 (default) or float32; int8 for a quantised model
                                 (the codec preset); dims (sample, channel, y, x)
      ids      [N]               strings, unique, safe file names
      labels   [N]               int32, -1 = unknown (always present; all -1 without labels)
      quality  [N]               float32, each row's PSNR (dB) at encode time: its image
                                 decoded from the stored latent against the original
                                 (NaN = not measured; stores of earlier releases lack it)
      anomaly  [N]               float32, each row's anomaly score (``latentbatch score``;
                                 optional, NaN = not scored)

Arrays are sharded along ``sample`` only; codecs bytes → zstd → crc32c, so a flipped
byte fails loudly. Float latents are chunked along ``sample`` only (zstd level 3). Integer
latents are entropy-coded by zstd: a chunk holds one channel of a whole shard's rows
(``(shard_rows, 1, h, w)``, each channel's symbols together, where its statistics hold),
compressed at level 15; the decoder reads them back as they are, so a store of int8
latents is an ordinary integer array to xarray or any Zarr reader.

Metadata: ``format``, ``uuid``, ``created``, ``model_id``, ``model`` (architecture),
``latent`` (dtype, shape, and ``quantization``: null for float latents; for integer ones
the step the integers count in, their clamp range, and the model's entropy model of them,
a logistic per channel, ``loc`` and ``scale``; and for a diffusers autoencoder's latents
their ``convention``: scaled or not, ``scaling_factor``, ``shift_factor``), ``image``
(height, width, mode), ``sources`` (spec, description, rows), ``layout`` (shard_rows,
chunk_rows), ``labels`` (whether any are known), ``pending`` (an unfinished encode), the
committed ``count``, and for a derived store (:mod:`latentbatch.uses.derive`) its ``lineage``.

Format 2 is a store of integer latents (``latent.quantization`` set); stores of float
latents are format 1, as they always were (``latent.quantization`` null, which earlier
releases ignore), so both kinds are read, decoded and appended to by this release and a
float store by earlier ones too.

Commit protocol: writers write whole shards, one writer per shard; the client then
advances ``count`` with a single write of the group metadata (:class:`Commits`). Readers
trust rows ``< count`` only; rows past it (capacity) may be half-written.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from latentbatch.config import ModelConfig
from latentbatch.errors import ConfigError, LatentbatchError
from latentbatch.storage.fs import (
    StorageOptions,
    filesystem,
    join,
    named_write,
    zarr_options,
)
from latentbatch.storage.lease import holds_data

FLOAT_FORMAT, INTEGER_FORMAT = 1, 2
READABLE_FORMATS = (FLOAT_FORMAT, INTEGER_FORMAT)
ATTRS = "latentbatch"
DEFAULT_SHARD_ROWS = 1024
DEFAULT_CHUNK_ROWS = 128
SHARD_BYTES = 16 * 2**20
"""Latent bytes a default store shard aims at (fewer rows than 1,024 for large latents)."""
CHUNK_BYTES = 2**20
"""Latent bytes a default inner chunk aims at (fewer rows than 128 for large latents)."""
LATENT_DTYPES = ("float16", "float32")
INTEGER_ZSTD_LEVEL = 15
ANOMALY = "anomaly"  # optional per-row scores of `latentbatch score`


Rows = Sequence[int] | npt.NDArray[np.integer[Any]]
"""Row numbers of a store, as a list or an integer array (what a selection returns)."""
Field = Literal["latents", "ids", "labels", "quality", "anomaly"]
"""The per-row arrays of a store (:meth:`LatentStore.read`)."""


class StoreError(LatentbatchError):
    """A path is not a valid latent store, or an operation does not fit the store."""


def read_checked(url: str, array: zarr.Array[Any], where: str, selection: Any) -> np.ndarray:
    """``array[selection]`` (a slice of rows, or row numbers), with a damaged chunk (its
    checksum does not match, or it does not decompress) reported as a
    :class:`StoreError` naming the store, the array and the rows: every read of a store's
    arrays goes through here, on the client or in a Dask task."""
    try:
        if isinstance(selection, slice):
            return np.asarray(array[selection])
        return np.asarray(array.get_orthogonal_selection((selection,)))
    except ValueError as exc:
        raise StoreError(
            f"{url}: the '{array.basename}' array cannot be read at {where} ({exc}); "
            "a chunk is damaged: restore the store from a copy or re-encode its images"
        ) from None


def _codecs(level: int = 3) -> list[ZstdCodec | Crc32cCodec]:
    return [ZstdCodec(level=level), Crc32cCodec()]


def shard_ranges(start: int, stop: int, shard_rows: int) -> list[tuple[int, int]]:
    """Split rows ``[start, stop)`` at multiples of ``shard_rows``."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be positive")
    out = []
    row = start
    while row < stop:
        end = min(stop, (row // shard_rows + 1) * shard_rows)
        out.append((row, end))
        row = end
    return out


@dataclass(frozen=True)
class Layout:
    """How a new store is chunked: rows per shard (one object, and one task of an encode
    or import) and per inner chunk (the unit a reader fetches), and the dtype of float
    latents (``None``: float16; a quantised model's are int8). Rows not given follow the
    latent's bytes (:meth:`rows_for`)."""

    shard_rows: int | None = None
    chunk_rows: int | None = None
    latent_dtype: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in (self.shard_rows, self.chunk_rows) if n is not None]
        if any(n < 1 for n in given) or (
            len(given) == 2 and given[0] % given[1]  # shard_rows a multiple of chunk_rows
        ):
            raise StoreError(
                f"shard_rows ({self.shard_rows}) must be a positive multiple of chunk_rows "
                f"({self.chunk_rows})"
            )
        if self.latent_dtype is not None and self.latent_dtype not in LATENT_DTYPES:
            raise StoreError(
                f"latent dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype}"
            )

    def rows_for(self, row_bytes: int) -> tuple[int, int]:
        """(shard rows, chunk rows) for latents of ``row_bytes`` bytes a row: those given,
        and for those not, the power of two of rows nearest below :data:`SHARD_BYTES` (at
        least 16, at most :data:`DEFAULT_SHARD_ROWS`) and :data:`CHUNK_BYTES` (at most
        :data:`DEFAULT_CHUNK_ROWS`), so the work and memory of a task follow the size of
        its latents (and images) rather than a count."""

        def power_of_two(budget: int, low: int, high: int) -> int:
            rows = max(low, min(high, budget // max(1, row_bytes)))
            return 1 << (rows.bit_length() - 1)

        chunk = self.chunk_rows or power_of_two(CHUNK_BYTES, 1, DEFAULT_CHUNK_ROWS)
        if self.shard_rows is None:
            shard = max(chunk, power_of_two(SHARD_BYTES, 16, DEFAULT_SHARD_ROWS))
            return shard // chunk * chunk, chunk
        return self.shard_rows, self.chunk_rows or math.gcd(self.shard_rows, chunk)


def _where(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:5])
    return f"rows {shown}{' ...' if len(rows) > 5 else ''}"


class LatentStore:
    """An opened latent store. Use :func:`open_store` or :func:`create_store`."""

    def __init__(self, url: str, group: zarr.Group, storage_options: StorageOptions | None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.group = group
        self.meta: dict[str, Any] = _metadata(url, group)
        self.latents = _array(url, group, "latents")
        self.ids = _array(url, group, "ids")
        self.labels = _array(url, group, "labels")
        self.quality = _array(url, group, "quality") if "quality" in group else None
        self.anomaly = _array(url, group, ANOMALY) if ANOMALY in group else None

    # metadata --------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Committed rows: the only rows a reader may trust."""
        return int(self.meta["count"])

    @property
    def capacity(self) -> int:
        return int(self.latents.shape[0])

    @property
    def model_id(self) -> str:
        return str(self.meta["model_id"])

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.latents.shape[1:]
        return (channels, height, width)

    @property
    def image_size(self) -> tuple[int, int]:
        """The images' height and width in pixels."""
        return int(self.meta["image"]["height"]), int(self.meta["image"]["width"])

    @property
    def convention(self) -> dict[str, Any] | None:
        """How a diffusers autoencoder's latents are stored here (``latent.convention``:
        :attr:`latentbatch.config.ModelConfig.convention`); None for the presets'."""
        found = self.meta["latent"].get("convention")
        return dict(found) if isinstance(found, Mapping) else None

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How integer latents were quantised (step, range, the model's prior per
        channel), or None for float latents."""
        found = self.meta["latent"].get("quantization")
        return dict(found) if isinstance(found, Mapping) else None

    @property
    def shard_rows(self) -> int:
        return int(self.meta["layout"]["shard_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.meta["layout"]["chunk_rows"])

    @property
    def uuid(self) -> str:
        return str(self.meta["uuid"])

    @property
    def has_labels(self) -> bool:
        return bool(self.meta.get("labels"))

    @property
    def has_quality(self) -> bool:
        """Whether the store records each row's PSNR at encode time."""
        return self.quality is not None

    @property
    def pending(self) -> dict[str, Any] | None:
        return self.meta.get("pending")

    def shards(self, stop: int | None = None) -> list[tuple[int, int]]:
        """Row ranges of the committed rows (or up to ``stop``), one per store shard."""
        return shard_ranges(0, self.count if stop is None else stop, self.shard_rows)

    def each_shard(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """The row ranges of :meth:`shards` from row ``start`` (a shard boundary), one at a
        time: what a scan of a store of any size iterates over."""
        stop = self.count if stop is None else stop
        for first in range(start, stop, self.shard_rows):
            yield first, min(first + self.shard_rows, stop)

    # reading ---------------------------------------------------------------------------
    def read(self, field: Field, rows: slice | Rows) -> np.ndarray:
        """The one per-row accessor: committed rows of ``field`` (``latents``, ``ids``,
        ``labels``, ``quality`` or ``anomaly``), a range (``slice(start, stop)``) or the
        given rows in their order. Rows past ``count`` are refused, and so are a store's
        missing quality and unfinished anomaly scores, each in a sentence; a chunk that
        does not read back is named."""
        checked = {"quality": self._quality, "anomaly": self._anomaly}.get(field)
        array: zarr.Array[Any] = checked() if checked else getattr(self, field)
        if isinstance(rows, slice):
            start, stop = rows.start or 0, self.count if rows.stop is None else rows.stop
            if not 0 <= start <= stop <= self.count:
                raise StoreError(
                    f"rows [{start}, {stop}) are outside the {self.count} committed rows of "
                    f"{self.url}"
                )
            found = read_checked(self.url, array, f"rows [{start}, {stop})", slice(start, stop))
        else:
            selection = np.asarray(rows, dtype=np.int64)
            if len(selection) and not (selection.min() >= 0 and selection.max() < self.count):
                raise StoreError(
                    f"rows {rows} are outside the {self.count} committed rows of {self.url}"
                )
            if not len(selection):
                return np.zeros((0, *array.shape[1:]), object if field == "ids" else array.dtype)
            found = read_checked(self.url, array, _where(selection), selection)
        if field == "ids":
            return np.array([str(i) for i in found.tolist()], object)
        return found.astype(np.int32, copy=False) if field == "labels" else found

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        return self.read("latents", slice(start, stop))

    def read_ids(self, start: int, stop: int) -> list[str]:
        return list(self.read("ids", slice(start, stop)).tolist())

    def read_labels(self, start: int, stop: int) -> np.ndarray:
        return self.read("labels", slice(start, stop))

    def _quality(self) -> zarr.Array[Any]:
        if self.quality is None:
            raise StoreError(
                f"{self.url} records no per-image quality (it was encoded by an earlier "
                "release); re-encode its images into a new store to get it"
            )
        return self.quality

    def read_quality(self, start: int, stop: int) -> np.ndarray:
        """Each row's PSNR (dB) at encode time, float32 (NaN where not measured)."""
        return self.read("quality", slice(start, stop))

    @property
    def has_anomaly(self) -> bool:
        """Whether rows carry anomaly scores of a finished ``latentbatch score`` (a scoring
        that stopped half-way, the disk full say, is marked ``pending`` until re-run)."""
        scored = self.meta.get("anomaly")
        return self.anomaly is not None and isinstance(scored, dict) and not scored.get("pending")

    def _anomaly(self) -> zarr.Array[Any]:
        """The ``anomaly`` array of a finished scoring, else a :class:`StoreError` saying
        why there is none to read (never scored, or a scoring that did not finish)."""
        if self.anomaly is None:
            raise StoreError(
                f"{self.url} has no anomaly scores; score it first with "
                "`latentbatch score STORE --reference REF`"
            )
        if not self.has_anomaly:
            raise StoreError(
                f"{self.url}: its anomaly scoring did not finish (it stopped, or the disk "
                "filled); run `latentbatch score` again"
            )
        return self.anomaly

    def require_anomaly(self) -> None:
        """Refuse, in a sentence, a store without finished anomaly scores."""
        self._anomaly()

    def read_anomaly(self, start: int, stop: int) -> np.ndarray:
        """Each row's anomaly score, float32 (NaN where not scored)."""
        return self.read("anomaly", slice(start, stop))

    def create_anomaly(self) -> None:
        """Create the ``anomaly`` array (float32 along ``sample``, NaN = not scored) unless
        it exists: before the tasks that write it, so that no two create it."""
        if self.anomaly is None:
            layout = self.meta["layout"]
            with named_write(self.url, f"the anomaly array of {self.url}"):
                self.anomaly = self._create_anomaly(layout)

    def write_anomaly(self, start: int, scores: np.ndarray) -> None:
        """Write rows' anomaly scores (a whole store shard, by one writer), creating the
        ``anomaly`` array the first time (:meth:`create_anomaly`)."""
        self.create_anomaly()
        assert self.anomaly is not None
        stop = start + len(scores)
        with named_write(self.url, f"anomaly scores of rows [{start}, {stop}) of {self.url}"):
            self.anomaly[start:stop] = scores.astype(np.float32, copy=False)

    def _create_anomaly(self, layout: dict[str, Any]) -> zarr.Array[Any]:
        return self.group.create_array(
            ANOMALY,
            shape=(self.capacity,),
            dtype="float32",
            chunks=(layout["chunk_rows"],),
            shards=(layout["shard_rows"],),
            dimension_names=("sample",),
            fill_value=float("nan"),
            compressors=_codecs(),
        )

    # writing ---------------------------------------------------------------------------
    def write_meta(self, **updates: Any) -> None:
        """Update metadata with one write of the group's metadata object (atomic: a
        write that fails, the disk full say, leaves the last one whole, and is said in a
        sentence naming the store)."""
        meta = {**self.meta, **updates}
        with named_write(self.url, f"the metadata of {self.url}"):
            self.group.attrs[ATTRS] = meta
        self.meta = meta

    def resize(self, capacity: int) -> None:
        """Grow (or shrink to no less than ``count``) every array's row count."""
        if capacity < self.count:
            raise StoreError(f"cannot shrink {self.url} below its {self.count} committed rows")
        with named_write(self.url, f"the array shapes of {self.url} (grown to {capacity} rows)"):
            for array in self._arrays():
                array.resize((capacity, *array.shape[1:]))

    def _arrays(self) -> list[zarr.Array[Any]]:
        optional = [a for a in (self.quality, self.anomaly) if a is not None]
        return [self.latents, self.ids, self.labels, *optional]

    def write_rows(
        self,
        start: int,
        latents: np.ndarray,
        ids: list[str],
        labels: np.ndarray,
        quality: np.ndarray | None = None,
    ) -> None:
        """Write rows ``[start, start + n)`` of every array (a whole shard, by one writer);
        without ``quality`` the rows' PSNRs are NaN (not measured)."""
        stop = start + len(latents)
        if quality is None:
            quality = np.full(len(latents), np.nan, np.float32)
        if not len(latents) == len(ids) == len(labels) == len(quality):
            raise StoreError("latents, ids, labels and quality must have the same number of rows")
        if stop > self.capacity:
            raise StoreError(f"rows [{start}, {stop}) are past the capacity {self.capacity}")
        # not committed (count is not advanced) if it fails: a re-run rewrites the shard
        with named_write(self.url, f"rows [{start}, {stop}) of {self.url}"):
            self.latents[start:stop] = latents.astype(self.latents.dtype, copy=False)
            self.ids[start:stop] = np.asarray(ids, dtype=object).astype(str)
            self.labels[start:stop] = labels.astype(np.int32, copy=False)
            if self.quality is not None:
                self.quality[start:stop] = quality.astype(np.float32, copy=False)

    def bytes_on_disk(self) -> dict[str, int]:
        """Bytes stored per array, and in total."""
        fs, root = filesystem(self.url, self.storage_options)
        sizes = {a.basename: int(fs.du(join(root, a.basename))) for a in self._arrays()}
        sizes["total"] = int(fs.du(root))
        return sizes

    def report(self, with_bytes: bool = False) -> dict[str, Any]:
        """Everything ``latentbatch inspect`` shows: rows, layout, model, and from the
        store's metadata alone, so its cost does not grow with the store. ``with_bytes``
        adds what needs a listing of every object (``--bytes``): bytes on disk, bits per
        pixel (the latents' bytes over the committed images' pixels) and the rows that
        shard objects cover (``written_rows``); they are None otherwise."""
        sizes = self.bytes_on_disk() if with_bytes else None
        meta = self.meta
        pixels = self.count * meta["image"]["height"] * meta["image"]["width"]
        return {
            "store": self.url,
            "format": meta["format"],
            "uuid": self.uuid,
            "created": meta["created"],
            "count": self.count,
            "written_rows": self.written_rows() if with_bytes else None,
            "capacity": self.capacity,
            "pending": self.pending,
            "latent_shape": list(self.latent_shape),
            "latent_dtype": str(self.latents.dtype),
            "chunk_shape": list(self.latents.chunks),
            "quantization": self.quantization,
            "convention": meta["latent"].get("convention"),
            "chunk_rows": meta["layout"]["chunk_rows"],
            "shard_rows": meta["layout"]["shard_rows"],
            "shards": len(self.shards()),
            "model_id": self.model_id,
            "model": meta["model"],
            "image": meta["image"],
            "labels": self.has_labels,
            "quality": self.has_quality,
            "anomaly": self.meta.get("anomaly") if self.has_anomaly else None,
            "canary": (
                f"{len(meta['canary']['rows'])} rows, decoded on {meta['canary']['device']} "
                f"with torch {meta['canary']['torch']}"
                if isinstance(meta.get("canary"), dict)
                else None
            ),
            "sources": meta["sources"],
            "lineage": meta.get("lineage"),
            "bytes": sizes,
            "bits_per_pixel": 8 * sizes["latents"] / pixels if sizes and pixels else None,
        }

    def written_rows(self) -> int:
        """Rows covered by shard objects that exist (committed or not)."""
        fs, root = filesystem(self.url, self.storage_options)
        prefix = join(root, "latents", "c")
        if not fs.exists(prefix):
            return 0
        indices = [int(p.rstrip("/").split("/")[-4]) for p in fs.find(prefix)]
        if not indices:
            return 0
        return min(self.capacity, (max(indices) + 1) * self.shard_rows)


def _open_group(
    url: str, storage_options: StorageOptions | None, mode: Literal["r", "r+"]
) -> zarr.Group:
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        raise StoreError(f"{url} does not exist; create it with `latentbatch encode`")
    try:
        group = zarr.open_group(url, mode=mode, storage_options=zarr_options(url, storage_options))
    except Exception as exc:
        raise StoreError(f"{url} is not a latent store: it is not a Zarr v3 group ({exc})") from exc
    if group.metadata.zarr_format != 3:
        raise StoreError(
            f"{url} is a Zarr v{group.metadata.zarr_format} group; latent stores are Zarr v3"
        )
    return group


def _metadata(url: str, group: zarr.Group) -> dict[str, Any]:
    meta = group.attrs.get(ATTRS)
    if not isinstance(meta, Mapping):
        raise StoreError(f"{url} is a Zarr group but not a latent store (no '{ATTRS}' attributes)")
    return dict(meta)


def _array(url: str, group: zarr.Group, name: str) -> zarr.Array[Any]:
    try:
        array = group[name]
    except KeyError:
        raise StoreError(
            f"{url} lacks the '{name}' array; it is damaged or not a latent store"
        ) from None
    except Exception as exc:
        raise StoreError(f"{url} has a damaged '{name}' array: {exc}") from exc
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{url}/{name} is a group, not an array; it is damaged")
    return array


def _validate(url: str, group: zarr.Group) -> None:
    meta = _metadata(url, group)
    version = meta.get("format")
    if version not in READABLE_FORMATS:
        raise StoreError(
            f"{url} has store format version {version!r}; this latentbatch reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))} (upgrade latentbatch, or re-encode "
            "the images)"
        )
    missing = [
        k for k in ("count", "model_id", "model", "latent", "layout", "uuid") if k not in meta
    ]
    if missing:
        raise StoreError(
            f"{url} lacks store metadata {missing}; it is damaged or not a latent store"
        )
    names = ["latents", "ids", "labels", *(n for n in ("quality", ANOMALY) if n in group)]
    arrays = [_array(url, group, name) for name in names]
    latents = arrays[0]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise StoreError(f"{url} has arrays of different lengths {sorted(rows)}; it is damaged")
    if not 0 <= int(meta["count"]) <= latents.shape[0]:
        raise StoreError(f"{url} claims {meta['count']} rows but holds {latents.shape[0]}")
    if list(latents.shape[1:]) != list(meta["latent"]["shape"]):
        raise StoreError(
            f"{url} latents have shape {latents.shape[1:]}, metadata says {meta['latent']['shape']}"
        )
    integer = np.dtype(str(latents.dtype)).kind == "i"
    quantized = isinstance(meta["latent"].get("quantization"), Mapping)
    if (version == INTEGER_FORMAT) != integer or integer != quantized:
        raise StoreError(
            f"{url} claims format {version} but holds {latents.dtype} latents "
            f"{'with' if quantized else 'without'} a quantization; it is damaged: restore "
            "it from a copy or re-encode its images"
        )


def open_store(
    url: str, storage_options: StorageOptions | None = None, *, writable: bool = False
) -> LatentStore:
    """Open and validate a latent store; errors say what is wrong."""
    group = _open_group(url, storage_options, "r+" if writable else "r")
    _validate(url, group)
    return LatentStore(url, group, storage_options)


def create_store(
    url: str,
    *,
    model_id: str,
    config: ModelConfig,
    capacity: int,
    layout: Layout | None = None,
    quantization: Mapping[str, Any] | None = None,
    storage_options: StorageOptions | None = None,
    image: tuple[int, int] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> LatentStore:
    """Create an empty store with room for ``capacity`` latents of the model ``model_id``
    whose architecture is ``config``; a quantised model's latents are int8, and
    ``quantization`` (the step, range and prior of ``ModelInfo.quantization``) describes them.
    ``image`` (height, width) is the images' size, for a model that takes any size
    (default: the model's own). ``meta`` adds metadata (a derived store's lineage) to the
    one write that makes the group a store, so no store exists without it."""
    layout = layout or Layout()
    if config.latent_dtype is not None and layout.latent_dtype not in (None, config.latent_dtype):
        raise StoreError(
            f"the {config.preset} preset's latents are integers, stored as "
            f"{config.latent_dtype}; drop --latent-dtype {layout.latent_dtype}"
        )
    if config.quantized and quantization is None:
        raise StoreError(f"a store of the {config.preset} preset needs its quantization")
    latent_dtype = config.latent_dtype or layout.latent_dtype or "float16"
    if holds_data(url, storage_options):
        raise StoreError(f"{url} already exists; open it, or add to it with --append")
    # "a", not "w": the folder may hold the lease of the encode creating it (nothing else)
    group = zarr.open_group(url, mode="a", storage_options=zarr_options(url, storage_options))
    image_height, image_width = image or (config.image_size, config.image_size)
    try:
        shape = config.latent_shape_at(image_height, image_width)
    except ConfigError as exc:
        raise StoreError(str(exc)) from None
    _, height, width = shape
    integer = np.dtype(latent_dtype).kind == "i"
    shard_rows, chunk_rows = layout.rows_for(int(np.prod(shape)) * np.dtype(latent_dtype).itemsize)
    group.create_array(
        "latents",
        shape=(capacity, *shape),
        dtype=latent_dtype,
        chunks=(shard_rows, 1, height, width) if integer else (chunk_rows, *shape),
        shards=(shard_rows, *shape),
        dimension_names=("sample", "channel", "y", "x"),
        fill_value=0,
        compressors=_codecs(INTEGER_ZSTD_LEVEL if integer else 3),
        overwrite=True,
    )
    per_row: tuple[tuple[str, Any, Any], ...] = (
        ("ids", str, ""), ("labels", "int32", -1), ("quality", "float32", float("nan"))
    )  # fmt: skip
    for name, dtype, fill in per_row:
        group.create_array(
            name,
            shape=(capacity,),
            dtype=dtype,
            chunks=(chunk_rows,),
            shards=(shard_rows,),
            dimension_names=("sample",),
            fill_value=fill,
            compressors=_codecs(),
            overwrite=True,
        )
    attributes: dict[str, Any] = {
        "format": INTEGER_FORMAT if integer else FLOAT_FORMAT,
        "uuid": uuid.uuid4().hex,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_id": model_id,
        "model": config.to_dict(),
        "latent": {
            "dtype": latent_dtype,
            "shape": list(shape),
            "quantization": dict(quantization) if quantization is not None else None,
            # a diffusers autoencoder's convention (the presets' metadata as before)
            **({"convention": config.convention} if config.convention is not None else {}),
        },
        "image": {"height": image_height, "width": image_width, "mode": config.mode},
        "layout": {"shard_rows": shard_rows, "chunk_rows": chunk_rows},
        "sources": [],
        "labels": False,
        "pending": None,
        "count": 0,
        **(meta or {}),
    }
    group.attrs[ATTRS] = attributes
    return LatentStore(url, group, storage_options)


class Commits:
    """The client's side of the commit protocol: shards finish in any order, and the
    committed ``count`` advances over the contiguous prefix of finished ones, one metadata
    write per advance, after ``check`` (the writer's lease still held). A shard that holds
    labels sets ``labels`` in the same write, once it is committed."""

    def __init__(self, store: LatentStore, check: Callable[[], None]) -> None:
        self.store = store
        self.check = check
        self._finished: dict[int, tuple[int, bool]] = {}

    def finish(self, start: int, stop: int, labelled: bool = False) -> None:
        """Rows ``[start, stop)`` are written whole; commit what that makes contiguous."""
        self._finished[start] = (stop, labelled)
        count, labels = self.store.count, bool(self.store.meta.get("labels"))
        known = labels
        while count in self._finished:
            count, shard_labelled = self._finished.pop(count)
            labels = labels or shard_labelled
        if count != self.store.count:
            self.check()  # taken over while this writer stalled: commit nothing more
            newly = labels and not known  # the first committed labels
            self.store.write_meta(count=count, **({"labels": True} if newly else {}))
