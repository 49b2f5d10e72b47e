"""Latent collections found elsewhere: the layouts ``latentbatch import`` reads, each
listed as pieces in row order (:func:`find`) and read by a task's :class:`Reader`, with
no torch.

Each source byte is read once: the listing records where every member lies, and a task
opens each file once and reads only its own pieces there. A zip member is read by its
offset and length (edm2's zips are stored, uncompressed; a deflated member is inflated
from its own bytes), its CRC checked, with no parse of the zip's directory in the task;
a WebDataset tar's ``.npy`` and ``.cls`` members likewise, from the index the listing
built in one pass; an ``.npz``'s stored array by row range from its offset (a compressed
one is streamed up to the rows wanted); a safetensors file's header is parsed once per
task. A member that is not what the listing promised (another shape, a corrupt or
object ``.npy``, a ``.cls`` that is not an integer) is refused in a sentence naming it.

``--from`` names the latents; its layout is recognised:

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
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentbatch.errors import DataError
from latentbatch.ids import slug, unique
from latentbatch.models.checkpoint import safetensors_header

PICKLES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
Kind = Literal["npy-files", "npz-files", "npy-zip", "array", "safetensors", "webdataset", "zarr"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Piece:
    """One input: a file (or a zip or tar member, or a Zarr chunk of rows) holding
    ``rows`` rows from row ``first`` of its file or array. A member of a zip or tar, or a
    stored ``.npz`` array, also records where its bytes lie: ``offset`` (a zip member's
    local header; a tar member's or an array's data) and ``length``, a zip member's
    ``method`` and ``crc``, and a tar sample's ``.cls`` member as ``label``
    (offset, length)."""

    kind: Kind
    path: str
    member: str = ""
    first: int = 0
    rows: int = 1
    offset: int = -1
    length: int = 0
    method: int = zipfile.ZIP_STORED
    crc: int = 0
    label: tuple[int, int] | None = None


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


def _refuse_pickles(path: Path) -> None:
    if path.suffix.lower() in PICKLES:
        raise DataError(
            f"{path} is a pickle ({path.suffix}); latentbatch never unpickles: save the "
            "latents with numpy.save, safetensors or zarr and import that"
        )


def _npy_header(handle: Any) -> tuple[tuple[int, ...], str]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
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
    return slug("__".join(Path(name).with_suffix("").parts))


def _npy_files(root: Path) -> Found:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.npy"))
    with (root / names[0]).open("rb") as handle:
        shape, dtype = _npy_header(handle)
    labels_file = root / "dataset.json"
    labels = _dataset_labels(labels_file.read_text() if labels_file.is_file() else None, names)
    pieces = tuple(Piece(kind="npy-files", path=str(root / n)) for n in names)
    return Found(
        spec=str(root), kind="npy-files", pieces=pieces, ids=tuple(unique(map(_id_of, names))),
        labels=labels, shape=shape, dtype=dtype,
    )  # fmt: skip


def _npz_files(root: Path) -> Found:
    """A folder of one ``.npz`` per image (MAR's cache), labelled by its class folders."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.npz"))
    with np.load(root / names[0]) as first:
        member = "moments" if "moments" in first.files else first.files[0]
        if member != "moments" and len(first.files) > 1:
            raise DataError(
                f"{root / names[0]} holds {', '.join(first.files)}; import reads a folder of "
                ".npz files by their 'moments' array (MAR's cache)"
            )
        with first.zip.open(f"{member}.npy") as handle:
            shape, dtype = _npy_header(io.BytesIO(handle.read(4096)))
    classes = sorted({Path(n).parts[0] for n in names})
    labelled = all(len(Path(n).parts) == 2 for n in names)
    labels = (
        np.array([classes.index(Path(n).parts[0]) for n in names], np.int32) if labelled else None
    )
    pieces = tuple(Piece(kind="npz-files", path=str(root / n), member=member) for n in names)
    return Found(
        spec=str(root), kind="npz-files", pieces=pieces, ids=tuple(unique(map(_id_of, names))),
        labels=labels, shape=shape, dtype=dtype,
    )  # fmt: skip


def _npy_zip(path: Path) -> Found:
    with zipfile.ZipFile(path) as archive:
        members = sorted(
            (i for i in archive.infolist() if i.filename.endswith(".npy")),
            key=lambda i: i.filename,
        )
        names = [i.filename for i in members]
        if not names:
            raise DataError(f"{path} holds no .npy files")
        with archive.open(members[0]) as handle:
            shape, dtype = _npy_header(io.BytesIO(handle.read(4096)))
        text = (
            archive.read("dataset.json").decode() if "dataset.json" in archive.namelist() else None
        )
    pieces = tuple(
        Piece(
            kind="npy-zip",
            path=str(path),
            member=i.filename,
            offset=i.header_offset,
            length=i.compress_size,
            method=i.compress_type,
            crc=i.CRC,
        )
        for i in members
    )
    return Found(
        spec=str(path), kind="npy-zip", pieces=pieces, ids=tuple(unique(map(_id_of, names))),
        labels=_dataset_labels(text, names), shape=shape, dtype=dtype,
    )  # fmt: skip


def _rows_of(kind: Kind, path: str, member: str, count: int, chunk: int) -> tuple[Piece, ...]:
    return tuple(
        Piece(kind=kind, path=path, member=member, first=a, rows=min(chunk, count - a))
        for a in range(0, count, chunk)
    )


def _named_ids(name: str, count: int) -> tuple[str, ...]:
    return tuple(f"{slug(name)}-{i:08d}" for i in range(count))


def _array(path: Path) -> Found:
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        shape, dtype, member, labels = tuple(array.shape), str(array.dtype), "", None
        pieces = _rows_of("array", str(path), member, len(array), 1024)
    else:
        shape, dtype, member, labels, pieces = _npz(path)
    if len(shape) != 4:
        raise DataError(f"{path} holds an array of shape {shape}; import (N, C, h, w) latents")
    return Found(
        spec=str(path), kind="array", pieces=pieces, ids=_named_ids(path.stem, shape[0]),
        labels=labels, shape=shape[1:], dtype=dtype,
    )  # fmt: skip


def _npz(path: Path) -> tuple[tuple[int, ...], str, str, np.ndarray | None, tuple[Piece, ...]]:
    """An ``.npz``'s latents array (its shape and dtype read from its header alone, not
    decompressed), its labels, and pieces of 1,024 rows that say where a stored array's
    rows lie."""
    with zipfile.ZipFile(path) as archive:
        headers = {}
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                with archive.open(info) as handle:
                    head = io.BytesIO(handle.read(4096))
                    headers[info.filename[: -len(".npy")]] = (info, *_npy_header(head), head.tell())
        four = [k for k, (_, s, _, _) in headers.items() if len(s) == 4]
        member = "latents" if "latents" in headers else (four[0] if len(four) == 1 else "")
        if not member:
            raise DataError(
                f"{path} holds {len(four)} 4-D arrays ({', '.join(four) or 'none'}); name "
                "the latents 'latents'"
            )
        labels = None
        if "labels" in headers:
            with archive.open(headers["labels"][0]) as handle:
                labels = _read_npy(handle, f"{path}::labels").astype(np.int32)
    info, shape, dtype, header_bytes = headers[member]
    pieces = _rows_of("array", str(path), member, shape[0] if shape else 0, 1024)
    if info.compress_type == zipfile.ZIP_STORED:
        start = _data_start(path, info.header_offset) + header_bytes
        row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        pieces = tuple(
            Piece(
                kind="array",
                path=p.path,
                member=p.member,
                first=p.first,
                rows=p.rows,
                offset=start + p.first * row,
                length=p.rows * row,
            )
            for p in pieces
        )
    return shape, dtype, member, labels, pieces


def _data_start(path: Path, header_offset: int) -> int:
    """Where a zip member's bytes start: after its local header at ``header_offset``."""
    with path.open("rb") as handle:
        handle.seek(header_offset)
        return header_offset + _local_header(handle.read(30), str(path))


def _local_header(head: bytes, where: str) -> int:
    """The size of a zip member's local header, from its first 30 bytes."""
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise DataError(
            f"{where}: a zip member's header is not where the zip says; the file changed"
        )
    name, extra = struct.unpack("<HH", head[26:30])
    return 30 + int(name) + int(extra)


_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64"}


def _safetensors(files: list[Path]) -> Found:
    pieces: list[Piece] = []
    ids: list[str] = []
    labels: list[int] = []
    shape: tuple[int, ...] = ()
    dtype = ""
    for path in files:
        header = safetensors_header(path)
        four = [k for k, v in header.items() if len(v["shape"]) == 4]
        if four:
            key = "latents" if "latents" in four else (four[0] if len(four) == 1 else "")
            if not key:
                raise DataError(f"{path} holds several 4-D tensors; name the latents 'latents'")
            entry = header[key]
            count = int(entry["shape"][0])
            pieces += _rows_of("safetensors", str(path), key, count, 1024)
            ids += _named_ids(path.stem, count)
            labels += [-1] * count  # read with the rows when the file has labels
            shape, dtype = tuple(entry["shape"][1:]), entry["dtype"]
        else:
            rows = sorted(k for k, v in header.items() if len(v["shape"]) == 3)
            if not rows:
                raise DataError(f"{path} holds no 3-D or 4-D tensors of latents")
            pieces += [Piece(kind="safetensors", path=str(path), member=k) for k in rows]
            ids += rows
            labels += [-1] * len(rows)
            shape, dtype = tuple(header[rows[0]]["shape"]), header[rows[0]]["dtype"]
    return Found(
        spec=str(files[0].parent if len(files) > 1 else files[0]), kind="safetensors",
        pieces=tuple(pieces), ids=tuple(ids), labels=None, shape=shape,
        dtype=_SAFETENSORS_DTYPES.get(dtype, dtype.lower()),
    )  # fmt: skip


def _tar_listing(path: Path) -> tuple[list[Piece], list[str], tuple[int, ...], str]:
    """A WebDataset tar's samples with an ``.npy`` member, in order, as pieces that say
    where the member's bytes (and its ``.cls`` member's) lie, their keys, and the first
    one's shape and dtype (from its header), in one pass over the tar."""
    npy: dict[str, tuple[int, int]] = {}
    cls: dict[str, tuple[int, int]] = {}
    shape: tuple[int, ...] = ()
    dtype = ""
    raw = path.open("rb", buffering=0)  # headers read as they are: no read-ahead of data
    try:
        archive = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - uncompressed: seekable
    except tarfile.ReadError:
        raw.close()
        raise DataError(
            f"{path} is not an uncompressed tar; decompress it (WebDataset's tars are "
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
                    shape, dtype = _npy_header(io.BytesIO(handle.read(4096)))
            elif suffix == "cls":
                cls[key] = (member.offset_data, member.size)
    pieces = [
        Piece(
            kind="webdataset",
            path=str(path),
            member=f"{key}.npy",
            offset=offset,
            length=length,
            label=cls.get(key),
        )
        for key, (offset, length) in npy.items()
    ]
    return pieces, list(npy), shape, dtype


def _webdataset(files: list[Path]) -> Found:
    pieces: list[Piece] = []
    ids: list[str] = []
    shape: tuple[int, ...] = ()
    dtype = ""
    for path in files:
        found, keys, first_shape, first_dtype = _tar_listing(path)
        pieces += found
        ids += [slug(k.replace("/", "__")) for k in keys]
        shape, dtype = shape or first_shape, dtype or first_dtype
    if not ids:
        raise DataError(f"{files[0]} holds no .npy members")
    return Found(
        spec=str(files[0].parent if len(files) > 1 else files[0]), kind="webdataset",
        pieces=tuple(pieces), ids=tuple(ids), labels=None, shape=shape, dtype=dtype,
    )  # fmt: skip


def _zarr(spec: str) -> Found:
    import zarr

    path, _, name = spec.partition("::")
    try:
        opened = zarr.open(path, mode="r")
    except Exception as exc:
        raise DataError(f"{path} is not a Zarr array or group: {exc}") from None
    labels = None
    if isinstance(opened, zarr.Group):
        members = dict(opened.arrays())
        four = [k for k, a in members.items() if a.ndim == 4]
        name = name or ("latents" if "latents" in members else (four[0] if len(four) == 1 else ""))
        if name not in members:
            raise DataError(
                f"{path} is a Zarr group without a 'latents' array ({', '.join(members)}); "
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
    pieces = _rows_of("zarr", path, name, count, max(1, int(array.chunks[0])))
    return Found(
        spec=spec, kind="zarr", pieces=pieces,
        ids=_named_ids(Path(path.rstrip("/")).stem or "zarr", count), labels=labels,
        shape=tuple(array.shape[1:]), dtype=str(array.dtype),
    )  # fmt: skip


def find(spec: str) -> Found:
    """Recognise the latents ``spec`` names (see the module docstring)."""
    path = Path(spec.partition("::")[0])
    if not path.exists():
        raise DataError(f"{spec} does not exist; --from names a folder, file or Zarr store")
    _refuse_pickles(path)
    if (
        (path / "zarr.json").is_file()
        or (path / ".zarray").is_file()
        or (path / ".zgroup").is_file()
    ):
        return _zarr(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        for found in files:
            _refuse_pickles(found)
        if any(path.rglob("*.npy")):
            return _npy_files(path)
        if any(path.rglob("*.npz")):
            return _npz_files(path)
        if tars := [p for p in files if p.suffix == ".tar"]:
            return _webdataset(tars)
        if tensors := [p for p in files if p.suffix == ".safetensors"]:
            return _safetensors(tensors)
        raise DataError(
            f"{spec} holds no .npy, .npz, .tar or .safetensors files and is not a Zarr store"
        )
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return _npy_zip(path)
    if suffix in (".npy", ".npz"):
        return _array(path)
    if suffix == ".safetensors":
        return _safetensors([path])
    if suffix == ".tar":
        return _webdataset([path])
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


class Reader:
    """A task's reads of found latents: each file of many pieces (a zip, a tar, an
    ``.npz``, a safetensors file, whose header is then parsed once) opened once however
    many of its pieces the task reads, and closed at the end.

    ::

        with Reader() as reader:
            for piece, a, b in found.segments(start, stop):
                rows, labels = reader.read(piece)
    """

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}
        self._tensors: dict[str, Any] = {}
        self._archives: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _file(self, path: str) -> Any:
        if path not in self._files:
            # unbuffered: a read takes the bytes asked for, never a read-ahead block
            self._files[path] = self._stack.enter_context(open(path, "rb", buffering=0))  # noqa: PTH123, SIM115
        return self._files[path]

    def _bytes(self, path: str, offset: int, length: int) -> bytes:
        handle = self._file(path)
        handle.seek(offset)
        data: bytes = handle.read(length)
        if len(data) != length:
            raise DataError(f"{path} ends before the bytes its listing names; the file changed")
        return data

    def read(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
        """A piece's rows ``(n, C', h, w)`` as stored there, and their labels when it
        has them."""
        where = f"{piece.path}::{piece.member}" if piece.member else piece.path
        if piece.kind == "npy-files":  # a file a row: opened, read and closed
            with open(piece.path, "rb", buffering=0) as handle:  # noqa: PTH123
                return _read_npy(handle, where)[None], None
        if piece.kind == "npz-files":  # a file a row: opened, read and closed
            try:
                with np.load(piece.path, allow_pickle=False) as archive:
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
        import zarr

        opened: Any = zarr.open(piece.path, mode="r")
        array = opened[piece.member] if piece.member else opened
        return np.asarray(array[piece.first : piece.first + piece.rows]), None

    def _zip_member(self, piece: Piece, where: str) -> bytes:
        handle = self._file(piece.path)
        handle.seek(piece.offset)
        # one read of the local header and the data, when its extra field is empty (it is
        # in the zips numpy, Python and edm2 write); a second read when it is not
        wanted = 30 + len(piece.member.encode()) + piece.length
        found: bytes = handle.read(wanted)
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
        rows = slice(piece.first, piece.first + piece.rows)
        if not piece.member:  # an .npy: its rows mapped, read by range
            return np.asarray(np.load(piece.path, mmap_mode="r")[rows])
        if piece.path not in self._archives:  # an .npz: its directory read once per task
            self._archives[piece.path] = self._stack.enter_context(np.load(piece.path))
        stream = self._archives[piece.path].zip.open(f"{piece.member}.npy")
        shape, dtype = _npy_header(stream)
        row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        if piece.offset >= 0:  # stored: the rows by offset, without reading the rest
            data = self._bytes(piece.path, piece.offset, piece.length)
        else:  # compressed: streamed up to the rows wanted
            stream.read(piece.first * row)
            data = stream.read(piece.rows * row)
        return np.frombuffer(data, dtype).reshape(piece.rows, *shape[1:])

    def _safetensors(self, piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
        import torch
        from safetensors import safe_open

        if piece.path not in self._tensors:
            self._tensors[piece.path] = self._stack.enter_context(
                safe_open(piece.path, framework="pt")
            )
        handle = self._tensors[piece.path]
        labels = None
        found = handle.get_slice(piece.member)
        if len(found.get_shape()) == 3:  # one row, named by its id
            block = handle.get_tensor(piece.member)[None]
        else:
            block = found[piece.first : piece.first + piece.rows]
            for name in ("labels", "label", "y"):
                if name in handle.keys():  # noqa: SIM118
                    labels = handle.get_slice(name)[piece.first : piece.first + piece.rows].numpy()
                    break
        if block.dtype == torch.bfloat16:  # numpy has no bfloat16: float32 holds it exactly
            block = block.float()
        return block.numpy(), labels


def read_piece(piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
    """One piece's rows and labels, read on their own (:class:`Reader` for many)."""
    with Reader() as reader:
        return reader.read(piece)
