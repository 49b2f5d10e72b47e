"""Latent collections found elsewhere: the layouts ``latentbatch import`` reads, each
listed as pieces in row order (:func:`find`) and read by a task's :class:`Reader`, with
no torch.

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

import dataclasses
import functools
import hashlib
import io
import json
import struct
import tarfile
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from latentbatch.errors import DataError
from latentbatch.ids import slug, unique
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
    of these rows, lie at ``label`` (offset, length), the latter as ``label_dtype``."""

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


@dataclass(frozen=True, kw_only=True)
class Found:
    """What ``--from`` holds: its layout, its pieces in row order, the rows' ids and
    labels, and one row's shape and dtype."""

    spec: str
    kind: Kind
    pieces: tuple[Piece, ...]
    ids: tuple[str, ...]
    labels: np.ndarray | None
    shape: tuple[int, ...]
    dtype: str

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the listing: every piece's file, member, rows and place, in row
        order (what a resumed import checks its source against)."""
        listing = hashlib.sha256(f"{self.kind}\0{len(self.ids)}\0".encode())
        for p in self.pieces:
            listing.update(
                f"{p.path}\0{p.member}\0{p.first}\0{p.rows}\0{p.offset}\0{p.length}\n".encode()
            )
        return listing.hexdigest()

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        """Each piece's first row, and the row count last."""
        return np.concatenate([[0], np.cumsum([p.rows for p in self.pieces], dtype=np.int64)])

    def segments(self, start: int, stop: int) -> tuple[tuple[Piece, int, int], ...]:
        """The pieces holding rows ``[start, stop)``, each with its wanted rows (found by
        bisection: a store shard's pieces cost their own count, not the pieces before)."""
        starts = self._starts
        first = int(np.searchsorted(starts, start, side="right")) - 1
        found = []
        for index in range(max(first, 0), len(self.pieces)):
            row = int(starts[index])
            if row >= stop:
                break
            piece = self.pieces[index]
            found.append((piece, max(start, row) - row, min(stop, row + piece.rows) - row))
        return tuple(found)


def _refuse_pickles(path: str) -> None:
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


def _handle(url: str, options: StorageOptions | None, raw: bool = False) -> Any:
    """A file opened for reading: local ones unbuffered when ``raw`` (a read takes the
    bytes asked for, never a read-ahead block); remote ones with 1 MiB read-ahead blocks
    (a read is a request: small ones are batched)."""
    if not is_remote(url):
        return open(url, "rb", buffering=0 if raw else -1)  # noqa: PTH123
    fs, path = filesystem(url, options)
    return fs.open(path, "rb", block_size=2**20)


def _npy_header(
    handle: Any, where: str = "an .npy", by_offset: bool = False
) -> tuple[tuple[int, ...], str]:
    """An ``.npy`` header's shape and dtype; ``by_offset``: its rows will be read by
    offset, which needs them in C order (a Fortran-order array is refused)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if by_offset and fortran and len(shape) > 1:
        raise DataError(
            f"{where} holds its array in Fortran order; re-save it with "
            "numpy.save(path, numpy.ascontiguousarray(array))"
        )
    return tuple(shape), str(dtype)


def _dataset_labels(text: str | None, names: list[str]) -> np.ndarray | None:
    """Labels by file name from an edm2 ``dataset.json`` (-1 where a file has none)."""
    if text is None:
        return None
    pairs = json.loads(text).get("labels")
    if not pairs:
        return None
    by_name = {str(name): int(label) for name, label in pairs}
    return np.array([by_name.get(name, -1) for name in names], np.int32)


def _id_of(name: str) -> str:
    return slug("__".join(PurePosixPath(name).with_suffix("").parts))


def _npy_files(place: Place, names: list[str]) -> Found:
    with _handle(place.named(names[0]), place.options) as handle:
        shape, dtype = _npy_header(handle, place.named(names[0]))
    labels = _dataset_labels(place.text("dataset.json"), names)
    pieces = tuple(Piece(kind="npy-files", path=place.named(n)) for n in names)
    return Found(
        spec=place.url, kind="npy-files", pieces=pieces, ids=tuple(unique(map(_id_of, names))),
        labels=labels, shape=shape, dtype=dtype,
    )  # fmt: skip


def _npz_files(place: Place, names: list[str]) -> Found:
    """A folder of one ``.npz`` per image (MAR's cache), labelled by its class folders."""
    first_url = place.named(names[0])
    with _handle(first_url, place.options) as raw, np.load(raw) as first:
        member = "moments" if "moments" in first.files else first.files[0]
        if member != "moments" and len(first.files) > 1:
            raise DataError(
                f"{first_url} holds {', '.join(first.files)}; import reads a folder of "
                ".npz files by their 'moments' array (MAR's cache)"
            )
        with first.zip.open(f"{member}.npy") as handle:
            shape, dtype = _npy_header(io.BytesIO(handle.read(4096)), first_url)
    parts = [PurePosixPath(n).parts for n in names]
    classes = sorted({p[0] for p in parts})
    labelled = all(len(p) == 2 for p in parts)
    labels = np.array([classes.index(p[0]) for p in parts], np.int32) if labelled else None
    pieces = tuple(Piece(kind="npz-files", path=place.named(n), member=member) for n in names)
    return Found(
        spec=place.url, kind="npz-files", pieces=pieces, ids=tuple(unique(map(_id_of, names))),
        labels=labels, shape=shape, dtype=dtype,
    )  # fmt: skip


def _npy_zip(place: Place) -> Found:
    with _handle(place.url, place.options) as raw, zipfile.ZipFile(raw) as archive:
        members = sorted(
            (i for i in archive.infolist() if i.filename.endswith(".npy")),
            key=lambda i: i.filename,
        )
        names = [i.filename for i in members]
        if not names:
            raise DataError(f"{place.url} holds no .npy files")
        with archive.open(members[0]) as handle:
            shape, dtype = _npy_header(io.BytesIO(handle.read(4096)), f"{place.url}::{names[0]}")
        text = (
            archive.read("dataset.json").decode() if "dataset.json" in archive.namelist() else None
        )
    pieces = tuple(
        Piece(
            kind="npy-zip",
            path=place.url,
            member=i.filename,
            offset=i.header_offset,
            length=i.compress_size,
            method=i.compress_type,
            crc=i.CRC,
        )
        for i in members
    )
    return Found(
        spec=place.url, kind="npy-zip", pieces=pieces, ids=tuple(unique(map(_id_of, names))),
        labels=_dataset_labels(text, names), shape=shape, dtype=dtype,
    )  # fmt: skip


def _rows_of(
    kind: Kind,
    path: str,
    member: str,
    count: int,
    chunk: int,
    start: int = -1,
    shape: tuple[int, ...] = (),
    dtype: str = "",
) -> tuple[Piece, ...]:
    """Pieces of ``chunk`` rows of an array of ``count`` rows; when its rows (of row
    ``shape`` and ``dtype``) lie contiguously from byte ``start`` of the file, each piece
    records where its own rows lie."""
    row = _row_bytes(shape, dtype) if start >= 0 else 0
    return tuple(
        Piece(
            kind=kind,
            path=path,
            member=member,
            first=a,
            rows=min(chunk, count - a),
            offset=start + a * row if start >= 0 else -1,
            length=min(chunk, count - a) * row,
            shape=shape,
            dtype=dtype,
        )
        for a in range(0, count, chunk)
    )


def _named_ids(name: str, count: int) -> tuple[str, ...]:
    return tuple(f"{slug(name)}-{i:08d}" for i in range(count))


def _row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one row of ``shape`` (a row's, not the array's) and ``dtype``."""
    size = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    return int(np.prod(shape, dtype=np.int64)) * size


def _array(place: Place) -> Found:
    stem = PurePosixPath(place.path).stem
    if place.path.endswith(".npy"):
        with _handle(place.url, place.options, raw=True) as handle:
            head = io.BytesIO(handle.read(4096))
        shape, dtype = _npy_header(head, place.url, by_offset=True)
        member, labels, start = "", None, head.tell()
    else:
        shape, dtype, member, labels, start = _npz(place)
    if len(shape) != 4:
        raise DataError(f"{place.url} holds an array of shape {shape}; import (N, C, h, w) latents")
    pieces = _rows_of("array", place.url, member, shape[0], 1024, start, shape[1:], dtype)
    return Found(
        spec=place.url, kind="array", pieces=pieces, ids=_named_ids(stem, shape[0]),
        labels=labels, shape=shape[1:], dtype=dtype,
    )  # fmt: skip


def _npz(place: Place) -> tuple[tuple[int, ...], str, str, np.ndarray | None, int]:
    """An ``.npz``'s latents array (its shape and dtype read from its header alone, not
    decompressed), its name and labels, and where its data begins when it is stored
    (-1 when compressed)."""
    with _handle(place.url, place.options) as raw, zipfile.ZipFile(raw) as archive:
        headers = {}
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                with archive.open(info) as handle:
                    head = io.BytesIO(handle.read(4096))
                    stored = info.compress_type == zipfile.ZIP_STORED
                    found = _npy_header(head, f"{place.url}::{info.filename}", by_offset=stored)
                    headers[info.filename[: -len(".npy")]] = (info, *found, head.tell())
        four = [k for k, (_, s, _, _) in headers.items() if len(s) == 4]
        member = "latents" if "latents" in headers else (four[0] if len(four) == 1 else "")
        if not member:
            raise DataError(
                f"{place.url} holds {len(four)} 4-D arrays ({', '.join(four) or 'none'}); "
                "name the latents 'latents'"
            )
        labels = None
        if "labels" in headers:
            with archive.open(headers["labels"][0]) as handle:
                labels = _read_npy(handle, f"{place.url}::labels").astype(np.int32)
        info, shape, dtype, header_bytes = headers[member]
        start = -1
        if info.compress_type == zipfile.ZIP_STORED and shape:
            raw.seek(info.header_offset)
            start = info.header_offset + _local_header(raw.read(30), place.url) + header_bytes
    return shape, dtype, member, labels, start


def _local_header(head: bytes, where: str) -> int:
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


def _safetensors_header(url: str, options: StorageOptions | None) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensors (name → ``dtype``, ``shape``, ``data_offsets``) and
    where its data begins, from its header alone (two small reads)."""
    with _handle(url, options, raw=True) as handle:
        size = int.from_bytes(handle.read(8), "little")
        header: dict[str, Any] = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _safetensors(place: Place, files: list[str]) -> Found:
    pieces: list[Piece] = []
    ids: list[str] = []
    shape: tuple[int, ...] = ()
    dtype = ""
    for url in files:
        header, data = _safetensors_header(url, place.options)
        four = [k for k, v in header.items() if len(v["shape"]) == 4]
        if four:
            key = "latents" if "latents" in four else (four[0] if len(four) == 1 else "")
            if not key:
                raise DataError(f"{url} holds several 4-D tensors; name the latents 'latents'")
            entry = header[key]
            shape, dtype = tuple(entry["shape"][1:]), entry["dtype"]
            count = int(entry["shape"][0])
            at = data + entry["data_offsets"][0]
            rows = _rows_of("safetensors", url, key, count, 1024, at, shape, _dtype_of(dtype, url))
            labelled = next((n for n in LABEL_NAMES if n in header), None)
            if labelled is not None:  # each piece's labels lie beside its rows
                kind = _dtype_of(header[labelled]["dtype"], url)
                at = data + header[labelled]["data_offsets"][0]
                size = np.dtype(kind).itemsize
                rows = tuple(
                    dataclasses.replace(
                        p, label=(at + p.first * size, p.rows * size), label_dtype=kind
                    )
                    for p in rows
                )
            pieces += rows
            ids += _named_ids(PurePosixPath(url).stem, count)
        else:
            named = sorted(k for k, v in header.items() if len(v["shape"]) == 3)
            if not named:
                raise DataError(f"{url} holds no 3-D or 4-D tensors of latents")
            shape, dtype = tuple(header[named[0]]["shape"]), header[named[0]]["dtype"]
            for k in named:
                a, b = header[k]["data_offsets"]
                pieces.append(
                    Piece(
                        kind="safetensors",
                        path=url,
                        member=k,
                        offset=data + a,
                        length=b - a,
                        shape=tuple(header[k]["shape"]),
                        dtype=_dtype_of(header[k]["dtype"], url),
                    )
                )
            ids += named
    return Found(
        spec=place.url, kind="safetensors", pieces=tuple(pieces), ids=tuple(ids), labels=None,
        shape=shape, dtype=_dtype_of(dtype, files[0]),
    )  # fmt: skip


def _dtype_of(name: str, where: str) -> str:
    if name not in _SAFETENSORS_DTYPES:
        raise DataError(f"{where} holds {name} tensors; import float or integer tensors")
    return _SAFETENSORS_DTYPES[name]


def _tar_listing(
    url: str, options: StorageOptions | None
) -> tuple[list[Piece], list[str], tuple[int, ...], str]:
    """A WebDataset tar's samples with an ``.npy`` member, in order, as pieces that say
    where the member's bytes (and its ``.cls`` member's) lie, their keys, and the first
    one's shape and dtype (from its header), in one pass over the tar."""
    npy: dict[str, tuple[int, int]] = {}
    cls: dict[str, tuple[int, int]] = {}
    shape: tuple[int, ...] = ()
    dtype = ""
    raw = _handle(url, options, raw=True)  # headers read as they are
    try:
        archive = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - uncompressed: seekable
    except tarfile.ReadError:
        raw.close()
        raise DataError(
            f"{url} is not an uncompressed tar; decompress it (WebDataset's tars are "
            "plain tars) and import that"
        ) from None
    with raw, archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, suffix = member.name.rpartition(".")
            if suffix == "npy":
                npy[key] = (member.offset_data, member.size)
                if not shape:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    shape, dtype = _npy_header(
                        io.BytesIO(handle.read(4096)), f"{url}::{member.name}"
                    )
            elif suffix == "cls":
                cls[key] = (member.offset_data, member.size)
    pieces = [
        Piece(
            kind="webdataset",
            path=url,
            member=f"{key}.npy",
            offset=offset,
            length=length,
            label=cls.get(key),
        )
        for key, (offset, length) in npy.items()
    ]
    return pieces, list(npy), shape, dtype


def _webdataset(place: Place, files: list[str]) -> Found:
    pieces: list[Piece] = []
    ids: list[str] = []
    shape: tuple[int, ...] = ()
    dtype = ""
    for url in files:
        found, keys, first_shape, first_dtype = _tar_listing(url, place.options)
        pieces += found
        ids += [slug(k.replace("/", "__")) for k in keys]
        shape, dtype = shape or first_shape, dtype or first_dtype
    if not ids:
        raise DataError(f"{files[0]} holds no .npy members")
    return Found(
        spec=place.url, kind="webdataset", pieces=tuple(pieces), ids=tuple(ids), labels=None,
        shape=shape, dtype=dtype,
    )  # fmt: skip


def _open_zarr(url: str, options: StorageOptions | None) -> Any:
    import zarr

    return zarr.open(url, mode="r", storage_options=zarr_options(url, options))


def _zarr(spec: str, place: Place) -> Found:
    import zarr

    name = spec.partition("::")[2]
    try:
        opened = _open_zarr(place.url, place.options)
    except Exception as exc:
        raise DataError(f"{place.url} is not a Zarr array or group: {exc}") from None
    labels = None
    if isinstance(opened, zarr.Group):
        members = dict(opened.arrays())
        four = [k for k, a in members.items() if a.ndim == 4]
        name = name or ("latents" if "latents" in members else (four[0] if len(four) == 1 else ""))
        if name not in members:
            raise DataError(
                f"{place.url} is a Zarr group without a 'latents' array ({', '.join(members)}); "
                "name one: PATH::NAME"
            )
        array = members[name]
        if "labels" in members and members["labels"].shape == (array.shape[0],):
            labels = np.asarray(members["labels"][:], np.int32)
    else:
        array = opened
    if array.ndim != 4:
        raise DataError(
            f"{spec} holds an array of shape {array.shape}; import (N, C, h, w) latents"
        )
    count = int(array.shape[0])
    pieces = _rows_of("zarr", place.url, name, count, max(1, int(array.chunks[0])))
    stem = PurePosixPath(place.path.rstrip("/")).stem or "zarr"
    return Found(
        spec=spec, kind="zarr", pieces=pieces, ids=_named_ids(stem, count), labels=labels,
        shape=tuple(array.shape[1:]), dtype=str(array.dtype),
    )  # fmt: skip


def find(spec: str, options: StorageOptions | None = None) -> Found:
    """Recognise the latents ``spec`` names, a local path or an fsspec URL read with
    ``options`` (see the module docstring)."""
    place = Place(spec.partition("::")[0], options)
    fs, path = place.fs, place.path
    if not fs.exists(path):
        raise DataError(f"{spec} does not exist; --from names a folder, file or Zarr store")
    _refuse_pickles(path)
    if any(fs.isfile(join(path, name)) for name in ("zarr.json", ".zarray", ".zgroup")):
        return _zarr(spec, place)
    if fs.isdir(path):
        below = place.below()
        top = [n for n in below if "/" not in n]
        for name in top:
            _refuse_pickles(name)
        if npy := [n for n in below if n.endswith(".npy")]:
            return _npy_files(place, npy)
        if npz := [n for n in below if n.endswith(".npz")]:
            return _npz_files(place, npz)
        if tars := [place.named(n) for n in top if n.endswith(".tar")]:
            return _webdataset(place, tars)
        if tensors := [place.named(n) for n in top if n.endswith(".safetensors")]:
            return _safetensors(place, tensors)
        raise DataError(
            f"{spec} holds no .npy, .npz, .tar or .safetensors files and is not a Zarr store"
        )
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".zip":
        return _npy_zip(place)
    if suffix in (".npy", ".npz"):
        return _array(place)
    if suffix == ".safetensors":
        return _safetensors(place, [place.url])
    if suffix == ".tar":
        return _webdataset(place, [place.url])
    raise DataError(
        f"{spec} is not a layout import reads (.npy, .npz, .zip of .npy, .safetensors, "
        "WebDataset .tar, a Zarr store, or a folder of those)"
    )


def _read_npy(handle: Any, where: str) -> np.ndarray:
    """One ``.npy``'s array, or a sentence naming ``where`` when it is not one."""
    data = handle.read()
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
            for piece, a, b in found.segments(start, stop):
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
                self._files[path] = self._stack.enter_context(_handle(path, None, raw=True))
            handle = self._files[path]
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise DataError(f"{path} ends before the bytes its listing names; the file changed")
        return data

    def _whole(self, path: str) -> bytes:
        """A file of one row, read whole (one request)."""
        if is_remote(path):
            fs, key = filesystem(path, self.options)
            return bytes(fs.cat_file(key))
        with _handle(path, None, raw=True) as handle:
            return bytes(handle.read())

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
            return self._array(piece), None
        if piece.kind == "safetensors":
            return self._safetensors(piece)
        if piece.path not in self._archives:
            self._archives[piece.path] = _open_zarr(piece.path, self.options)
        opened = self._archives[piece.path]
        array = opened[piece.member] if piece.member else opened
        return np.asarray(array[piece.first : piece.first + piece.rows]), None

    def _zip_member(self, piece: Piece, where: str) -> bytes:
        # one read of the local header and the data, when its extra field is empty (it is
        # in the zips numpy, Python and edm2 write); a second read when it is not
        wanted = 30 + len(piece.member.encode()) + piece.length
        found = self._bytes(piece.path, piece.offset, wanted)
        start = _local_header(found[:30], where)
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

    def _array(self, piece: Piece) -> np.ndarray:
        if piece.offset >= 0:  # an .npy, or a stored .npz array: the rows by offset
            data = self._bytes(piece.path, piece.offset, piece.length)
            return _from_bytes(data, piece.dtype, (piece.rows, *piece.shape))
        # a compressed .npz array: its directory read once per task, streamed to the rows
        if piece.path not in self._archives:
            raw = self._stack.enter_context(_handle(piece.path, self.options))
            self._archives[piece.path] = self._stack.enter_context(np.load(raw))
        stream = self._archives[piece.path].zip.open(f"{piece.member}.npy")
        shape, dtype = _npy_header(stream, piece.path)
        row = _row_bytes(shape[1:], dtype)
        stream.read(piece.first * row)
        return _from_bytes(stream.read(piece.rows * row), dtype, (piece.rows, *shape[1:]))

    def _safetensors(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
        data = self._bytes(piece.path, piece.offset, piece.length)
        block = _from_bytes(data, piece.dtype, (-1, *piece.shape))  # its rows, or its one
        if piece.label is None:
            return block, None
        labels = _from_bytes(self._bytes(piece.path, *piece.label), piece.label_dtype, (-1,))
        return block, labels.astype(np.int32)


def read_piece(
    piece: Piece, options: StorageOptions | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One piece's rows and labels, read on their own (:class:`Reader` for many)."""
    with Reader(options) as reader:
        return reader.read(piece)
