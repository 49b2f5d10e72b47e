"""Latent collections found elsewhere: the layouts ``latentbatch import`` reads, each
listed as pieces in row order (:func:`find`) and read a piece at a time
(:func:`read_piece`), with no torch.

``--from`` names the latents; its layout is recognised:

- a folder, or a ``.zip``, of one ``.npy`` per image (the edm2/REPA layout for DiT, SiT
  and REPA training): ids from the files' paths (``00000/img00000001.npy`` →
  ``00000__img00000001``), labels from an optional ``dataset.json``
  (``{"labels": [["00000/img00000001.npy", 207], ...]}``);
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
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentbatch.errors import DataError
from latentbatch.ids import slug, unique
from latentbatch.models.checkpoint import safetensors_header

PICKLES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
Kind = Literal["npy-files", "npy-zip", "array", "safetensors", "webdataset", "zarr"]


@dataclass(frozen=True, kw_only=True)
class Piece:
    """One input: a file (or a zip member, or a Zarr chunk of rows) holding ``rows`` rows
    from row ``first`` of its file or array."""

    kind: Kind
    path: str
    member: str = ""
    first: int = 0
    rows: int = 1


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


def _npy_zip(path: Path) -> Found:
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".npy"))
        if not names:
            raise DataError(f"{path} holds no .npy files")
        with archive.open(names[0]) as handle:
            shape, dtype = _npy_header(io.BytesIO(handle.read(4096)))
        text = (
            archive.read("dataset.json").decode() if "dataset.json" in archive.namelist() else None
        )
    pieces = tuple(Piece(kind="npy-zip", path=str(path), member=n) for n in names)
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
        member, labels = "", None
    else:
        with np.load(path) as archive:
            four = [k for k in archive.files if archive[k].ndim == 4]
            member = (
                "latents" if "latents" in archive.files else (four[0] if len(four) == 1 else "")
            )
            if not member:
                raise DataError(
                    f"{path} holds {len(four)} 4-D arrays ({', '.join(four) or 'none'}); name "
                    "the latents 'latents'"
                )
            array = archive[member]
            labels = archive["labels"].astype(np.int32) if "labels" in archive.files else None
    if array.ndim != 4:
        raise DataError(
            f"{path} holds an array of shape {array.shape}; import (N, C, h, w) latents"
        )
    return Found(
        spec=str(path), kind="array",
        pieces=_rows_of("array", str(path), member, len(array), 1024),
        ids=_named_ids(path.stem, len(array)), labels=labels, shape=tuple(array.shape[1:]),
        dtype=str(array.dtype),
    )  # fmt: skip


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


def _tar_listing(path: Path) -> tuple[list[str], tuple[int, ...], str]:
    """A WebDataset tar's sample keys with an ``.npy`` member, in order, and the first
    one's shape and dtype (from its header), in one pass over the tar."""
    keys: list[str] = []
    shape: tuple[int, ...] = ()
    dtype = ""
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".npy"):
                keys.append(member.name[: -len(".npy")])
                if not shape:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    shape, dtype = _npy_header(io.BytesIO(handle.read(4096)))
    return keys, shape, dtype


def _webdataset(files: list[Path]) -> Found:
    pieces: list[Piece] = []
    ids: list[str] = []
    shape: tuple[int, ...] = ()
    dtype = ""
    for path in files:
        keys, first_shape, first_dtype = _tar_listing(path)
        pieces.append(Piece(kind="webdataset", path=str(path), rows=len(keys)))
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
        if tars := [p for p in files if p.suffix == ".tar"]:
            return _webdataset(tars)
        if tensors := [p for p in files if p.suffix == ".safetensors"]:
            return _safetensors(tensors)
        raise DataError(f"{spec} holds no .npy, .tar or .safetensors files and is not a Zarr store")
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


def _read_npy(handle: Any) -> np.ndarray:
    return np.asarray(np.load(io.BytesIO(handle.read()), allow_pickle=False))


def _read_safetensors(
    path: str, key: str, first: int, rows: int
) -> tuple[np.ndarray, np.ndarray | None]:
    import torch
    from safetensors import safe_open

    labels = None
    with safe_open(path, framework="pt") as handle:
        found = handle.get_slice(key)
        if len(found.get_shape()) == 3:  # one row, named by its id
            block = handle.get_tensor(key)[None]
        else:
            block = found[first : first + rows]
            for name in ("labels", "label", "y"):
                if name in handle.keys():  # noqa: SIM118
                    labels = handle.get_slice(name)[first : first + rows].numpy()
                    break
    if block.dtype == torch.bfloat16:  # numpy has no bfloat16: float32 holds it exactly
        block = block.float()
    return block.numpy(), labels


def read_piece(piece: Piece) -> tuple[np.ndarray, np.ndarray | None]:
    """A piece's rows ``(n, C', h, w)`` as stored there, and their labels when it has
    them."""
    if piece.kind == "npy-files":
        return np.load(piece.path, allow_pickle=False)[None], None
    if piece.kind == "npy-zip":
        with zipfile.ZipFile(piece.path) as archive, archive.open(piece.member) as handle:
            return _read_npy(handle)[None], None
    if piece.kind == "array":
        rows = slice(piece.first, piece.first + piece.rows)
        if piece.member:  # an .npz (its labels are known to the client)
            with np.load(piece.path) as archive:
                return archive[piece.member][rows], None
        return np.asarray(np.load(piece.path, mmap_mode="r")[rows]), None
    if piece.kind == "safetensors":
        return _read_safetensors(piece.path, piece.member, piece.first, piece.rows)
    if piece.kind == "webdataset":
        return _read_tar(piece.path)
    import zarr

    opened: Any = zarr.open(piece.path, mode="r")
    array = opened[piece.member] if piece.member else opened
    return np.asarray(array[piece.first : piece.first + piece.rows]), None


def _read_tar(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A WebDataset tar's ``.npy`` members in order, and their ``.cls`` labels (-1)."""
    latents, labels = [], []
    with tarfile.open(path) as archive:
        members = {m.name: m for m in archive if m.isfile()}
        for name in [n for n in members if n.endswith(".npy")]:
            handle = archive.extractfile(members[name])
            assert handle is not None
            latents.append(_read_npy(handle))
            label = members.get(name[: -len(".npy")] + ".cls")
            cls = archive.extractfile(label) if label is not None else None
            labels.append(int(cls.read().decode().strip()) if cls is not None else -1)
    return np.stack(latents), np.array(labels, np.int32)


def segments(pieces: tuple[Piece, ...], start: int, stop: int) -> Iterator[tuple[Piece, int, int]]:
    """The pieces holding rows ``[start, stop)``, each with its wanted rows."""
    row = 0
    for piece in pieces:
        end = row + piece.rows
        if end > start and row < stop:
            yield piece, max(start, row) - row, min(stop, end) - row
        if end >= stop:
            return
        row = end
