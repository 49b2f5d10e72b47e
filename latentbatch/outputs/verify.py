"""Check a finished output against its manifest (``latentbatch verify OUT``).

The shard table is streamed (:func:`latentbatch.outputs.manifest.iter_shards`), never held whole.
For each shard: it exists, its size is the recorded one, and (by default, ``full``) its
sha256 is the recorded one (a png folder's the digest of its sorted listing, as
recorded): two shards of the same image count and size are often the same size (tar
pads to 10,240-byte records), so sizes alone cannot tell another store's shard. Shards
must follow each other without a gap, and their images add up to the manifest's count.
A shard the table does not list (``shard-*`` beside the listed ones, or a chunk of a zarr
output's ``images.zarr`` past them) is named too. With a store, the output must be that
store's decode (its uuid) of all its committed rows, and each shard's ids must be the
store's ids of its rows, in order (tar members and png files read for their names; an
npz output, one ``samples.npz``, and a zarr output hold no ids). By
default that store is the one the manifest names, when it can be opened; otherwise the
verification says its ids were not checked.

Cost: every check reads the shard table and lists OUT once; hashing (the default) reads
every byte of the output once; the ids read every tar's headers and the store's ids.
``full=False`` (``--quick``) checks sizes alone, and says so. The shards' checks run in
this process, or, given a ``mapper`` (``verify --scheduler``/``--workers``), as a Dask
task each: a 50 GB output is then read by the workers, in parallel, not by the client,
which holds the table's paths and the problems found.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from latentbatch.errors import LatentbatchError, OutputError
from latentbatch.ids import short_id
from latentbatch.outputs.manifest import Manifest, ShardRecord, iter_shards, read_manifest
from latentbatch.outputs.shards import ZARR_NAME, folder_digest
from latentbatch.storage.fs import StorageOptions, filesystem, join
from latentbatch.stores.store import LatentStore, open_store

Kind = Literal["missing", "size", "sha256", "extra", "ids", "rows", "store", "unreadable"]
_BLOCK = 1 << 20


class VerifyError(LatentbatchError):
    """An output does not match its manifest (or its store)."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """What is wrong with one shard (``shard`` is its path under OUT)."""

    shard: str
    kind: Kind
    detail: str


@dataclass(frozen=True, kw_only=True)
class Verification:
    """What :func:`verify_output` found: the shards and images it checked, how deeply,
    and every problem (named by shard)."""

    out: str
    shards: int
    images: int
    full: bool
    store: str | None
    problems: tuple[Problem, ...]
    unchecked: str | None = None  # why the manifest's store's ids were not checked

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch verify --json``)."""
        return {**asdict(self), "ok": self.ok, "problems": [asdict(p) for p in self.problems]}


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _tar_names(fs: Any, path: str) -> list[str]:
    """The member names of a tar, read header by header."""
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        return [member.name for member in tar]


def _ids_of(fs: Any, path: str, fmt: str) -> list[str]:
    """A shard's ids in its order: tar members' keys (each once, in member order), or a
    png folder's file names, sorted."""
    if fmt == "tar":
        keys = [name.split(".", 1)[0] for name in _tar_names(fs, path)]
        return list(dict.fromkeys(keys))
    return sorted(name.rsplit("/", 1)[-1].removesuffix(".png") for name in fs.ls(path, False))


def _check_shard(
    fs: Any, root: str, record: ShardRecord, fmt: str, full: bool
) -> Iterator[Problem]:
    path = join(root, record.path)
    if not fs.exists(path):
        yield Problem(shard=record.path, kind="missing", detail="listed in the table, not there")
        return
    folder = fmt == "png"
    size = int(fs.du(path)) if folder else int(fs.size(path))
    if size != record.bytes:
        detail = f"{size:,} bytes, the table records {record.bytes:,} (truncated or replaced)"
        yield Problem(shard=record.path, kind="size", detail=detail)
        return
    if full:
        if folder:
            names = sorted(fs.ls(path, detail=False))
            files = [(n.rsplit("/", 1)[-1], fs.cat_file(n)) for n in names]
            actual = folder_digest(files)
        else:
            actual = _sha256(fs, path)
        if actual != record.sha256:
            detail = f"sha256 {short_id(actual)}..., the table records {short_id(record.sha256)}..."
            yield Problem(shard=record.path, kind="sha256", detail=detail)


def _check_ids(
    fs: Any, root: str, record: ShardRecord, manifest: Manifest, store: LatentStore
) -> Iterator[Problem]:
    try:
        found = _ids_of(fs, join(root, record.path), manifest.output_format)
    except (tarfile.TarError, OSError) as exc:
        yield Problem(shard=record.path, kind="unreadable", detail=str(exc))
        return
    if manifest.selection is not None:
        expected = store.read("ids", list(manifest.selection[record.start : record.stop])).tolist()
    else:
        expected = store.read_ids(record.start, record.stop)
    if manifest.output_format == "png":  # a folder's files come sorted by name
        expected = sorted(expected)
    if found != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b),
            min(len(found), len(expected)),
        )
        shown = found[first] if first < len(found) else "(nothing)"
        wanted = expected[first] if first < len(expected) else "(nothing)"
        detail = (
            f"{len(found)} ids, {len(expected)} expected for rows [{record.start}, "
            f"{record.stop}) of the store; first difference: {shown!r} where {wanted!r}"
        )
        yield Problem(shard=record.path, kind="ids", detail=detail)


@dataclass(frozen=True, kw_only=True)
class ShardCheck:
    """One shard's checks, as a task: its size and sha256, and its ids against the store
    at ``store_url`` (None: not checked)."""

    out_url: str
    options: dict[str, Any]
    record: ShardRecord
    manifest: Manifest
    full: bool
    store_url: str | None
    store_count: int = 0  # its committed rows when the verification began


@functools.lru_cache(maxsize=4)
def _opened(url: str, options: str, count: int) -> LatentStore:
    """A store opened once per process and committed count (``options`` as JSON)."""
    return open_store(url, json.loads(options))


def check_shard(check: ShardCheck) -> list[Problem]:
    """The problems of one shard (see the module docstring): run here, or on a worker."""
    fs, root = filesystem(check.out_url, check.options)
    fmt = check.manifest.output_format
    found = list(_check_shard(fs, root, check.record, fmt, check.full))
    if check.store_url is not None and not found and fmt in ("tar", "png"):  # they hold ids
        options = json.dumps(check.options, sort_keys=True)
        store = _opened(check.store_url, options, check.store_count)
        found += _check_ids(fs, root, check.record, check.manifest, store)
    return found


Check = Callable[[ShardCheck], list[Problem]]
Mapper = Callable[[Check, Iterator[ShardCheck]], Iterable[list[Problem]]]
"""Runs :func:`check_shard` over the checks (the CLI's ``--scheduler``/``--workers``
pass one that runs them on a Dask cluster); the default runs them here, one by one."""


def _here(fn: Check, checks: Iterator[ShardCheck]) -> Iterator[list[Problem]]:
    return (fn(c) for c in checks)


def _listed_shards(fs: Any, root: str, fmt: str) -> set[str]:
    """The shard paths under OUT, as the table would name them."""
    if fmt == "zarr":
        base = join(root, ZARR_NAME, "c")
        if not fs.exists(base):
            return set()
        found = set()
        for path in fs.find(base):
            relative = path[len(root.rstrip("/")) :].strip("/")
            found.add(relative)
        return found
    return {
        path.rstrip("/").rsplit("/", 1)[-1]
        for path in fs.ls(root, detail=False)
        if path.rstrip("/").rsplit("/", 1)[-1].startswith("shard-")
    }


def verify_output(
    out_url: str,
    options: StorageOptions | None = None,
    *,
    store_url: str | None = None,
    full: bool = True,
    ids: bool = True,
    mapper: Mapper | None = None,
) -> Verification:
    """Check the output at ``out_url`` against its manifest (see the module docstring);
    every problem is collected, named by shard. Without ``store_url``, ``ids`` checks
    the ids against the store the manifest names, when it opens. ``mapper`` runs the
    shards' checks (default: here, one by one)."""
    manifest = read_manifest(out_url, options)
    if manifest is None:
        raise OutputError(
            f"{out_url} has no manifest.json: it is not a finished decode (run the decode "
            "again to finish it)"
        )
    fs, root = filesystem(out_url, options)
    unchecked = None
    if store_url is None and ids:
        try:
            store: LatentStore | None = open_store(manifest.store.url, options)
            store_url = manifest.store.url
        except (LatentbatchError, OSError) as exc:
            store, unchecked = None, f"its store {manifest.store.url} does not open ({exc})"
    else:
        store = open_store(store_url, options) if store_url is not None else None
    problems: list[Problem] = []
    if store is not None:
        if manifest.store.uuid != store.uuid:
            problems.append(
                Problem(
                    shard="manifest.json",
                    kind="store",
                    detail=f"the decode of another store ({manifest.store.url}), not of "
                    f"{store.url}",
                )
            )
            store = None  # its ids say nothing about this output
        elif manifest.selection is None and manifest.count != store.count:
            problems.append(
                Problem(
                    shard="manifest.json",
                    kind="store",
                    detail=f"{manifest.count} images, the store has {store.count} committed "
                    "rows (it grew since: decode again)",
                )
            )
    listed: set[str] = set()
    counted = {"images": 0, "shards": 0, "stop": 0}

    def checks() -> Iterator[ShardCheck]:  # drawn as the checks run: the table streams
        for record in iter_shards(out_url, options, manifest):
            counted["shards"] += 1
            counted["images"] += record.count
            listed.add(record.path)
            if record.start != counted["stop"]:
                detail = f"starts at row {record.start}; the shard before ends at {counted['stop']}"
                problems.append(Problem(shard=record.path, kind="rows", detail=detail))
            counted["stop"] = record.stop
            yield ShardCheck(
                out_url=out_url,
                options=dict(options or {}),
                record=record,
                manifest=manifest,
                full=full,
                store_url=store.url if store is not None else None,
                store_count=store.count if store is not None else 0,
            )

    try:
        for found in (mapper or _here)(check_shard, checks()):
            problems += found
    except OutputError as exc:
        problems.append(Problem(shard="shards.jsonl", kind="unreadable", detail=str(exc)))
    images, shards = counted["images"], counted["shards"]
    if images != manifest.count:
        detail = f"the shards hold {images} images, the manifest records {manifest.count}"
        problems.append(Problem(shard="shards.jsonl", kind="rows", detail=detail))
    for extra in sorted(_listed_shards(fs, root, manifest.output_format) - listed):
        problems.append(Problem(shard=extra, kind="extra", detail="not listed in the table"))
    problems.sort(key=lambda p: p.shard)  # by shard, however the checks were run
    return Verification(
        out=out_url,
        shards=shards,
        images=images,
        full=full,
        store=store_url,
        problems=tuple(problems),
        unchecked=unchecked,
    )
