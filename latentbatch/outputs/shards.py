"""Output shards of a decode: the four formats and their writers.

::

    OUT/
      shard-000000.tar           tar: WebDataset layout, ID.png|webp|jpg (+ ID.json) per image
      shard-000000/              png: a folder of ID.png per shard
      images.zarr/               zarr: uint8 [N, H, W, C], one zarr shard per output shard
      samples.npz                npz: arr_0 uint8 [N, H, W, 3] (+ arr_1 labels), the
                                 evaluation suites' layout, assembled from the parts
                                 shard-000000.npy ... that the tasks wrote (then removed)

Every shard is built completely and written with :mod:`latentbatch.storage.fs`'s atomic
writes (object stores: one PUT of the whole object). Tar members have fixed metadata
(mtime 0, uid/gid 0, no user names, mode 0644) and images are encoded with fixed settings
(:mod:`latentbatch.outputs.codecs`), so two runs on the same inputs give byte-identical shards.
Records and the manifest are :mod:`latentbatch.outputs.manifest`'s.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from collections.abc import Callable, Collection, Sequence
from typing import Any, BinaryIO

import numpy as np
import zarr

from latentbatch.choices import FORMATS, Format
from latentbatch.errors import OutputError
from latentbatch.outputs.codecs import PNG, ImageCodec, codec_of_settings, decode_image
from latentbatch.outputs.manifest import (
    MANIFEST,
    RECORDS,
    ShardRecord,
    iter_shards,
    read_manifest,
)
from latentbatch.storage.fs import (
    WRITER_MARK,
    StorageOptions,
    before_commit,
    filesystem,
    is_temporary,
    join,
    named_write,
    streamed_write,
    temporary_of,
    write_bytes,
    write_folder,
    zarr_options,
)
from latentbatch.stores.store import open_store

ZARR_NAME = "images.zarr"
NPZ_NAME = "samples.npz"
_COPY_BLOCK = 8 * 2**20  # bytes: what the npz assembly holds at once
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same bytes on every run


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
    if fmt == "npz":
        return f"shard-{index:06d}.npy"
    return f"{ZARR_NAME}/c/{index}/0/0/0"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tar_header(name: str, size: int) -> bytes:
    """The GNU tar header of a member with our fixed metadata, byte-equal to tarfile's
    (tested). tarfile takes about 15 µs per header, as much as encoding a PNG; this
    fills tarfile's own header of a one-byte name in at the name, size and checksum
    fields. Names over 100 bytes (long-name records) go through tarfile itself."""
    raw = name.encode(_TAR_ENCODING, "surrogateescape")
    if len(raw) > _NAME_BYTES or size >= _MAX_SIZE:
        return _tar_info(name, size).tobuf(tarfile.GNU_FORMAT, _TAR_ENCODING, "surrogateescape")
    head = raw.ljust(_NAME_BYTES, b"\0") + _TEMPLATE[100:124] + b"%011o\0" % size
    head += _TEMPLATE[136:148]
    checksum = _FIXED_SUM + sum(raw) + sum(b"%011o" % size)
    return head + b"%06o\0 " % checksum + _TEMPLATE[156:]


_TAR_ENCODING = "utf-8"
_NAME_BYTES, _MAX_SIZE = 100, 8**11
_TEMPLATE = _tar_info("", 0).tobuf(tarfile.GNU_FORMAT, _TAR_ENCODING, "surrogateescape")
# the checksum counts its own field as 8 spaces, the name and size fields apart
_FIXED_SUM = 8 * 32 + sum(_TEMPLATE[100:124]) + sum(_TEMPLATE[136:148]) + sum(_TEMPLATE[156:])


def build_tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, data)`` members with fixed metadata, in the given order: the
    bytes tarfile writes for them (GNU format, tested)."""
    parts: list[bytes] = []
    for name, data in members:
        parts += (_tar_header(name, len(data)), data, b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
    size = sum(map(len, parts))
    parts.append(b"\0" * (-size % tarfile.RECORDSIZE))
    return b"".join(parts)


def _sidecar(row: int, label: int) -> bytes:
    """``json.dumps({"label": label, "row": row}, sort_keys=True)`` (tested), at a
    fifteenth of its cost: it is written once per image."""
    return b'{"label": %d, "row": %d}' % (label, row)


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
    files: Sequence[bytes],
    labels: Sequence[int] | None,
    extension: str = "png",
) -> ShardRecord:
    members: list[tuple[str, bytes]] = []
    for offset, (sample_id, data) in enumerate(zip(ids, files, strict=True)):
        members.append((f"{sample_id}.{extension}", data))
        if labels is not None:
            members.append((f"{sample_id}.json", _sidecar(start + offset, int(labels[offset]))))
    data = build_tar(members)
    name = shard_name(index, "tar")
    write_bytes(join(out_url, name), data, options)
    return _record(index, name, start, len(ids), len(data), hashlib.sha256(data).hexdigest())


def folder_digest(files: Sequence[tuple[str, bytes]]) -> str:
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
    return _record(index, name, start, len(ids), size, folder_digest(files))


def create_zarr_output(
    out_url: str,
    options: StorageOptions | None,
    count: int,
    image_shape: tuple[int, int, int],
    shard_rows: int,
    chunk_rows: int,
) -> None:
    """Create (or grow) ``OUT/images.zarr``: uint8 ``[N, H, W, C]``, one zarr shard per
    output shard."""
    url = join(out_url, ZARR_NAME)
    fs, path = filesystem(url, options)
    if fs.exists(join(path, "zarr.json")):
        array = zarr.open_array(url, mode="r+", storage_options=zarr_options(url, options))
        if tuple(array.shape[1:]) != image_shape:
            raise OutputError(f"{url} holds images of shape {array.shape[1:]}, not {image_shape}")
        if array.shards is not None and array.shards[0] != shard_rows:
            raise OutputError(
                f"{url} is sharded by {array.shards[0]} rows, not {shard_rows}; choose another "
                "--out, or decode with --images-per-shard matching it"
            )
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
    name = shard_name(index, "zarr")
    before_commit()  # a zarr shard is written in place: the fence is checked first
    with named_write(url, join(out_url, name)):
        array[start : start + len(images)] = images
    fs, root = filesystem(out_url, options)
    data = fs.cat_file(join(root, name))
    return _record(index, name, start, len(images), len(data), hashlib.sha256(data).hexdigest())


def write_npy_part(
    out_url: str, options: StorageOptions | None, index: int, start: int, images: np.ndarray
) -> ShardRecord:
    """An npz output's part ``shard-NNNNNN.npy``: the shard's images as ``uint8 (n, H, W,
    3)`` (a grey image's one channel repeated, as the evaluation suites read RGB)."""
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(rgb, np.uint8))
    data = buffer.getvalue()
    name = shard_name(index, "npz")
    write_bytes(join(out_url, name), data, options)
    return _record(index, name, start, len(images), len(data), hashlib.sha256(data).hexdigest())


class _Digested:
    """A writable file that also counts and hashes what goes through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.handle.flush()


def _stored(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def assemble_npz(
    out_url: str,
    options: StorageOptions | None,
    parts: Sequence[ShardRecord],
    labels: Callable[[int, int], np.ndarray] | None,
) -> ShardRecord:
    """``OUT/samples.npz`` from the parts (in row order), streamed: ``arr_0`` their
    images, ``arr_1`` the ``labels(start, stop)`` of their rows (when given), each a
    stored zip64 member; a block of a part in memory at a time, and the file appears
    whole or not at all. Returns its record (all rows, its size and sha256)."""
    fs, root = filesystem(out_url, options)
    shapes = []
    for part in parts[:1]:
        with fs.open(join(root, part.path), "rb") as handle:
            np.lib.format.read_magic(handle)
            shapes.append(np.lib.format.read_array_header_1_0(handle)[0])
    count = sum(p.count for p in parts)
    image = tuple(shapes[0][1:]) if shapes else (0, 0, 3)
    url = join(out_url, NPZ_NAME)
    with streamed_write(url, options, f"the npz {url}") as raw:
        out = _Digested(raw)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:  # type: ignore[call-overload]
            with archive.open(_stored("arr_0.npy"), "w", force_zip64=True) as member:
                header = {"descr": "|u1", "fortran_order": False, "shape": (count, *image)}
                np.lib.format.write_array_header_1_0(member, header)
                for part in parts:
                    _copy_rows(fs, join(root, part.path), member, (part.count, *image))
            if labels is not None:
                with archive.open(_stored("arr_1.npy"), "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(
                        member, {"descr": "<i8", "fortran_order": False, "shape": (count,)}
                    )
                    for part in parts:
                        member.write(labels(part.start, part.stop).astype("<i8").tobytes())
    return _record(0, NPZ_NAME, 0, count, out.size, out.digest.hexdigest())


def _copy_rows(fs: Any, path: str, into: Any, shape: tuple[int, ...]) -> None:
    """A part's pixels (after its ``.npy`` header) into ``into``, a block at a time;
    a part of another shape than the first is refused."""
    with fs.open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        found = tuple(np.lib.format.read_array_header_1_0(handle)[0])
        if found != shape:
            raise OutputError(
                f"{path} holds images of shape {found}, not {shape}; run the decode again "
                "into another --out"
            )
        for block in iter(lambda: handle.read(_COPY_BLOCK), b""):
            into.write(block)


_SHARD_FILE = re.compile(r"^shard-(\d{6})(\.tar|\.json|\.npy)?$")


def remove_beyond(out_url: str, options: StorageOptions | None, shards: int) -> int:
    """Delete the shards (and their records) of index ``shards`` and above: what a
    stopped decode of more shards left, which this decode, taking the output over, does
    not write. Returns how many."""
    fs, root = filesystem(out_url, options)
    removed = 0
    for folder in (root, join(root, RECORDS)):
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            match = _SHARD_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match is not None and int(match.group(1)) >= shards:
                fs.rm(path, recursive=True)
                removed += 1
    return removed


def remove_temporaries(
    out_url: str, options: StorageOptions | None, writers: Collection[str] | None = None
) -> int:
    """Delete leftovers of interrupted shard writes; return how many. With ``writers``
    (tokens), only theirs and those that carry no writer's mark (an unfenced write's, or
    an older release's): another live writer's temporaries stay."""
    marks = None if writers is None else {w[:WRITER_MARK] for w in writers}
    fs, root = filesystem(out_url, options)
    if not fs.exists(root):
        return 0
    removed = 0
    for folder in (root, join(root, RECORDS)):
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if not is_temporary(name):
                continue
            mark = temporary_of(name)
            if marks is None or mark is None or mark in marks:
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
    codec: ImageCodec | None = None,
    encoded: Sequence[bytes] | None = None,
    labels: Sequence[int] | None = None,
) -> ShardRecord:
    """Write output shard ``index`` (store rows from ``start``) in format ``fmt``.

    Tar members use ``codec`` (PNG when not given; the png format is PNG only).
    ``encoded``, when given, are the images already encoded with it (the decode engine
    encodes them while the next batch decodes); ``labels`` go into tar sidecars.
    """
    if fmt == "zarr":
        return write_zarr_shard(out_url, options, index, start, images)
    if fmt == "npz":
        return write_npy_part(out_url, options, index, start, images)
    codec = codec or PNG
    if fmt == "png" and codec.name != "png":
        raise OutputError(f"the png format holds PNG images, not {codec.name}; use --format tar")
    files = codec.encode(images) if encoded is None else encoded
    if fmt == "tar":
        return write_tar_shard(out_url, options, index, start, ids, files, labels, codec.extension)
    return write_png_shard(out_url, options, index, start, ids, files)


def _tar_images(data: bytes, where: str, extension: str) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the image members of a tar, in member order."""
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                handle = tar.extractfile(member)
                if member.name.endswith(f".{extension}") and handle is not None:
                    members.append((member.name, handle.read()))
    except (tarfile.TarError, EOFError) as exc:
        raise OutputError(
            f"{where} is not a whole tar shard ({exc}); run the decode again, which redoes it"
        ) from None
    return members


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
    if manifest.output_format == "npz":
        with fs.open(join(root, NPZ_NAME), "rb") as handle, np.load(handle) as found:
            images = np.asarray(found["arr_0"][:limit])
        return open_store(manifest.store.url, options).read_ids(0, len(images)), images
    if manifest.output_format == "zarr":
        url = join(out_url, ZARR_NAME)
        array = zarr.open_array(url, mode="r", storage_options=zarr_options(url, options))
        images = np.asarray(array[: array.shape[0] if limit is None else limit])
        store = open_store(manifest.store.url, options)
        if manifest.selection is not None:
            return store.read("ids", manifest.selection[: len(images)]).tolist(), images
        return store.read_ids(0, len(images)), images
    codec = codec_of_settings(manifest.format_settings)
    channels = (manifest.format_settings or {}).get("channels")
    ids: list[str] = []
    arrays: list[np.ndarray] = []
    for shard in iter_shards(out_url, options, manifest):
        if limit is not None and len(ids) >= limit:
            break
        path = join(root, shard.path)
        if manifest.output_format == "tar":
            members = _tar_images(fs.cat_file(path), join(out_url, shard.path), codec.extension)
        else:
            names = sorted(fs.ls(path, detail=False))
            members = [(n.rsplit("/", 1)[-1], fs.cat_file(n)) for n in names]
        for name, data in members:
            ids.append(name.removesuffix(f".{codec.extension}"))
            where = f"{join(out_url, shard.path)}: {name}"
            arrays.append(decode_image(data, where, channels))
    return ids[:limit], np.stack(arrays[:limit])
