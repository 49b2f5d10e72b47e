"""One writer per output and per store: a lease object created atomically.

::

    OUT/.latentbatch-lease-000003.json     {"what": "decode of s.zarr", "host": ...,
    STORE/.latentbatch-lease-000000.json    "pid": ..., "token": ..., "heartbeat": ...,
                                            "timeout": ..., "boot": ..., "pidns": ...}

A writer takes the lease before it writes anything and gives it back when it ends: the
lease is an object created only if it does not exist (``O_CREAT | O_EXCL`` on a local
disk, a PUT with ``If-None-Match: *`` on S3), so of two writers starting at once exactly
one creates it, and the other is refused in a sentence naming the holder. While it runs
the holder renews the heartbeat every :data:`RENEW_EVERY` of the timeout. A lease whose
heartbeat (the lease object's modification time on the storage, local mtime or S3's
``LastModified``: the holder's own clock never counts) is older than the timeout
(``$LATENTBATCH_LEASE_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT`) was left by a
writer that died or stalled (a killed client must not block the output forever): the next
writer takes it over, with a warning, by creating the next generation's object (created
exclusively too, so of two takers one wins) and writing in the stale one's place who took
it over (the holder's own timeout, recorded in its lease, is the one that counts). A
crashed holder is taken over at once, with a warning, when it is provably gone: its lease
records this machine's boot id and this PID namespace, and no process has its pid (a
client killed by SIGKILL or the OOM killer is re-run at once; another container that
shares the hostname but not the PID namespace is never judged by pids). A
holder whose lease was taken over (it stalled past the timeout) finds a newer generation
at its next renewal and stops in a sentence naming who took over (:meth:`Lease.check`);
its tasks carry a :class:`Fence` (the generation and token) and check it right before
any write of theirs becomes visible, so what they finish late is never kept. Lease
objects are found by listing their prefix alone on S3 (a request, however many shards
the folder holds).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentbatch.errors import LatentbatchError
from latentbatch.storage.fs import (
    StorageOptions,
    WriteError,
    check_folder,
    checked_commits,
    filesystem,
    is_remote,
    join,
    json_bytes,
    write_bytes,
    write_failed,
)

PREFIX = ".latentbatch-lease-"
_NAME = re.compile(r"^\.latentbatch-lease-(\d{6})\.json$")
TIMEOUT_ENV = "LATENTBATCH_LEASE_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
RENEW_EVERY = 0.25  # of the timeout
logger = logging.getLogger(__name__)


class LeaseHeldError(LatentbatchError):
    """Another writer holds the lease of an output or a store."""


class LeaseLostError(LatentbatchError):
    """This writer's lease was taken over while it ran (it stalled past the timeout)."""


def lease_timeout() -> float:
    """Seconds after its last heartbeat that a lease counts as abandoned."""
    configured = os.environ.get(TIMEOUT_ENV)
    try:
        return float(configured) if configured else DEFAULT_TIMEOUT
    except ValueError:
        raise LatentbatchError(
            f"${TIMEOUT_ENV}={configured!r} is not a number of seconds"
        ) from None


def is_lease(name: str) -> bool:
    """Whether a file name (not a path) is a lease object's."""
    return _NAME.match(name) is not None


BOOKKEEPING = ".latentbatch-"
"""What latentbatch keeps in a folder it is making, besides what it makes: its lease
objects, and an import's listing (``.latentbatch-listing-*``)."""


def without_leases(paths: list[str]) -> list[str]:
    """``paths`` less latentbatch's bookkeeping (a folder being created holds its lease,
    and an import's listing)."""
    return [p for p in paths if not p.rstrip("/").rsplit("/", 1)[-1].startswith(BOOKKEEPING)]


def holds_data(url: str, options: StorageOptions | None = None) -> bool:
    """Whether ``url`` holds anything but latentbatch's bookkeeping: a store or output
    to open, rather than a folder a writer has only begun (its lease, say)."""
    fs, path = filesystem(url, options)
    if not fs.exists(path):
        return False
    return not fs.isdir(path) or bool(without_leases(fs.ls(path, detail=False)))


def _name(generation: int) -> str:
    return f"{PREFIX}{generation:06d}.json"


_RACED = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _create(url: str, data: bytes, options: StorageOptions | None) -> bool:
    """Create the object at ``url`` holding ``data`` if none exists; whether it did.
    A local folder is made for it when missing."""
    if is_remote(url):
        fs, path = filesystem(url, options)
        try:
            fs.pipe_file(path, data, mode="create")
        except (FileExistsError, OSError) as exc:
            said = str(exc)
            # 412 (PreconditionFailed) and 409 (ConditionalRequestConflict): another writer
            # created it first, or is creating it now
            if isinstance(exc, FileExistsError) or any(code in said for code in _RACED):
                return False
            if isinstance(exc, PermissionError) or "AccessDenied" in said or "403" in said:
                raise LatentbatchError(
                    f"{url} cannot be created: the object store refuses it ({said}); the "
                    "lease needs PUT with If-None-Match: * (S3 has it since 2024, MinIO "
                    "too) and write access to the bucket"
                ) from exc
            raise
        return True
    local = Path(url.removeprefix("file://"))
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:  # a full disk, say: leave no empty lease behind
        local.unlink(missing_ok=True)
        raise write_failed(str(local), exc) from exc
    return True


@dataclass(frozen=True, kw_only=True)
class Holder:
    """What a lease object says: who holds it, and when they last said they were alive."""

    generation: int
    what: str
    host: str
    pid: int
    token: str
    heartbeat: float
    timeout: float  # the holder's: it renews the heartbeat well within this
    boot: str = ""  # the holder's machine's boot id, and its PID namespace: where its
    pidns: str = ""  # pid means a process (empty: not recorded, or not Linux)

    @property
    def stale(self) -> bool:
        return time.time() - self.heartbeat > self.timeout

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"{self.what} by process {self.pid} on {self.host} (heartbeat {age:.0f} s ago)"


def _lease_names(fs: Any, path: str) -> list[str]:
    """The names of the lease objects in the folder ``path``: on S3 one listing of their
    prefix (a request, however many shards the folder holds), elsewhere the folder's."""
    if "s3" in fs.protocol:
        found = fs.find(path, maxdepth=1, prefix=PREFIX)
    else:
        found = fs.ls(path, detail=False)
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in found)
    return [name for name in names if _NAME.match(name)]


TAKEN = "taken_over_by"
"""The key of what a taken-over lease object becomes: who took it over (for the writer
that stalled, which reads it when it wakes), until the next writer's acquire removes it."""


def _taken_by(fs: Any, path: str, generation: int) -> str | None:
    """Who took over the lease of ``generation``, as its object now says (None: it does
    not say, or is gone)."""
    try:
        meta = json.loads(fs.cat_file(join(path, _name(generation))))
    except (FileNotFoundError, ValueError):
        return None
    return str(meta[TAKEN]) if isinstance(meta, dict) and TAKEN in meta else None


def _holder(fs: Any, path: str, generation: int, aged: bool = True) -> Holder | None:
    """The lease object of ``generation`` in ``path`` (None when it is not there, or
    says who took it over); ``aged``: its heartbeat read from the storage (a request
    more), else now."""
    where = join(path, _name(generation))
    try:
        meta = json.loads(fs.cat_file(where))
        if isinstance(meta, dict) and TAKEN in meta:
            return None
        return Holder(
            generation=generation,
            what=str(meta["what"]),
            host=str(meta["host"]),
            pid=int(meta["pid"]),
            token=str(meta["token"]),
            # when the storage last saw it renewed: the holder's clock does not count
            heartbeat=_modified(fs, where) if aged else time.time(),
            timeout=float(meta.get("timeout", DEFAULT_TIMEOUT)),
            boot=str(meta.get("boot", "")),
            pidns=str(meta.get("pidns", "")),
        )
    except FileNotFoundError:
        return None  # given back or taken over
    except (ValueError, KeyError, TypeError):  # being written, or left empty: its age
        return Holder(  # is its object's, so it expires like any other
            generation=generation, what="a write", host="?", pid=0, token="?",
            heartbeat=_modified(fs, where), timeout=DEFAULT_TIMEOUT,
        )  # fmt: skip


def _generations(fs: Any, path: str) -> list[int]:
    """The generations of the lease objects in ``path``, newest first."""
    try:
        names = _lease_names(fs, path)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)) for n in names if (m := _NAME.match(n))), reverse=True)


def _holders(root: str, options: StorageOptions | None) -> list[Holder]:
    """The live lease objects under ``root``, newest generation first."""
    fs, path = filesystem(root, options)
    return [h for g in _generations(fs, path) if (h := _holder(fs, path, g)) is not None]


@dataclass(frozen=True, kw_only=True)
class Fence:
    """What a writer's tasks carry: its lease's folder, generation and token. Before a
    task's write becomes visible, :meth:`check` makes sure that lease is still the
    current one, in two small reads (its own object, and the next generation's absence),
    so the late tasks of a writer that stalled past its timeout keep nothing."""

    root: str
    options: dict[str, Any]
    generation: int
    token: str

    def check(self) -> None:
        """Raise :class:`LeaseLostError`, naming the new holder, when the lease was taken
        over."""
        fs, path = filesystem(self.root, self.options)
        newer = _holder(fs, path, self.generation + 1, aged=False)
        if newer is None:
            own = _holder(fs, path, self.generation, aged=False)
            if own is not None and own.token == self.token:
                return
        who = _taken_by(fs, path, self.generation) or (
            newer.describe() if newer is not None else "another writer (its lease is gone)"
        )
        raise LeaseLostError(
            f"{self.root} was taken over by {who} while this writer stalled; this task's "
            "work was not kept. Run it again when the other writer is done"
        )


_ACTIVE: set[str] = set()  # tokens of the leases this process holds now


def _ours_abandoned(holder: Holder) -> bool:
    """Whether ``holder`` is a lease of this very process that it no longer holds (its
    release failed, say, while the object store was away): a retry takes it at once."""
    return (
        holder.pid == os.getpid()
        and holder.host == socket.gethostname()
        and holder.token not in _ACTIVE
    )


def boot_id() -> str:
    """This machine's boot id (empty where there is none to read)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``; empty where none is known)."""
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return ""


def _crashed(holder: Holder) -> bool:
    """Whether ``holder``'s process is provably gone: it ran on this machine since its
    last boot, in this PID namespace, and no process has its pid now. Anything else (an
    unrecorded namespace, another container with the same hostname) is left to the
    timeout."""
    if not holder.boot or not holder.pidns or holder.pid <= 0:
        return False
    if (holder.host, holder.boot, holder.pidns) != (
        socket.gethostname(),
        boot_id(),
        pid_namespace(),
    ):
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _modified(fs: Any, path: str) -> float:
    """When the object at ``path`` was last written (now, when that cannot be told)."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return time.time()
    stamp = info.get("mtime", info.get("LastModified"))
    if hasattr(stamp, "timestamp"):
        return float(stamp.timestamp())
    return float(stamp) if isinstance(stamp, int | float) else time.time()


class Lease:
    """A held lease on ``root``; renewed by a thread until :meth:`release`."""

    def __init__(
        self, root: str, options: StorageOptions | None, what: str, timeout: float
    ) -> None:
        self.root = root
        self.options = dict(options or {})
        self.what = what
        self.timeout = timeout
        self.token = uuid.uuid4().hex
        self.generation = -1
        self.took_over: Holder | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        local = not is_remote(root)
        self._made_folder = local and not Path(root.removeprefix("file://")).exists()

    def _payload(self) -> bytes:
        return json_bytes(
            {
                "what": self.what,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "heartbeat": time.time(),
                "timeout": self.timeout,
                "boot": boot_id(),
                "pidns": pid_namespace(),
            }
        )

    @property
    def url(self) -> str:
        return join(self.root, _name(self.generation))

    def acquire(self) -> None:
        """Create the lease, taking over an abandoned one; refuse a live one. A path that
        cannot be a folder (a file, under a file, not writable) is refused first, in a
        sentence naming it, and so is one whose lease cannot be created."""
        check_folder(self.root)
        _ACTIVE.add(self.token)  # before the object exists: never "abandoned" by us
        try:
            self._acquire()
        except OSError as exc:
            _ACTIVE.discard(self.token)
            raise WriteError(
                f"{self.root} cannot be written ({exc.strerror or exc}); choose a folder "
                "you can write to"
            ) from exc
        except BaseException:
            _ACTIVE.discard(self.token)
            raise

    def _acquire(self) -> None:
        fs, path = filesystem(self.root, self.options)
        for _ in range(8):  # each pass loses only to another writer's creation
            generations = _generations(fs, path)
            holders = [h for g in generations if (h := _holder(fs, path, g)) is not None]
            current = holders[0] if holders else None
            crashed = current is not None and _crashed(current)
            if (
                current is not None
                and not current.stale
                and not _ours_abandoned(current)
                and not crashed
            ):
                raise LeaseHeldError(
                    f"{self.root} is being written by another {current.describe()}; wait "
                    f"for it to finish, or if that process is gone, run again once its "
                    f"heartbeat is {current.timeout:.0f} s old (its ${TIMEOUT_ENV})"
                )
            self.generation = generations[0] + 1 if generations else 0
            if _create(self.url, self._payload(), self.options):
                if current is not None:
                    self.took_over = current
                    logger.warning(
                        "took over the lease of %s from %s %s",
                        self.root,
                        "a crashed (its process is gone)" if crashed else "an abandoned",
                        current.describe(),
                    )
                # a stalled writer (not a crashed one, nor an empty object) reads, when it
                # wakes, who took over in what was its lease
                stalled = current is not None and current.pid > 0 and not crashed
                if current is not None and stalled:
                    me = f"{self.what} by process {os.getpid()} on {socket.gethostname()}"
                    tombstone = join(self.root, _name(current.generation))
                    write_bytes(tombstone, json_bytes({TAKEN: me}), self.options)
                for older in generations:  # earlier tombstones and abandoned objects
                    if current is None or not stalled or older != current.generation:
                        self._remove(join(self.root, _name(older)))
                break
        else:
            raise LeaseHeldError(f"{self.root}: other writers keep taking its lease; run again")
        self._thread = threading.Thread(target=self._renew, name="latentbatch-lease", daemon=True)
        self._thread.start()

    def _remove(self, url: str) -> None:
        fs, path = filesystem(url, self.options)
        with suppress(FileNotFoundError):
            fs.rm_file(path)

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout * RENEW_EVERY) and self._renew_once():
            pass

    def _renew_once(self) -> bool:
        """Write a fresh heartbeat, unless the lease was taken over (then remember why,
        for :meth:`check`); whether it is still held."""
        holders = _holders(self.root, self.options)
        if not holders or holders[0].token != self.token:
            fs, path = filesystem(self.root, self.options)
            newer = _taken_by(fs, path, self.generation) or (
                holders[0].describe() if holders else "another writer (its lease is gone)"
            )
            self._lost = f"its lease on {self.root} was taken over by {newer}"
            return False
        try:  # atomic, and fenced: a taken-over generation is never written again
            with checked_commits(self.fence().check):
                write_bytes(self.url, self._payload(), self.options)
        except LeaseLostError:
            fs, path = filesystem(self.root, self.options)
            newer = _taken_by(fs, path, self.generation) or "another writer"
            self._lost = f"its lease on {self.root} was taken over by {newer}"
            return False
        except (OSError, LatentbatchError) as exc:  # a moment's outage: the next one tries
            logger.warning("lease of %s not renewed: %s", self.root, exc)
        return True

    def fence(self) -> Fence:
        """The :class:`Fence` this writer's tasks carry."""
        return Fence(
            root=self.root, options=self.options, generation=self.generation, token=self.token
        )

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when the lease was taken over (as the renewal
        last saw it: :meth:`fence` checks the storage itself)."""
        if self._lost is not None:
            raise LeaseLostError(
                f"this {self.what} stopped: {self._lost} after this process went "
                f"{self.timeout:.0f} s without a heartbeat; nothing more is recorded, run it "
                "again when the other writer is done"
            )

    def release(self) -> None:
        """Stop renewing and remove the lease's object: the lease, or, when it was taken
        over, what the taker left there to say who it is (read by now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _ACTIVE.discard(self.token)
        if self.generation >= 0:  # its object: the lease, or what the taker left in it
            try:
                self._remove(self.url)
            except Exception as exc:  # the store is away: the lease goes stale, taken over
                logger.warning("lease of %s not given back (%s); it expires", self.root, exc)
        if self._made_folder:  # made for the lease, left empty: nothing was written
            with suppress(OSError):
                Path(self.root.removeprefix("file://")).rmdir()


@contextmanager
def leased(
    root: str, what: str, options: StorageOptions | None = None, timeout: float | None = None
) -> Iterator[Lease]:
    """Hold the lease of ``root`` (an output folder or a store) while the block runs."""
    lease = Lease(root, options, what, lease_timeout() if timeout is None else timeout)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


def current_holder(root: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    """Who holds ``root``'s lease now (None when nobody does): for status reports."""
    holders = _holders(root, options)
    if not holders:
        return None
    holder = holders[0]
    return {"what": holder.what, "host": holder.host, "pid": holder.pid,
            "age_s": time.time() - holder.heartbeat}  # fmt: skip
