"""Latent collections found elsewhere: the layouts ``latentbatch import`` reads, each
listed in row order by tasks (:mod:`latentbatch.sources.listing`) and read as pieces by
a task's :class:`Reader`, with no torch.

Each source byte is read once: the listing records where every member lies, and a task
opens each file once and reads only its own pieces there. A zip member is read by its
offset and length (edm2's zips are stored, uncompressed; a deflated member is inflated
from its own bytes), its CRC checked, with no parse of the zip's directory in the task;
a WebDataset tar's ``.npy`` and ``.cls`` members likewise, from the index the listing
built in one pass; an ``.npy`` array's or a stored ``.npz`` array's rows by range from
their offset (a compressed ``.npz`` array is streamed up to the rows wanted); a
safetensors tensor's rows (and its labels') by the offsets its header gave the listing.
A member that is not what the listing promised (another shape, a corrupt or object
``.npy``, a ``.cls`` that is not an integer) is refused in a sentence naming it.

``--from`` names the latents, a local path or an fsspec URL (``s3://…``, read with the
command's storage options: locally a task keeps each file open; on an object store each
piece is one ranged request for its own bytes); its layout is recognised:

- a folder, or a ``.zip``, of one ``.npy`` per image (the edm2/REPA layout for DiT, SiT
  and REPA training): ids from the files' paths (``00000/img00000001.npy`` →
  ``00000__img00000001``), labels from an optional ``dataset.json``
  (``{"labels": [["00000/img00000001.npy", 207], ...]}``);
- a folder of one ``.npz`` per image, MAR's cache: its ``moments`` array (the latent
  distribution's mean and log-variance, whose mean is stored; ``moments_flip``, the
  flipped image's, is left out), ids from the files' paths, labels from the class
  folders they lie in (``n01440764/n01440764_10026.npz``: the index of the folder's name
  among the sorted class folders, as torchvision's ``ImageFolder`` numbers them);
- one ``.npy`` or ``.npz`` array ``(N, C, h, w)`` (an ``.npz``'s ``latents`` array, or its
  only 4-D one, and ``labels`` when it has them): ids ``NAME-00000000``;
- ``.safetensors`` files (a file, or a folder of them, in name order): a 4-D tensor of
  rows (``latents``, or the only one; ``labels`` when there), or one 3-D tensor per row
  named by its id;
- WebDataset tars (a ``.tar`` or a folder of them): each sample's ``.npy`` member is its
  latent, its key the id, its ``.cls`` member (when there) the label;
- a Zarr array, or a group holding ``latents`` (and ``labels``): any Zarr v2 or v3
  writer's; ``PATH::NAME`` names another array of a group. Ids ``NAME-00000000``.

Pickles (``.pt``, ``.pth``, ``.pkl``, ``.bin``) are refused in a sentence. An array of
``2C`` channels where the model has ``C`` holds the latent distribution's mean and std
(edm2's ``(8, 32, 32)`` for SD's 4 channels): the mean is stored, and the result says so.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from latentbatch.errors import DataError
from latentbatch.ids import slug
from latentbatch.storage.fs import StorageOptions, filesystem, is_remote, join, zarr_options

PICKLES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
Kind = Literal["npy-files", "npz-files", "npy-zip", "array", "safetensors", "webdataset", "zarr"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Piece:
    """One input: a file (or a zip or tar member, or a Zarr chunk of rows) holding
    ``rows`` rows from row ``first`` of its file or array. A member of a zip or tar, an
    ``.npy`` or stored ``.npz`` array, or a safetensors tensor also records where its
    bytes lie: ``offset`` (a zip member's local header; the data otherwise) and
    ``length``, and an array's or tensor's row ``shape`` and ``dtype``; a zip member its
    ``method`` and ``crc``; a tar sample's ``.cls`` member, or a safetensors file's labels
    of these rows, lie at ``label`` (offset, length), the latter as ``label_dtype``; an
    array's labels read by rows, not offset, are its file's ``label_member`` array."""

    kind: Kind
    path: str
    member: str = ""
    first: int = 0
    rows: int = 1
    offset: int = -1
    length: int = 0
    shape: tuple[int, ...] = ()
    dtype: str = ""
    method: int = zipfile.ZIP_STORED
    crc: int = 0
    label: tuple[int, int] | None = None
    label_dtype: str = ""
    label_member: str = ""


def refuse_pickles(path: str) -> None:
    suffix = PurePosixPath(path).suffix
    if suffix.lower() in PICKLES:
        raise DataError(
            f"{path} is a pickle ({suffix}); latentbatch never unpickles: save the "
            "latents with numpy.save, safetensors or zarr and import that"
        )


class Place:
    """Where ``--from`` lies: a local path or an fsspec URL (``s3://…``) with its storage
    options; what it lists is named by URLs below :attr:`url` (local: paths as given)."""

    def __init__(self, url: str, options: StorageOptions | None) -> None:
        self.url = url.rstrip("/") if is_remote(url) else str(Path(url))
        self.options = dict(options or {})
        self.fs, self.path = filesystem(self.url, self.options)

    def named(self, rel: str) -> str:
        """The URL (or path) of ``rel`` below this place."""
        return join(self.url, rel)

    def below(self) -> list[str]:
        """Every file below this folder, as sorted names relative to it (one listing)."""
        root = self.path.rstrip("/") + "/"
        return sorted(p[len(root) :] for p in self.fs.find(self.path) if p.startswith(root))

    def text(self, rel: str) -> str | None:
        path = join(self.path, rel)
        return self.fs.cat_file(path).decode() if self.fs.isfile(path) else None


def handle(url: str, options: StorageOptions | None, raw: bool = False) -> Any:
    """A file opened for reading: local ones unbuffered when ``raw`` (a read takes the
    bytes asked for, never a read-ahead block); remote ones with 1 MiB read-ahead blocks
    (a read is a request: small ones are batched)."""
    if not is_remote(url):
        return open(url, "rb", buffering=0 if raw else -1)  # noqa: PTH123
    fs, path = filesystem(url, options)
    return fs.open(path, "rb", block_size=2**20)


def npy_header(
    stream: Any, where: str = "an .npy", by_offset: bool = False
) -> tuple[tuple[int, ...], str]:
    """An ``.npy`` header's shape and dtype; ``by_offset``: its rows will be read by
    offset, which needs them in C order (a Fortran-order array is refused)."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if by_offset and fortran and len(shape) > 1:
        raise DataError(
            f"{where} holds its array in Fortran order; re-save it with "
            "numpy.save(path, numpy.ascontiguousarray(array))"
        )
    return tuple(shape), str(dtype)


def dataset_labels(text: str | None, names: list[str]) -> np.ndarray | None:
    """Labels by file name from an edm2 ``dataset.json`` (-1 where a file has none)."""
    if text is None:
        return None
    pairs = json.loads(text).get("labels")
    if not pairs:
        return None
    by_name = {str(name): int(label) for name, label in pairs}
    return np.array([by_name.get(name, -1) for name in names], np.int32)


def id_of(name: str) -> str:
    return slug("__".join(PurePosixPath(name).with_suffix("").parts))


def row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one row of ``shape`` (a row's, not the array's) and ``dtype``."""
    size = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    return int(np.prod(shape, dtype=np.int64)) * size


def local_header(head: bytes, where: str) -> int:
    """The size of a zip member's local header, from its first 30 bytes."""
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise DataError(
            f"{where}: a zip member's header is not where the zip says; the file changed"
        )
    name, extra = struct.unpack("<HH", head[26:30])
    return 30 + int(name) + int(extra)


_SAFETENSORS_DTYPES = {
    "F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16",
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
}  # fmt: skip
LABEL_NAMES = ("labels", "label", "y")


def safetensors_header(url: str, options: StorageOptions | None) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensors (name → ``dtype``, ``shape``, ``data_offsets``) and
    where its data begins, from its header alone (two small reads)."""
    with handle(url, options, raw=True) as raw:
        size = int.from_bytes(raw.read(8), "little")
        header: dict[str, Any] = json.loads(raw.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def dtype_of(name: str, where: str) -> str:
    if name not in _SAFETENSORS_DTYPES:
        raise DataError(f"{where} holds {name} tensors; import float or integer tensors")
    return _SAFETENSORS_DTYPES[name]


def open_zarr(url: str, options: StorageOptions | None) -> Any:
    import zarr

    return zarr.open(url, mode="r", storage_options=zarr_options(url, options))


@dataclass(frozen=True, kw_only=True, slots=True)
class NpzArray:
    """An ``.npz`` array's shape and dtype (from its header alone) and where its data
    begins when it is stored (-1 when compressed)."""

    shape: tuple[int, ...]
    dtype: str
    start: int


def npz_arrays(url: str, options: StorageOptions | None) -> dict[str, NpzArray]:
    """An ``.npz``'s arrays by name, from their headers: none is decompressed."""
    found = {}
    with handle(url, options) as raw, zipfile.ZipFile(raw) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            stored = info.compress_type == zipfile.ZIP_STORED
            with archive.open(info) as stream:
                head = io.BytesIO(stream.read(4096))
                shape, dtype = npy_header(head, f"{url}::{info.filename}", by_offset=stored)
            start = -1
            if stored and shape:
                raw.seek(info.header_offset)
                start = info.header_offset + local_header(raw.read(30), url) + head.tell()
            found[info.filename[: -len(".npy")]] = NpzArray(shape=shape, dtype=dtype, start=start)
    return found


def _read_npy(stream: Any, where: str) -> np.ndarray:
    """One ``.npy``'s array, or a sentence naming ``where`` when it is not one."""
    data = stream.read()
    if not data.startswith(b"\x93NUMPY"):
        raise DataError(f"{where} is not a .npy (no numpy header); re-save it with numpy.save")
    try:
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))
    except ValueError as exc:  # truncated or corrupt, or an object array (a pickle)
        reason = (
            "an object array (a pickle)"
            if "allow_pickle" in str(exc)
            else f"truncated or corrupt ({exc})"
        )
        raise DataError(f"{where} is {reason}; re-save it with numpy.save of numbers") from None


def _from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values stored as ``dtype`` (``bfloat16``: as float32, which holds them exactly)."""
    if dtype == "bfloat16":
        wide = np.frombuffer(data, "<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)


class Reader:
    """A task's reads of found latents, with ``options`` for an object store: a local
    file of many pieces (a zip, a tar, an ``.npy``/``.npz`` array, a safetensors file)
    opened once however many of its pieces the task reads, and closed at the end; on an
    object store each piece is one ranged request for its own bytes.

    ::

        with Reader(options) as reader:
            for piece in pieces:
                rows, labels = reader.read(piece)
    """

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = dict(options or {})
        self._files: dict[str, Any] = {}
        self._archives: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _bytes(self, path: str, offset: int, length: int) -> bytes:
        if is_remote(path):
            fs, key = filesystem(path, self.options)
            data: bytes = fs.cat_file(key, start=offset, end=offset + length)
        else:
            if path not in self._files:
                self._files[path] = self._stack.enter_context(handle(path, None, raw=True))
            opened = self._files[path]
            opened.seek(offset)
            data = opened.read(length)
        if len(data) != length:
            raise DataError(f"{path} ends before the bytes its listing names; the file changed")
        return data

    def _whole(self, path: str) -> bytes:
        """A file of one row, read whole (one request)."""
        if is_remote(path):
            fs, key = filesystem(path, self.options)
            return bytes(fs.cat_file(key))
        with handle(path, None, raw=True) as raw:
            return bytes(raw.read())

    def read(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
        """A piece's rows ``(n, C', h, w)`` as stored there, and their labels when it
        has them."""
        where = f"{piece.path}::{piece.member}" if piece.member else piece.path
        if piece.kind == "npy-files":  # a file a row
            return _read_npy(io.BytesIO(self._whole(piece.path)), where)[None], None
        if piece.kind == "npz-files":  # a file a row
            try:
                with np.load(io.BytesIO(self._whole(piece.path)), allow_pickle=False) as archive:
                    return np.asarray(archive[piece.member])[None], None
            except (ValueError, KeyError, zipfile.BadZipFile) as exc:
                raise DataError(f"{where} cannot be read as an .npz ({exc}); re-save it") from None
        if piece.kind == "npy-zip":
            return _read_npy(io.BytesIO(self._zip_member(piece, where)), where)[None], None
        if piece.kind == "webdataset":
            block = _read_npy(
                io.BytesIO(self._bytes(piece.path, piece.offset, piece.length)), where
            )
            return block[None], np.array([self._label(piece)], np.int32)
        if piece.kind == "array":
            return self._array(piece)
        if piece.kind == "safetensors":
            return self._safetensors(piece)
        if piece.path not in self._archives:
            self._archives[piece.path] = open_zarr(piece.path, self.options)
        opened = self._archives[piece.path]
        array = opened[piece.member] if piece.member else opened
        rows = slice(piece.first, piece.first + piece.rows)
        if not piece.label_member:
            return np.asarray(array[rows]), None
        return np.asarray(array[rows]), np.asarray(opened[piece.label_member][rows], np.int32)

    def _zip_member(self, piece: Piece, where: str) -> bytes:
        # one read of the local header and the data, when its extra field is empty (it is
        # in the zips numpy, Python and edm2 write); a second read when it is not
        wanted = 30 + len(piece.member.encode()) + piece.length
        found = self._bytes(piece.path, piece.offset, wanted)
        start = local_header(found[:30], where)
        data = found[start : start + piece.length]
        if len(data) < piece.length:
            data += self._bytes(piece.path, piece.offset + wanted, start + piece.length - wanted)
        if piece.method == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15)
        elif piece.method != zipfile.ZIP_STORED:
            raise DataError(
                f"{where} is compressed by zip method {piece.method}; re-zip it stored or deflated"
            )
        if zlib.crc32(data) != piece.crc:
            raise DataError(f"{where} does not match its CRC; the zip is damaged or changed")
        return data

    def _label(self, piece: Piece) -> int:
        if piece.label is None:
            return -1
        text = self._bytes(piece.path, *piece.label).decode(errors="replace").strip()
        try:
            return int(text)
        except ValueError:
            key = piece.member[: -len(".npy")]
            raise DataError(
                f"{piece.path}::{key}.cls holds {text[:40]!r}, not an integer label; fix or "
                "remove it"
            ) from None

    def _array(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
        if piece.offset >= 0:  # an .npy, or a stored .npz array: the rows by offset
            data = self._bytes(piece.path, piece.offset, piece.length)
            rows = _from_bytes(data, piece.dtype, (piece.rows, *piece.shape))
        else:
            rows = self._streamed(piece, piece.member)
        if piece.label is not None:
            labels = _from_bytes(self._bytes(piece.path, *piece.label), piece.label_dtype, (-1,))
        elif piece.label_member:
            labels = self._streamed(piece, piece.label_member)
        else:
            return rows, None
        return rows, labels.astype(np.int32)

    def _streamed(self, piece: Piece, member: str) -> np.ndarray:
        """Rows of a compressed ``.npz`` array: its directory read once per task, the
        array streamed up to the piece's rows."""
        if piece.path not in self._archives:
            raw = self._stack.enter_context(handle(piece.path, self.options))
            self._archives[piece.path] = self._stack.enter_context(np.load(raw))
        with self._archives[piece.path].zip.open(f"{member}.npy") as stream:
            shape, dtype = npy_header(stream, piece.path)
            row = row_bytes(shape[1:], dtype)
            stream.read(piece.first * row)
            return _from_bytes(stream.read(piece.rows * row), dtype, (piece.rows, *shape[1:]))

    def _safetensors(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
        data = self._bytes(piece.path, piece.offset, piece.length)
        block = _from_bytes(data, piece.dtype, (-1, *piece.shape))  # its rows, or its one
        if piece.label is None:
            return block, None
        labels = _from_bytes(self._bytes(piece.path, *piece.label), piece.label_dtype, (-1,))
        return block, labels.astype(np.int32)
