"""Where bytes go: local paths and ``s3://`` URLs through fsspec, and the one atomic write.

S3 endpoint and keys come from the usual AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) or from storage
options (``--storage-option endpoint_url=http://127.0.0.1:9000``), passed to s3fs.

Every file latentbatch writes whole (weights, configs, pictures, shards, records,
manifests) goes through :func:`write_bytes`: on a local disk a temporary file beside the
target (``.NAME.*.tmp``), flushed, fsynced and renamed into place; on an object store one
PUT of the whole object. A reader sees the old content or the new, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec import AbstractFileSystem

from latentbatch.errors import ConfigError, LatentbatchError

StorageOptions = Mapping[str, Any]
TEMPORARY_SUFFIX = ".tmp"


def is_remote(url: str | Path) -> bool:
    """Whether ``url`` names an object store (anything with a scheme but ``file://``)."""
    text = str(url)
    return "://" in text and not text.startswith("file://")


def parse_options(pairs: Iterable[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` → dict; ``true``/``false`` and integers are converted."""
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"storage option {pair!r} is not KEY=VALUE")
        lowered = value.lower()
        options[key] = (
            lowered == "true"
            if lowered in ("true", "false")
            else int(value)
            if value.isdigit()
            else value
        )
    return options


def _s3_defaults(options: StorageOptions) -> dict[str, Any]:
    merged = dict(options)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint and "endpoint_url" not in merged and "client_kwargs" not in merged:
        merged["endpoint_url"] = endpoint
    return merged


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it."""
    merged = dict(options or {})
    if url.startswith("s3://"):
        merged = _s3_defaults(merged)
    fs, path = fsspec.core.url_to_fs(url, **merged)
    return fs, str(path)


def zarr_options(url: str, options: StorageOptions | None) -> dict[str, Any] | None:
    """Storage options to hand to zarr for ``url`` (None for local paths)."""
    if not is_remote(url):
        return None
    return _s3_defaults(options or {}) if url.startswith("s3://") else dict(options or {})


def join(url: str, *names: str) -> str:
    """Join names onto a path or URL with ``/``."""
    return "/".join([url.rstrip("/"), *names])


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is a leftover of an interrupted :func:`write_bytes`
    or :func:`write_folder`."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


class WriteError(LatentbatchError):
    """Bytes could not be written to a local disk (full, out of quota, read-only, failing):
    the write stopped and nothing half-written was kept or recorded."""


def check_folder(url: str) -> None:
    """Refuse, in a sentence naming it, a local path that cannot be (or become) a folder
    a writer writes into: an existing file, a path under a file, or one whose nearest
    existing folder cannot be written. Object stores have no such mistakes to check."""
    if is_remote(url):
        return
    path = Path(url.removeprefix("file://")).absolute()
    if path.exists() and not path.is_dir():
        raise WriteError(f"{path} is a file, not a folder; choose another path")
    for parent in (path, *path.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise WriteError(f"{path} lies under {parent}, which is a file; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
            why = "is on a read-only file system" if read_only else "is not writable by this user"
            raise WriteError(
                f"{path} cannot be written: {parent} {why}; choose a folder you can write to"
            )
        return


def write_failed(what: str, exc: OSError) -> WriteError:
    """The sentence for a failed local write: what, why, and that a re-run finishes it."""
    reason = exc.strerror or str(exc)
    return WriteError(
        f"{what} could not be written: {reason}; nothing half-written was kept. Free space "
        "(or fix the disk) and run the same command again: it keeps what is finished"
    )


_COMMIT_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("commit_check", default=None)
_WRITER: ContextVar[str] = ContextVar("writer", default="")
WRITER_MARK = 12
"""Hex digits of a writer's token that its temporaries carry in their names."""


@contextmanager
def checked_commits(check: Callable[[], None], writer: str = "") -> Iterator[None]:
    """Run ``check`` right before each write of this block becomes visible (the rename of
    a temporary file or folder into place, an object's PUT): a writer's fence, which
    raises when its lease was taken over, so that a stalled writer's late work is never
    kept (:class:`latentbatch.storage.lease.Fence`). The block's temporaries carry the
    ``writer`` token's first :data:`WRITER_MARK` digits in their names
    (:func:`temporary_of`), so a writer removes only its own."""
    check_token = _COMMIT_CHECK.set(check)
    writer_token = _WRITER.set(writer[:WRITER_MARK])
    try:
        yield
    finally:
        _WRITER.reset(writer_token)
        _COMMIT_CHECK.reset(check_token)


_MARKED = re.compile(rf"^\..+\.([0-9a-f]{{{WRITER_MARK}}})\.[^.]+\.tmp$")


def temporary_of(name: str) -> str | None:
    """The writer mark a temporary's name carries (None: none, an unfenced write's or an
    older release's)."""
    found = _MARKED.match(name)
    return found.group(1) if found else None


def before_commit() -> None:
    """The check of the enclosing :func:`checked_commits` block, if any."""
    check = _COMMIT_CHECK.get()
    if check is not None:
        check()


@contextmanager
def named_write(url: str | Path, what: str) -> Iterator[None]:
    """A write to ``url`` whose failure is one sentence naming ``what``
    (:func:`write_failed`). An object store's errors without an errno (a connection gone
    for a moment) pass on as they are: the flows retry them."""
    try:
        yield
    except OSError as exc:
        if is_remote(url) and exc.errno is None:
            raise
        raise write_failed(what, exc) from exc


def _write_local(path: Path, data: bytes) -> None:
    with named_write(path, str(path)):
        _write_file(path, data)


def _write_file(path: Path, data: bytes) -> None:
    """``data`` into a temporary file beside ``path``, fsynced, renamed onto it."""
    with _local_stream(path) as handle:
        handle.write(data)


@contextmanager
def _local_stream(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path`` to write, fsynced and renamed onto it at the end
    (removed when the write fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mark = _WRITER.get()
    prefix = f".{path.name}.{mark}." if mark else f".{path.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        before_commit()
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def streamed_write(
    url: str, options: StorageOptions | None = None, what: str = ""
) -> Iterator[BinaryIO]:
    """A file at a local path or object URL written as a stream and appearing whole or
    not at all: a local temporary renamed at the end, an object's multipart upload
    completed at the end (aborted when the write fails). Memory stays a block's,
    however large the file; a failure is a sentence naming ``what`` (default: ``url``)."""
    with named_write(url, what or url):
        if not is_remote(url):
            with _local_stream(Path(url.removeprefix("file://"))) as handle:
                yield handle
            return
        fs, path = filesystem(url, options)
        remote = fs.open(path, "wb")
        try:
            yield remote
        except BaseException:
            remote.discard()  # the upload is aborted: no part of it appears
            raise
        before_commit()
        remote.close()


def write_bytes(url: str | Path, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` to a local path or object URL atomically (see the module docstring)."""
    if is_remote(url):
        fs, path = filesystem(str(url), options)
        before_commit()
        fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
        return
    _write_local(Path(str(url).removeprefix("file://")), data)


def json_bytes(payload: Any, indent: int = 2) -> bytes:
    """``payload`` as key-sorted JSON with a final newline: the form of every JSON file
    latentbatch writes (so equal payloads give equal bytes)."""
    return (json.dumps(payload, indent=indent, sort_keys=True) + "\n").encode()


def write_json(
    url: str | Path, payload: Any, options: StorageOptions | None = None, indent: int = 2
) -> None:
    """Write ``payload`` as JSON (:func:`json_bytes`), atomically."""
    write_bytes(url, json_bytes(payload, indent), options)


def write_folder(
    url: str, files: Sequence[tuple[str, bytes]], options: StorageOptions | None = None
) -> None:
    """Write a folder of ``(name, data)`` files. Locally the folder is built under a
    temporary name and renamed into place, replacing an older one; on an object store
    each file is one PUT (there are no folders to rename)."""
    fs, final = filesystem(url, options)
    if is_remote(url):
        before_commit()
        for name, data in files:
            fs.pipe_file(join(final, name), data)
        return
    parent, _, base = final.rstrip("/").rpartition("/")
    mark = _WRITER.get()
    unique = f"{mark}.{uuid.uuid4().hex[:8]}" if mark else uuid.uuid4().hex
    tmp = join(parent, f".{base}.{unique}{TEMPORARY_SUFFIX}")
    try:
        fs.makedirs(tmp, exist_ok=True)
        for name, data in files:
            (Path(tmp) / name).write_bytes(data)  # the rename below makes it atomic
        before_commit()
        if fs.exists(final):
            fs.rm(final, recursive=True)
        fs.mv(tmp, final, recursive=True)
    except BaseException as exc:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        if isinstance(exc, OSError):
            raise write_failed(url, exc) from exc
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
