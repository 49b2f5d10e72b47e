"""Output shards of a decode: the three formats and their writers.

::

    OUT/
      shard-000000.tar           tar: WebDataset layout, ID.png (+ ID.json) per image
      shard-000000/              png: a folder of ID.png per shard
      images.zarr/               zarr: uint8 [N, H, W, C], sharded like the store

Every shard is built completely and written with :mod:`latentbatch.storage`'s atomic
writes (object stores: one PUT of the whole object). Tar members have fixed metadata
(mtime 0, uid/gid 0, no user names, mode 0644) and PNGs are encoded with fixed settings,
so two runs on the same inputs give byte-identical shards. Records and the manifest are
:mod:`latentbatch.manifest`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from typing import Literal

import imagecodecs
import numpy as np
import zarr
from PIL import Image

from latentbatch.errors import OutputError
from latentbatch.manifest import MANIFEST, RECORDS, ShardRecord, read_manifest
from latentbatch.storage import (
    StorageOptions,
    filesystem,
    is_temporary,
    join,
    write_bytes,
    write_folder,
    zarr_options,
)
from latentbatch.store import open_store

Format = Literal["tar", "zarr", "png"]
FORMATS: tuple[Format, ...] = ("tar", "zarr", "png")
ZARR_NAME = "images.zarr"
PNG_COMPRESS_LEVEL = 6
PNG_ENCODER = "imagecodecs-libpng"  # recorded with every shard: other bytes, other encoder


def check_format(fmt: str) -> Format:
    """``fmt`` if it is an output format, else an :class:`OutputError` naming the choices."""
    for known in FORMATS:
        if fmt == known:
            return known
    raise OutputError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def shard_name(index: int, fmt: Format) -> str:
    """Name of output shard ``index`` relative to OUT."""
    if fmt == "tar":
        return f"shard-{index:06d}.tar"
    if fmt == "png":
        return f"shard-{index:06d}"
    return f"{ZARR_NAME}/c/{index}/0/0/0"


def encode_png(image: np.ndarray) -> bytes:
    """``uint8 (H, W, C)`` → PNG bytes (grey for one channel, RGB for three),
    deterministic. imagecodecs' libpng binding: about half Pillow's cost per small
    image, and it runs without the GIL, so encoding threads scale."""
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(pixels), level=PNG_COMPRESS_LEVEL))


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """:func:`encode_png` of every image of a batch ``uint8 (N, H, W, C)``."""
    return [encode_png(image) for image in images]


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


def _record(index: int, name: str, start: int, count: int, size: int, sha256: str) -> ShardRecord:
    return ShardRecord(
        index=index, path=name, start=start, stop=start + count, bytes=size, sha256=sha256
    )


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
    write_bytes(join(out_url, name), data, options)
    return _record(index, name, start, len(ids), len(data), hashlib.sha256(data).hexdigest())


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
    name = shard_name(index, "png")
    files = [(f"{i}.png", png) for i, png in zip(ids, pngs, strict=True)]
    write_folder(join(out_url, name), files, options)
    size = sum(len(d) for _, d in files)
    return _record(index, name, start, len(ids), size, _folder_digest(files))


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
    return _record(index, name, start, len(images), len(data), hashlib.sha256(data).hexdigest())


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
            if is_temporary(path.rstrip("/").rsplit("/", 1)[-1]):
                fs.rm(path, recursive=True)
                removed += 1
    return removed


def write_shard(
    out_url: str,
    options: StorageOptions | None,
    fmt: Format,
    *,
    index: int,
    start: int,
    ids: Sequence[str],
    images: np.ndarray,
    pngs: Sequence[bytes] | None = None,
    labels: Sequence[int] | None = None,
) -> ShardRecord:
    """Write output shard ``index`` (store rows from ``start``) in format ``fmt``.

    ``pngs``, when given, are the images already encoded (the decode engine encodes
    them while the next batch decodes); ``labels`` go into tar sidecars.
    """
    if fmt == "zarr":
        return write_zarr_shard(out_url, options, index, start, images)
    encoded = [encode_png(image) for image in images] if pngs is None else pngs
    if fmt == "tar":
        return write_tar_shard(out_url, options, index, start, ids, encoded, labels)
    return write_png_shard(out_url, options, index, start, ids, encoded)


def _tar_pngs(data: bytes, where: str) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the PNG members of a tar, in member order."""
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                handle = tar.extractfile(member)
                if member.name.endswith(".png") and handle is not None:
                    members.append((member.name, handle.read()))
    except (tarfile.TarError, EOFError) as exc:
        raise OutputError(
            f"{where} is not a whole tar shard ({exc}); run the decode again, which redoes it"
        ) from None
    return members


def _image(data: bytes, where: str) -> np.ndarray:
    try:
        image = np.asarray(Image.open(io.BytesIO(data)))
    except OSError as exc:  # PIL's UnidentifiedImageError included
        raise OutputError(
            f"{where} is not a readable PNG ({exc}); run the decode again, which redoes it"
        ) from None
    return image[..., None] if image.ndim == 2 else image


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
    if manifest.output_format == "zarr":
        url = join(out_url, ZARR_NAME)
        array = zarr.open_array(url, mode="r", storage_options=zarr_options(url, options))
        images = np.asarray(array[: array.shape[0] if limit is None else limit])
        store = open_store(manifest.store.url, options)
        if manifest.selection is not None:
            return store.read_ids_at(manifest.selection[: len(images)]), images
        return store.read_ids(0, len(images)), images
    ids: list[str] = []
    arrays: list[np.ndarray] = []
    for shard in manifest.shards:
        if limit is not None and len(ids) >= limit:
            break
        path = join(root, shard.path)
        if manifest.output_format == "tar":
            members = _tar_pngs(fs.cat_file(path), join(out_url, shard.path))
        else:
            names = sorted(fs.ls(path, detail=False))
            members = [(n.rsplit("/", 1)[-1], fs.cat_file(n)) for n in names]
        for name, data in members:
            ids.append(name.removesuffix(".png"))
            arrays.append(_image(data, f"{join(out_url, shard.path)}: {name}"))
    return ids[:limit], np.stack(arrays[:limit])
