"""A found collection's listing: which rows lie where, made by tasks and kept on storage,
so that the client holds a few numbers per input file group, never one per file.

:func:`list_source` recognises what ``--from`` names (:mod:`latentbatch.sources.latents`
says which layouts) and lists it as :class:`Group` s in row order, each by one task run
by the caller's ``run`` (a Dask cluster's workers, or this process):

- a folder of one ``.npy`` or ``.npz`` per image is one group, listed by one task that
  walks it (the folder's survey);
- a zip of ``.npy`` files is one group: one task reads its central directory;
- each WebDataset tar and each safetensors file of a folder is a group: one task each
  reads its member headers (a tar) or its header (a safetensors file);
- one array (``.npy``, ``.npz``, a 4-D safetensors tensor, a Zarr array) is a group of
  rows by range: its listing is where row 0 lies and the row's size.

A group of members (files, zip or tar members, named tensors) writes its listing as
blocks of :data:`BLOCK_ROWS` rows into the folder ``into`` (an import puts it inside the
store it writes, beside its pending record): each member's name, id, offset, length,
CRC, compression and label, or where its ``.cls`` label lies. A task that reads rows
``[a, b)`` of a group reads only the blocks that hold them (:func:`rows_of`). A last task
checks that no id repeats across groups. The listing's digest (:attr:`Listing.digest`)
is what a resumed import checks its source against.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

import numpy as np

from latentbatch.errors import DataError
from latentbatch.ids import InvalidIdError, slug, unique, validate_ids
from latentbatch.sources.latents import (
    LABEL_NAMES,
    Kind,
    Piece,
    Place,
    Reader,
    dataset_labels,
    dtype_of,
    handle,
    id_of,
    npy_header,
    npz_arrays,
    open_zarr,
    refuse_pickles,
    row_bytes,
    safetensors_header,
)
from latentbatch.storage.fs import StorageOptions, filesystem, join, write_bytes

BLOCK_ROWS = 1024
"""Rows per listing block: a task reading a store shard's rows reads one or two."""

T = TypeVar("T")
R = TypeVar("R")
Run = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]
"""How listing tasks run: ``run(fn, specs)`` is ``[fn(s) for s in specs]``, in order,
on a cluster's workers or in this process."""


def in_process(fn: Callable[[T], R], specs: Sequence[T]) -> list[R]:
    """Run listing tasks here, one after another."""
    return [fn(spec) for spec in specs]


@dataclass(frozen=True, kw_only=True, slots=True)
class Group:
    """One input file group in a listing: ``rows`` rows of ``shape`` and ``dtype``.

    A group of members (a folder of files, a zip, a tar, a safetensors file of named
    tensors) has its rows' places in the listing's blocks ``g{index}-b*`` below
    ``listing``; ``member`` names an ``.npz`` file's array. A group of rows by range (an
    array) keeps its place here: its ``member`` (an ``.npz`` array, a safetensors tensor,
    a Zarr array of a group), where row 0 lies (``offset``; -1 when its rows are read by
    range, not offset: a compressed ``.npz`` array or a Zarr array), its labels'
    (``labels``, ``label_offset``, ``label_dtype``) and its ids' ``stem``."""

    kind: Kind
    path: str
    rows: int
    digest: str
    shape: tuple[int, ...]
    dtype: str
    index: int = 0
    listing: str = ""
    member: str = ""
    offset: int = -1
    labels: str = ""
    label_offset: int = -1
    label_dtype: str = ""
    stem: str = ""

    @property
    def by_range(self) -> bool:
        return not self.listing


@dataclass(frozen=True, kw_only=True)
class Listing:
    """What ``--from`` holds: its layout, its groups in row order, one row's shape and
    dtype, and where the blocks of its groups of members lie (``into``)."""

    spec: str
    kind: Kind
    groups: tuple[Group, ...]
    shape: tuple[int, ...]
    dtype: str
    into: str
    options: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self._starts[-1])

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the listing: each group's file, rows and members' places, in row
        order (what a resumed import checks its source against)."""
        listing = hashlib.sha256(f"{self.kind}\0{self.rows}\0".encode())
        for g in self.groups:
            listing.update(f"{g.path}\0{g.rows}\0{g.digest}\n".encode())
        return listing.hexdigest()

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        """Each group's first row, and the row count last."""
        return np.concatenate([[0], np.cumsum([g.rows for g in self.groups], dtype=np.int64)])

    def segments(self, start: int, stop: int) -> tuple[tuple[Group, int, int], ...]:
        """The groups holding rows ``[start, stop)``, each with its rows wanted (found by
        bisection: a store shard's groups cost their own count, not the groups before)."""
        starts = self._starts
        first = int(np.searchsorted(starts, start, side="right")) - 1
        found = []
        for index in range(max(first, 0), len(self.groups)):
            row = int(starts[index])
            if row >= stop:
                break
            group = self.groups[index]
            a, b = max(start, row) - row, min(stop, row + group.rows) - row
            if b > a:
                found.append((group, a, b))
        return tuple(found)

    def ids(self, start: int, stop: int) -> list[str]:
        """The ids of rows ``[start, stop)``, read from the listing's blocks."""
        return [
            i for g, a, b in self.segments(start, stop) for i in group_ids(g, a, b, self.options)
        ]


# -- blocks ------------------------------------------------------------------------------

COLUMNS = ("member", "id", "offset", "length", "crc", "method", "label", "label_at", "label_size")


def _block_url(listing: str, index: int, block: int) -> str:
    return join(listing, f"g{index:06d}-b{block:06d}.npz")


def _digest_of(columns: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in ("member", "offset", "length", "crc"):
        digest.update(np.ascontiguousarray(columns[name]).tobytes())
    return digest.hexdigest()


def _members(
    *,
    kind: Kind,
    path: str,
    into: str,
    index: int,
    options: StorageOptions | None,
    names: list[str],
    shape: tuple[int, ...],
    dtype: str,
    ids: list[str] | None = None,
    member: str = "",
    **given: Sequence[int] | np.ndarray | None,
) -> Group:
    """A group of members, its blocks written to ``into``: each column of ``given``
    (offsets, lengths, CRCs, ...; missing ones are -1), its ``names`` and ``ids`` (by
    default from the names' paths, made unique)."""
    count = len(names)
    made = ids if ids is not None else unique(map(id_of, names))
    where = f"{path} (rows {{}} of its listing)"
    try:
        validate_ids(made)
    except InvalidIdError as error:
        raise DataError(f"{where.format('all')}: {error}") from None
    columns: dict[str, np.ndarray] = {
        "member": np.array([n.encode() for n in names], dtype=bytes),
        "id": np.array([i.encode() for i in made], dtype=bytes),
    }
    for name in COLUMNS[2:]:
        value = given.get(name)
        columns[name] = (
            np.full(count, -1, np.int64) if value is None else np.asarray(value, np.int64)
        )
    for block, a in enumerate(range(0, count, BLOCK_ROWS)):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: v[a : a + BLOCK_ROWS] for k, v in columns.items()})  # type: ignore[arg-type]
        write_bytes(_block_url(into, index, block), buffer.getvalue(), options)
    return Group(
        kind=kind, path=path, rows=count, digest=_digest_of(columns), shape=shape, dtype=dtype,
        index=index, listing=into, member=member,
    )  # fmt: skip


def _blocks(
    group: Group, start: int, stop: int, options: StorageOptions | None
) -> dict[str, np.ndarray]:
    """The listing's columns for rows ``[start, stop)`` of a group of members, from the
    blocks that hold them alone."""
    parts: list[dict[str, np.ndarray]] = []
    first, last = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
    for block in range(first, last + 1):
        url = _block_url(group.listing, group.index, block)
        fs, path = filesystem(url, options)
        with fs.open(path, "rb") as raw, np.load(raw, allow_pickle=False) as stored:
            parts.append({k: stored[k] for k in COLUMNS})
    offset = start - first * BLOCK_ROWS
    return {
        k: np.concatenate([p[k] for p in parts])[offset : offset + stop - start] for k in COLUMNS
    }


def group_ids(group: Group, start: int, stop: int, options: StorageOptions | None) -> list[str]:
    """The ids of rows ``[start, stop)`` of ``group``."""
    if stop <= start:
        return []
    if group.by_range:
        return [f"{group.stem}-{i:08d}" for i in range(start, stop)]
    return [i.decode() for i in _blocks(group, start, stop, options)["id"]]


def rows_of(
    group: Group, start: int, stop: int, reader: Reader
) -> tuple[list[tuple[Piece, int, int]], list[str], np.ndarray]:
    """What a task reads for rows ``[start, stop)`` of ``group``: the pieces (each with
    its rows wanted), the rows' ids, and their labels from the listing (-1 where the
    piece itself holds them, or none)."""
    count = stop - start
    if group.by_range:
        row = row_bytes(group.shape, group.dtype)
        size = np.dtype(group.label_dtype).itemsize if group.label_dtype else 0
        piece = Piece(
            kind=group.kind, path=group.path, member=group.member, first=start, rows=count,
            offset=group.offset + start * row if group.offset >= 0 else -1,
            length=count * row, shape=group.shape, dtype=group.dtype,
            label=(group.label_offset + start * size, count * size)
            if group.label_offset >= 0 else None,
            label_dtype=group.label_dtype, label_member=group.labels,
        )  # fmt: skip
        return (
            [(piece, 0, count)],
            group_ids(group, start, stop, None),
            np.full(count, -1, np.int32),
        )
    columns = _blocks(group, start, stop, reader.options)
    pieces = []
    for i in range(count):
        name = columns["member"][i].decode()
        at, size = int(columns["label_at"][i]), int(columns["label_size"][i])
        in_folder = group.kind in ("npy-files", "npz-files")
        pieces.append(
            (
                Piece(
                    kind=group.kind,
                    path=join(group.path, name) if in_folder else group.path,
                    member=group.member if in_folder else name,
                    offset=int(columns["offset"][i]),
                    length=int(columns["length"][i]),
                    shape=group.shape,
                    dtype=group.dtype,
                    method=int(columns["method"][i]),
                    crc=int(columns["crc"][i]) & 0xFFFFFFFF,
                    label=(at, size) if at >= 0 else None,
                ),
                0,
                1,
            )
        )
    ids = [i.decode() for i in columns["id"]]
    return pieces, ids, columns["label"].astype(np.int32)


def read_rows(
    segments: Sequence[tuple[Group, int, int]], reader: Reader, shape: tuple[int, ...]
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The rows of ``segments`` (:meth:`Listing.segments`), each of the listing's row
    ``shape``: their latents as stored, ids and labels (-1 where none)."""
    blocks, ids, found = [], [], []
    for group, start, stop in segments:
        pieces, named, listed = rows_of(group, start, stop, reader)
        ids += named
        at = 0
        for piece, a, b in pieces:
            block, labels = reader.read(piece)
            if tuple(block.shape[1:]) != shape:
                where = f"{piece.path}::{piece.member}" if piece.member else piece.path
                raise DataError(
                    f"{where} holds latents of shape {tuple(block.shape[1:])}, the others "
                    f"{shape}; import one shape at a time"
                )
            blocks.append(block[a:b])
            found.append(labels[a:b] if labels is not None else listed[at : at + b - a])
            at += b - a
    if not blocks:
        return np.zeros((0, *shape), np.float32), [], np.zeros(0, np.int32)
    return np.concatenate(blocks), ids, np.concatenate(found).astype(np.int32)


# -- the listing tasks -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GroupJob:
    """One listing task: the group of ``kind`` at ``url`` (a file, or a folder to
    survey), numbered ``index``, its blocks written into ``into``."""

    kind: Kind | None
    url: str
    index: int
    into: str
    options: dict[str, Any]
    name: str = ""  # a Zarr group's array, from PATH::NAME


@dataclass(frozen=True, kw_only=True)
class Survey:
    """A folder's survey: its group when one task listed it whole (a folder of one file
    per row), else the files each to be listed by a task of their own."""

    group: Group | None
    kind: Kind
    files: tuple[str, ...] = ()


def survey(job: GroupJob) -> Survey:
    """Task: walk the folder ``job.url`` (one listing of everything below it) and list
    it, when it holds one ``.npy`` or ``.npz`` per row; else name its tars or
    safetensors files."""
    place = Place(job.url, job.options)
    below = place.below()
    top = [n for n in below if "/" not in n]
    for name in top:
        refuse_pickles(name)
    if npy := [n for n in below if n.endswith(".npy")]:
        return Survey(group=_npy_files(place, npy, job), kind="npy-files")
    if npz := [n for n in below if n.endswith(".npz")]:
        return Survey(group=_npz_files(place, npz, job), kind="npz-files")
    if tars := [place.named(n) for n in top if n.endswith(".tar")]:
        return Survey(group=None, kind="webdataset", files=tuple(tars))
    if tensors := [place.named(n) for n in top if n.endswith(".safetensors")]:
        return Survey(group=None, kind="safetensors", files=tuple(tensors))
    raise DataError(
        f"{job.url} holds no .npy, .npz, .tar or .safetensors files and is not a Zarr store"
    )


def _npy_files(place: Place, names: list[str], job: GroupJob) -> Group:
    with handle(place.named(names[0]), place.options) as raw:
        shape, dtype = npy_header(raw, place.named(names[0]))
    labels = dataset_labels(place.text("dataset.json"), names)
    return _members(
        kind="npy-files", path=place.url, into=job.into, index=job.index, options=job.options,
        names=names, shape=shape, dtype=dtype, label=labels,
    )  # fmt: skip


def _npz_files(place: Place, names: list[str], job: GroupJob) -> Group:
    """A folder of one ``.npz`` per image (MAR's cache), labelled by its class folders."""
    first_url = place.named(names[0])
    with handle(first_url, place.options) as raw, np.load(raw) as first:
        member = "moments" if "moments" in first.files else first.files[0]
        if member != "moments" and len(first.files) > 1:
            raise DataError(
                f"{first_url} holds {', '.join(first.files)}; import reads a folder of "
                ".npz files by their 'moments' array (MAR's cache)"
            )
        with first.zip.open(f"{member}.npy") as stream:
            shape, dtype = npy_header(io.BytesIO(stream.read(4096)), first_url)
    parts = [PurePosixPath(n).parts for n in names]
    classes = {name: i for i, name in enumerate(sorted({p[0] for p in parts}))}
    labelled = all(len(p) == 2 for p in parts)
    labels = [classes[p[0]] for p in parts] if labelled else None
    return _members(
        kind="npz-files", path=place.url, into=job.into, index=job.index, options=job.options,
        names=names, shape=shape, dtype=dtype, member=member, label=labels,
    )  # fmt: skip


def list_group(job: GroupJob) -> Group:
    """Task: list one file (a zip, a tar, a safetensors file, an array, a Zarr array)."""
    if job.kind == "npy-zip":
        return _npy_zip(job)
    if job.kind == "webdataset":
        return _tar(job)
    if job.kind == "safetensors":
        return _safetensors(job)
    if job.kind == "zarr":
        return _zarr(job)
    return _array(job)


def _npy_zip(job: GroupJob) -> Group:
    """A zip of ``.npy`` files: its central directory read once, the members in name
    order, ``dataset.json``'s labels read from inside it."""
    with handle(job.url, job.options) as raw, zipfile.ZipFile(raw) as archive:
        members = sorted(
            (i for i in archive.infolist() if i.filename.endswith(".npy")),
            key=lambda i: i.filename,
        )
        if not members:
            raise DataError(f"{job.url} holds no .npy files")
        names = [i.filename for i in members]
        with archive.open(members[0]) as stream:
            shape, dtype = npy_header(io.BytesIO(stream.read(4096)), f"{job.url}::{names[0]}")
        text = (
            archive.read("dataset.json").decode() if "dataset.json" in archive.namelist() else None
        )
        offsets = [i.header_offset for i in members]
        lengths = [i.compress_size for i in members]
        crcs = [i.CRC for i in members]
        methods = [i.compress_type for i in members]
    del members
    return _members(
        kind="npy-zip", path=job.url, into=job.into, index=job.index, options=job.options,
        names=names, shape=shape, dtype=dtype, offset=offsets, length=lengths, crc=crcs,
        method=methods, label=dataset_labels(text, names),
    )  # fmt: skip


def _tar(job: GroupJob) -> Group:
    """A WebDataset tar's samples with an ``.npy`` member, in order: where each member's
    bytes (and its ``.cls`` member's) lie, from one pass over its headers."""
    npy: dict[str, tuple[int, int]] = {}
    cls: dict[str, tuple[int, int]] = {}
    shape: tuple[int, ...] = ()
    dtype = ""
    raw = handle(job.url, job.options, raw=True)  # headers read as they are
    try:
        archive = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - uncompressed: seekable
    except tarfile.ReadError:
        raw.close()
        raise DataError(
            f"{job.url} is not an uncompressed tar; decompress it (WebDataset's tars are "
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
                    stream = archive.extractfile(member)
                    assert stream is not None
                    shape, dtype = npy_header(
                        io.BytesIO(stream.read(4096)), f"{job.url}::{member.name}"
                    )
            elif suffix == "cls":
                cls[key] = (member.offset_data, member.size)
    if not npy:
        raise DataError(f"{job.url} holds no .npy members")
    keys = list(npy)
    return _members(
        kind="webdataset", path=job.url, into=job.into, index=job.index, options=job.options,
        names=[f"{k}.npy" for k in keys], shape=shape, dtype=dtype,
        ids=[slug(k.replace("/", "__")) for k in keys],
        offset=[npy[k][0] for k in keys], length=[npy[k][1] for k in keys],
        label_at=[cls.get(k, (-1, 0))[0] for k in keys],
        label_size=[cls.get(k, (-1, 0))[1] for k in keys],
    )  # fmt: skip


def _safetensors(job: GroupJob) -> Group:
    """A safetensors file: a 4-D tensor of rows (a group by range, its labels beside it)
    or one 3-D tensor per row named by its id (a group of members), from its header."""
    header, data = safetensors_header(job.url, job.options)
    stem = PurePosixPath(job.url).stem
    four = [k for k, v in header.items() if len(v["shape"]) == 4]
    if four:
        key = "latents" if "latents" in four else (four[0] if len(four) == 1 else "")
        if not key:
            raise DataError(f"{job.url} holds several 4-D tensors; name the latents 'latents'")
        entry = header[key]
        labelled = next((n for n in LABEL_NAMES if n in header), None)
        return Group(
            kind="safetensors", path=job.url, rows=int(entry["shape"][0]),
            digest=hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest(),
            shape=tuple(entry["shape"][1:]), dtype=dtype_of(entry["dtype"], job.url),
            member=key, offset=data + entry["data_offsets"][0], stem=slug(stem),
            label_offset=-1 if labelled is None else data + header[labelled]["data_offsets"][0],
            label_dtype="" if labelled is None else dtype_of(header[labelled]["dtype"], job.url),
        )  # fmt: skip
    named = sorted(k for k, v in header.items() if len(v["shape"]) == 3)
    if not named:
        raise DataError(f"{job.url} holds no 3-D or 4-D tensors of latents")
    shape, dtype = tuple(header[named[0]]["shape"]), header[named[0]]["dtype"]
    for k in named:
        if tuple(header[k]["shape"]) != shape or header[k]["dtype"] != dtype:
            raise DataError(
                f"{job.url}::{k} holds a {header[k]['dtype']} tensor of shape "
                f"{tuple(header[k]['shape'])}, the others {dtype} {shape}; import one shape "
                "at a time"
            )
    return _members(
        kind="safetensors", path=job.url, into=job.into, index=job.index, options=job.options,
        names=named, shape=shape, dtype=dtype_of(dtype, job.url), ids=named,
        offset=[data + header[k]["data_offsets"][0] for k in named],
        length=[header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in named],
    )  # fmt: skip


def _array(job: GroupJob) -> Group:
    """One ``.npy`` or ``.npz`` array ``(N, C, h, w)``: rows by range from its offset
    (a compressed ``.npz`` array's by streaming), its labels beside it."""
    stem = PurePosixPath(job.url).stem
    if job.url.endswith(".npy"):
        with handle(job.url, job.options, raw=True) as raw:
            head = io.BytesIO(raw.read(4096))
        shape, dtype = npy_header(head, job.url, by_offset=True)
        member, start, labels, label_start, label_dtype = "", head.tell(), "", -1, ""
    else:
        arrays = npz_arrays(job.url, job.options)
        four = [k for k, a in arrays.items() if len(a.shape) == 4]
        member = "latents" if "latents" in arrays else (four[0] if len(four) == 1 else "")
        if not member:
            raise DataError(
                f"{job.url} holds {len(four)} 4-D arrays ({', '.join(four) or 'none'}); "
                "name the latents 'latents'"
            )
        shape, dtype, start = arrays[member].shape, arrays[member].dtype, arrays[member].start
        found = arrays.get("labels")
        labels = "labels" if found is not None else ""
        label_start = found.start if found is not None else -1
        label_dtype = found.dtype if found is not None else ""
    if len(shape) not in (3, 4):  # (N, C, h, w), or sequence latents (N, h*w/4, 4C)
        raise DataError(f"{job.url} holds an array of shape {shape}; import (N, C, h, w) latents")
    return Group(
        kind="array", path=job.url, rows=shape[0], digest=f"{shape}{dtype}{start}",
        shape=tuple(shape[1:]), dtype=dtype, member=member, offset=start, labels=labels,
        label_offset=label_start, label_dtype=label_dtype, stem=slug(stem),
    )  # fmt: skip


def _zarr(job: GroupJob) -> Group:
    import zarr

    try:
        opened = open_zarr(job.url, job.options)
    except Exception as exc:
        raise DataError(f"{job.url} is not a Zarr array or group: {exc}") from None
    name, labels = job.name, ""
    spec = f"{job.url}::{name}" if name else job.url
    if isinstance(opened, zarr.Group):
        members = dict(opened.arrays())
        four = [k for k, a in members.items() if a.ndim == 4]
        name = name or ("latents" if "latents" in members else (four[0] if len(four) == 1 else ""))
        if name not in members:
            raise DataError(
                f"{job.url} is a Zarr group without a 'latents' array ({', '.join(members)}); "
                "name one: PATH::NAME"
            )
        array = members[name]
        if "labels" in members and members["labels"].shape == (array.shape[0],):
            labels = "labels"
    else:
        array = opened
    if array.ndim != 4:
        raise DataError(
            f"{spec} holds an array of shape {array.shape}; import (N, C, h, w) latents"
        )
    stem = PurePosixPath(job.url.rstrip("/")).stem or "zarr"
    return Group(
        kind="zarr", path=job.url, rows=int(array.shape[0]),
        digest=f"{array.shape}{array.dtype}{array.chunks}", shape=tuple(array.shape[1:]),
        dtype=str(array.dtype), member=name, labels=labels, stem=slug(stem),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class IdCheck:
    """The last listing task: no id repeats across ``groups``."""

    groups: tuple[Group, ...]
    options: dict[str, Any]


def check_ids(job: IdCheck) -> int:
    """Task: check that no id repeats across the groups of members (each group's own
    were checked when it was listed); the number of ids checked."""
    seen: dict[str, str] = {}
    for group in job.groups:
        for a in range(0, group.rows, BLOCK_ROWS):
            for found in group_ids(group, a, min(a + BLOCK_ROWS, group.rows), job.options):
                if found in seen:
                    raise DataError(
                        f"id {found!r} appears in {seen[found]} and in {group.path}; ids must "
                        "be unique: rename one of the files, or import them apart"
                    )
                seen[found] = group.path
    return len(seen)


def list_source(
    spec: str, into: str, options: StorageOptions | None = None, *, run: Run = in_process
) -> Listing:
    """List the latents ``spec`` names (a local path or an fsspec URL read with
    ``options``; see :mod:`latentbatch.sources.latents`) by tasks that ``run`` runs,
    the blocks of its groups of members written into the folder ``into``."""
    url, _, name = spec.partition("::")
    place = Place(url, options)
    fs, path = place.fs, place.path
    if not fs.exists(path):
        raise DataError(f"{spec} does not exist; --from names a folder, file or Zarr store")
    refuse_pickles(path)
    opts = dict(options or {})

    def job(kind: Kind | None, file: str, index: int = 0) -> GroupJob:
        return GroupJob(kind=kind, url=file, index=index, into=into, options=opts, name=name)

    kind: Kind
    if any(fs.isfile(join(path, n)) for n in ("zarr.json", ".zarray", ".zgroup")):
        kind, files = "zarr", [place.url]
    elif fs.isdir(path):
        surveyed = run(survey, [job(None, place.url)])[0]
        kind, files = surveyed.kind, list(surveyed.files)
        if surveyed.group is not None:
            return _listed(spec, kind, (surveyed.group,), into, opts, run)
    else:
        kind = _kind_of_file(spec, PurePosixPath(path).suffix.lower())
        files = [place.url]
    groups = tuple(run(list_group, [job(kind, f, i) for i, f in enumerate(files)]))
    return _listed(spec, kind, groups, into, opts, run)


def _kind_of_file(spec: str, suffix: str) -> Kind:
    kinds: dict[str, Kind] = {
        ".zip": "npy-zip", ".npy": "array", ".npz": "array", ".safetensors": "safetensors",
        ".tar": "webdataset",
    }  # fmt: skip
    if suffix not in kinds:
        raise DataError(
            f"{spec} is not a layout import reads (.npy, .npz, .zip of .npy, .safetensors, "
            "WebDataset .tar, a Zarr store, or a folder of those)"
        )
    return kinds[suffix]


def _listed(
    spec: str,
    kind: Kind,
    groups: tuple[Group, ...],
    into: str,
    options: dict[str, Any],
    run: Run,
) -> Listing:
    """The listing of ``groups``, once no id repeats across them."""
    listed = [g for g in groups if not g.by_range]
    if len(listed) > 1:
        run(check_ids, [IdCheck(groups=tuple(listed), options=options)])
    return Listing(
        spec=spec, kind=kind, groups=groups, shape=groups[0].shape, dtype=groups[0].dtype,
        into=into, options=options,
    )  # fmt: skip
