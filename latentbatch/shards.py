"""Output shards of a decode, their per-shard records and the manifest.

::

    OUT/
      shard-000000.tar           tar: WebDataset layout, ID.png (+ ID.json) per image
      shard-000000/              png: a folder of ID.png per shard
      images.zarr/               zarr: uint8 [N, H, W, C], sharded like the store
      .records/shard-000000.json one record per finished shard (written after the shard)
      manifest.json              written last, atomically: store, model id, every shard

Every shard is built completely, written under a temporary name and renamed into place
(object stores: one PUT of the whole object). Tar members have fixed metadata (mtime 0,
uid/gid 0, no user names, mode 0644) and PNGs are encoded with fixed settings, so two runs
on the same inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import zarr
from PIL import Image

from latentbatch.errors import LatentbatchError
from latentbatch.storage import StorageOptions, filesystem, is_remote, join, zarr_options

Format = Literal["tar", "zarr", "png"]
FORMATS: tuple[Format, ...] = ("tar", "zarr", "png")
MANIFEST = "manifest.json"
RECORDS = ".records"
ZARR_NAME = "images.zarr"
PNG_COMPRESS_LEVEL = 6
MANIFEST_FORMAT = 1


class OutputError(LatentbatchError):
    """An output location cannot take this decode."""


@dataclass(frozen=True)
class ShardRecord:
    """What one finished output shard holds."""

    index: int
    path: str
    start: int
    stop: int
    bytes: int
    sha256: str

    @property
    def count(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "count": self.count}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(**{k: data[k] for k in ("index", "path", "start", "stop", "bytes", "sha256")})


def shard_name(index: int, fmt: Format) -> str:
    """Name of output shard ``index`` relative to OUT."""
    if fmt == "tar":
        return f"shard-{index:06d}.tar"
    if fmt == "png":
        return f"shard-{index:06d}"
    return f"{ZARR_NAME}/c/{index}/0/0/0"


def encode_png(image: np.ndarray) -> bytes:
    """``uint8 (H, W, C)`` → PNG bytes, deterministic."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def build_tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, data)`` members with fixed metadata, in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _sidecar(row: int, label: int) -> bytes:
    return json.dumps({"label": label, "row": row}, sort_keys=True).encode()


def _put_atomic(out_url: str, options: StorageOptions | None, name: str, data: bytes) -> None:
    fs, root = filesystem(out_url, options)
    final = join(root, name)
    if is_remote(out_url):
        fs.pipe_file(final, data)  # one PUT: the object appears whole or not at all
        return
    folder, _, base = final.rpartition("/")
    tmp = join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, final)


def write_tar_shard(
    out_url: str,
    options: StorageOptions | None,
    index: int,
    start: int,
    ids: Sequence[str],
    pngs: Sequence[bytes],
    labels: Sequence[int] | None,
) -> ShardRecord:
    members: list[tuple[str, bytes]] = []
    for offset, (sample_id, png) in enumerate(zip(ids, pngs, strict=True)):
        members.append((f"{sample_id}.png", png))
        if labels is not None:
            members.append((f"{sample_id}.json", _sidecar(start + offset, int(labels[offset]))))
    data = build_tar(members)
    name = shard_name(index, "tar")
    _put_atomic(out_url, options, name, data)
    return ShardRecord(
        index, name, start, start + len(ids), len(data), hashlib.sha256(data).hexdigest()
    )


def _folder_digest(files: Sequence[tuple[str, bytes]]) -> str:
    listing = "".join(f"{n}\0{hashlib.sha256(d).hexdigest()}\n" for n, d in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


def write_png_shard(
    out_url: str,
    options: StorageOptions | None,
    index: int,
    start: int,
    ids: Sequence[str],
    pngs: Sequence[bytes],
) -> ShardRecord:
    """A folder ``shard-NNNNNN/`` of ``ID.png``; its sha256 is over the sorted
    ``name NUL sha256(file)`` listing."""
    fs, root = filesystem(out_url, options)
    name = shard_name(index, "png")
    files = [(f"{i}.png", png) for i, png in zip(ids, pngs, strict=True)]
    final = join(root, name)
    if is_remote(out_url):
        for file_name, data in files:
            fs.pipe_file(join(final, file_name), data)
    else:
        tmp = join(root, f".{name}.{uuid.uuid4().hex}.tmp")
        fs.makedirs(tmp, exist_ok=True)
        for file_name, data in files:
            fs.pipe_file(join(tmp, file_name), data)
        if fs.exists(final):
            fs.rm(final, recursive=True)
        fs.mv(tmp, final, recursive=True)
    size = sum(len(d) for _, d in files)
    return ShardRecord(index, name, start, start + len(ids), size, _folder_digest(files))


def create_zarr_output(
    out_url: str,
    options: StorageOptions | None,
    count: int,
    image_shape: tuple[int, int, int],
    shard_rows: int,
    chunk_rows: int,
) -> None:
    """Create (or grow) ``OUT/images.zarr``: uint8 ``[N, H, W, C]`` sharded like the store."""
    url = join(out_url, ZARR_NAME)
    fs, path = filesystem(url, options)
    if fs.exists(join(path, "zarr.json")):
        array = zarr.open_array(url, mode="r+", storage_options=zarr_options(url, options))
        if tuple(array.shape[1:]) != image_shape:
            raise OutputError(f"{url} holds images of shape {array.shape[1:]}, not {image_shape}")
        if array.shape[0] != count:
            array.resize((count, *image_shape))
        return
    zarr.create_array(
        url,
        shape=(count, *image_shape),
        dtype="uint8",
        chunks=(chunk_rows, *image_shape),
        shards=(shard_rows, *image_shape),
        dimension_names=("sample", "y", "x", "channel"),
        fill_value=0,
        storage_options=zarr_options(url, options),
    )


def write_zarr_shard(
    out_url: str, options: StorageOptions | None, index: int, start: int, images: np.ndarray
) -> ShardRecord:
    url = join(out_url, ZARR_NAME)
    array = zarr.open_array(url, mode="r+", storage_options=zarr_options(url, options))
    array[start : start + len(images)] = images
    name = shard_name(index, "zarr")
    fs, root = filesystem(out_url, options)
    data = fs.cat_file(join(root, name))
    return ShardRecord(
        index, name, start, start + len(images), len(data), hashlib.sha256(data).hexdigest()
    )


def write_record(
    out_url: str, options: StorageOptions | None, record: ShardRecord, identity: dict[str, Any]
) -> None:
    """Record a finished shard (after the shard itself is in place)."""
    payload = json.dumps({**record.to_dict(), **identity}, indent=1, sort_keys=True).encode()
    _put_atomic(out_url, options, f"{RECORDS}/shard-{record.index:06d}.json", payload)


def read_records(
    out_url: str, options: StorageOptions | None, identity: dict[str, Any]
) -> dict[int, ShardRecord]:
    """Records of finished shards that belong to ``identity`` and whose file is present
    with the recorded size."""
    fs, root = filesystem(out_url, options)
    folder = join(root, RECORDS)
    if not fs.exists(folder):
        return {}
    found: dict[int, ShardRecord] = {}
    for path in fs.ls(folder, detail=False):
        if not path.endswith(".json") or "/." in path[len(folder) :]:
            continue
        try:
            data = json.loads(fs.cat_file(path))
            record = ShardRecord.from_dict(data)
        except (ValueError, KeyError, TypeError):
            continue
        if any(data.get(k) != v for k, v in identity.items()):
            continue
        target = join(root, record.path)
        if not fs.exists(target):
            continue
        size = fs.du(target) if fs.isdir(target) else fs.size(target)
        if size == record.bytes:
            found[record.index] = record
    return found


def read_manifest(out_url: str, options: StorageOptions | None) -> dict[str, Any] | None:
    fs, root = filesystem(out_url, options)
    path = join(root, MANIFEST)
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise OutputError(f"{path} is not valid JSON; move it away or delete it") from exc


def write_manifest(out_url: str, options: StorageOptions | None, manifest: dict[str, Any]) -> None:
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    _put_atomic(out_url, options, MANIFEST, data)


def remove_temporaries(out_url: str, options: StorageOptions | None) -> int:
    """Delete leftovers of interrupted shard writes; return how many."""
    fs, root = filesystem(out_url, options)
    if not fs.exists(root):
        return 0
    removed = 0
    for folder in (root, join(root, RECORDS)):
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            base = path.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(".") and base.endswith(".tmp"):
                fs.rm(path, recursive=True)
                removed += 1
    return removed


def read_output(
    out_url: str, options: StorageOptions | None = None, limit: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Ids and ``uint8 (N, H, W, C)`` images of a finished decode (the first ``limit``).

    Shards come in row order; inside a tar shard members keep row order, inside a png
    shard files come sorted by name; zarr output takes its ids from the store.
    """
    manifest = read_manifest(out_url, options)
    if manifest is None:
        raise OutputError(f"{out_url} has no {MANIFEST}; the decode is not finished")
    fs, root = filesystem(out_url, options)
    fmt = manifest["output_format"]
    if fmt == "zarr":
        url = join(out_url, ZARR_NAME)
        array = zarr.open_array(url, mode="r", storage_options=zarr_options(url, options))
        images = np.asarray(array[: array.shape[0] if limit is None else limit])
        from latentbatch.store import open_store  # the ids live in the store

        store = open_store(manifest["store"]["url"], options)
        return store.read_ids(0, len(images)), images
    ids, arrays = [], []
    for shard in manifest["shards"]:
        if limit is not None and len(ids) >= limit:
            break
        path = join(root, shard["path"])
        if fmt == "tar":
            with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle) as tar:
                members = [
                    (m.name, tar.extractfile(m).read()) for m in tar if m.name.endswith(".png")
                ]  # type: ignore[union-attr]
        else:
            names = sorted(fs.ls(path, detail=False))
            members = [(n.rsplit("/", 1)[-1], fs.cat_file(n)) for n in names]
        for name, data in members:
            ids.append(name.removesuffix(".png"))
            image = np.asarray(Image.open(io.BytesIO(data)))
            arrays.append(image[..., None] if image.ndim == 2 else image)
    return ids[:limit], np.stack(arrays[:limit])
