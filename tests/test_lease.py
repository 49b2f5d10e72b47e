"""One writer per output and per store: leases, locally, in memory and on moto's S3, and
between real processes (two decodes, two first encodes, a killed client)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import s3fs
from distributed import Client

from latentbatch.encode import encode
from latentbatch.outputs.verify import verify_output
from latentbatch.storage.lease import (
    TIMEOUT_ENV,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    current_holder,
    is_lease,
    leased,
)
from latentbatch.stores.store import Layout, open_store
from tests.helpers import sha256s
from tests.servers import moto_server

CLI = str(Path(sys.executable).with_name("latentbatch"))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with leased(out, "decode of a.zarr") as lease:
        assert is_lease(Path(lease.url).name) and Path(lease.url).is_file()
        with pytest.raises(LeaseHeldError, match=r"out is being written by another decode of "
                           rf"a\.zarr by process {os.getpid()} on "):  # fmt: skip
            Lease(out, None, "decode of b.zarr", 60).acquire()
        holder = current_holder(out)
        assert holder is not None and holder["what"] == "decode of a.zarr"
    assert current_holder(out) is None
    assert not Path(out).exists()  # made for the lease and left empty: removed


def test_an_abandoned_lease_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = str(tmp_path / "out")
    dead = Lease(out, None, "decode of a.zarr", timeout=0.5)
    dead.acquire()
    dead._stop.set()  # the process "dies": no more heartbeats, the object stays
    with pytest.raises(LeaseHeldError):
        Lease(out, None, "decode of b.zarr", 60).acquire()
    time.sleep(0.8)
    with caplog.at_level(logging.WARNING, logger="latentbatch.storage.lease"):
        taker = Lease(out, None, "decode of b.zarr", 60)
        taker.acquire()
    assert "took over the lease" in caplog.text and "decode of a.zarr" in caplog.text
    assert taker.generation == 1 and taker.took_over is not None
    # the taken-over object now says who took it over, for its writer if it wakes
    names = sorted(p.name for p in Path(out).iterdir())
    assert names == [".latentbatch-lease-000000.json", ".latentbatch-lease-000001.json"]
    said = json.loads((Path(out) / names[0]).read_text())
    assert said["taken_over_by"].startswith(f"decode of b.zarr by process {os.getpid()}")
    assert current_holder(out) is not None and current_holder(out)["what"] == "decode of b.zarr"  # type: ignore[index]
    taker.release()
    later = Lease(out, None, "decode of c.zarr", 60)  # the next writer clears what is left
    later.acquire()
    assert [p.name for p in Path(out).iterdir()] == [".latentbatch-lease-000001.json"]
    later.release()


def test_an_empty_lease_left_by_a_full_disk_expires_by_its_age(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    empty = out / ".latentbatch-lease-000004.json"
    empty.write_bytes(b"")
    with pytest.raises(LeaseHeldError):  # as young as a lease being written
        Lease(str(out), None, "decode of b.zarr", 60).acquire()
    old = time.time() - 3600
    os.utime(empty, (old, old))
    lease = Lease(str(out), None, "decode of b.zarr", 60)
    lease.acquire()
    assert lease.generation == 5 and not empty.exists()
    lease.release()


def test_a_holder_whose_lease_was_taken_over_stops(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    slow = Lease(out, None, "decode of a.zarr", timeout=0.4)
    slow.acquire()
    slow._stop.set()  # stalled past its timeout
    slow._thread.join()  # type: ignore[union-attr]
    time.sleep(0.6)
    taker = Lease(out, None, "decode of b.zarr", 60)
    taker.acquire()
    slow._stop.clear()
    slow._renew_once()
    with pytest.raises(LeaseLostError, match=r"taken over by decode of b\.zarr"):
        slow.check()
    slow.release()  # leaves the new holder's lease alone
    assert current_holder(out) is not None
    taker.release()


def test_of_many_writers_starting_at_once_exactly_one_gets_it(tmp_path: Path) -> None:
    """Threads stand in for processes here; the real processes are below."""
    import threading

    out = str(tmp_path / "out")
    won: list[Lease] = []
    refused: list[str] = []
    start = threading.Barrier(8)

    def attempt(i: int) -> None:
        lease = Lease(out, None, f"decode {i}", 60)
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeldError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_leases_on_an_object_store(tmp_path: Path) -> None:
    (tmp_path / "moto").mkdir()
    with moto_server(tmp_path / "moto") as endpoint:
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(**options).mkdir("leases")
        out = "s3://leases/outputs/o"
        held = pytest.raises(LeaseHeldError, match="being written by another decode of a")
        with leased(out, "decode of a.zarr", options), held:
            Lease(out, options, "decode of b.zarr", 60).acquire()
        assert current_holder(out, options) is None
    memory = f"memory://leases/{uuid.uuid4().hex}"
    with leased(memory, "encode"), pytest.raises(LeaseHeldError):
        Lease(memory, None, "encode", 60).acquire()


# real processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stores(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client
) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("two")
    t, s = str(root / "t.zarr"), str(root / "s.zarr")
    encode(tiny_model, "synthetic:3000", t, layout=Layout(256, 64), client=client)
    encode(tiny_model, "digits", s, layout=Layout(256, 64), limit=1500, client=client)
    return t, s


def _decode(model: Path, store: str, out: Path) -> list[str]:
    return [CLI, "decode", "--model", str(model), "--store", store, "--out", str(out),
            "--images-per-shard", "256", "--workers", "1", "--no-progress"]  # fmt: skip


def _run_together(commands: list[list[str]], env: dict[str, str] | None = None) -> list[Any]:
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for c in commands
    ]
    return [(p.wait(timeout=300), *p.communicate()) for p in processes]


@pytest.mark.parametrize("same", [False, True], ids=["different stores", "same store"])
def test_two_decodes_into_one_output_at_once(
    two_stores: tuple[str, str], tiny_model: Path, tmp_path: Path, same: bool
) -> None:
    t, s = two_stores
    out = tmp_path / "o2"
    first, second = (s, s) if same else (t, s)
    results = _run_together([_decode(tiny_model, first, out), _decode(tiny_model, second, out)])
    assert sorted(code for code, _, _ in results) == [0, 1], results
    err = next(r[2] for r in results if r[0] == 1)
    assert err.startswith(f"error: {out} is being written by another decode of ")
    assert " by process " in err and len(err.strip().splitlines()) == 1
    store = (first, second)[next(i for i, r in enumerate(results) if r[0] == 0)]
    verified = subprocess.run(
        [CLI, "verify", str(out), "--store", store, "--full"], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.rstrip().endswith(": ok")


def test_two_first_encodes_of_one_store_at_once(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "new.zarr"
    command = [CLI, "encode", "--model", str(tiny_model), "--store", str(store),
               "--workers", "1", "--no-progress"]  # fmt: skip
    sources = ["synthetic:600", "synthetic:601"]  # equally quick to open: they overlap
    results = _run_together([[*command, "--data", source] for source in sources])
    assert sorted(code for code, _, _ in results) == [0, 1], results
    refused = next(r for r in results if r[0] == 1)
    assert refused[2].startswith(f"error: {store} is being written by another encode of ")
    opened = open_store(str(store))
    assert opened.count in (600, 601) and opened.pending is None
    assert not [p for p in store.iterdir() if is_lease(p.name)]


@pytest.mark.parametrize("fmt", ["tar", "npz"])
def test_a_killed_clients_lease_is_taken_over_at_once_on_the_same_machine(
    two_stores: tuple[str, str], tiny_model: Path, tmp_path: Path, fmt: str
) -> None:
    """SIGKILL of a decode's client (and its cluster) mid-run: its lease records this
    machine's boot id and PID namespace and its process is gone, so the re-run takes it
    at once, with a warning, writes only the missing shards (an npz output: its missing
    parts, then the one file), and ends byte-identical to an uninterrupted decode."""
    t, _ = two_stores
    out, whole = tmp_path / "out", tmp_path / "whole"
    command = lambda o: [*_decode(tiny_model, t, o), "--format", fmt]  # noqa: E731
    assert subprocess.run(command(whole), capture_output=True).returncode == 0
    env = {**os.environ, TIMEOUT_ENV: "600"}  # the timeout is not what lets the re-run in
    process = subprocess.Popen(
        command(out), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob(".records/*.json")):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the client and its local cluster
    process.wait()
    leases = [p for p in out.iterdir() if is_lease(p.name)]
    assert len(leases) == 1 and json.loads(leases[0].read_text())["pidns"].startswith("pid:")
    recorded = {p.stem for p in out.glob(".records/*.json")}  # finished: shard and record
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*") if p.stem in recorded}
    assert kept
    taken = subprocess.run(command(out), capture_output=True, text=True, env=env)
    assert taken.returncode == 0, taken.stderr
    assert "took over the lease" in taken.stderr and "crashed (its process is gone)" in taken.stderr
    assert f"{len(kept)} already done)" in taken.stdout + taken.stderr
    if fmt == "tar":
        assert all(out.joinpath(n).stat().st_mtime_ns == m for n, m in kept.items())
    shards = [name for name in sha256s(whole) if name.startswith(("shard-", "samples"))]
    assert {n: sha256s(out)[n] for n in shards} == {n: sha256s(whole)[n] for n in shards}
    assert verify_output(str(out), store_url=t).ok
    assert not [p for p in out.iterdir() if is_lease(p.name)]


@pytest.mark.parametrize("other", ["pidns", "boot", "unrecorded"])
def test_a_live_lease_of_another_namespace_is_never_judged_by_its_pid(
    tmp_path: Path, other: str
) -> None:
    """A lease of this hostname whose pid is no process here, but from another PID
    namespace (a container sharing the hostname), another boot, or one that recorded
    neither: its heartbeat is fresh, so it is refused, not taken."""
    from latentbatch.storage.lease import boot_id, pid_namespace

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    payload = {"what": "decode of x.zarr", "host": socket.gethostname(), "pid": int(dead),
               "token": "t", "heartbeat": time.time(), "timeout": 600,
               "boot": boot_id(), "pidns": pid_namespace()}  # fmt: skip
    payload |= {
        "pidns": {"pidns": "pid:[1]", "boot": pid_namespace(), "unrecorded": ""}[other],
        "boot": {"pidns": boot_id(), "boot": "another-boot", "unrecorded": ""}[other],
    }
    (out / ".latentbatch-lease-000000.json").write_text(json.dumps(payload))
    with pytest.raises(LeaseHeldError, match=r"being written by another decode of x\.zarr"):
        Lease(str(out), None, "decode of y.zarr", 60).acquire()


def test_a_stalled_writer_is_fenced_out_and_told_who_took_over(
    two_stores: tuple[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    """Leases of 3 s. A decode's client is stopped (SIGSTOP) mid-run for longer than
    that, while its worker process keeps the tasks it was given; a decode of another
    store into the same output takes the lease over and finishes. Woken (SIGCONT), the
    first exits non-zero in one sentence naming the new holder; its worker's late shards
    were refused at their commit, so the output verifies against the second store."""
    t, s = two_stores
    out = tmp_path / "out"
    env = {**os.environ, TIMEOUT_ENV: "3"}
    first = subprocess.Popen(
        _decode(tiny_model, t, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob(".records/*.json")):
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)  # the client (and its scheduler); not its worker
    try:
        time.sleep(4)  # past the 3 s timeout: its lease is stale
        second = subprocess.run(_decode(tiny_model, s, out), env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 0, second.stderr
    assert "took over the lease" in second.stderr
    code, _, err = first.wait(timeout=300), *first.communicate()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "taken over by" in lines[0] and f"decode of {Path(s).resolve()}" in lines[0], lines
    verified = subprocess.run(
        [CLI, "verify", str(out), "--store", s, "--full"], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert not [p for p in out.iterdir() if is_lease(p.name)]


def test_a_task_of_a_taken_over_writer_keeps_nothing(
    two_stores: tuple[str, str], tiny_model: Path, tmp_path: Path, client: Client
) -> None:
    """A decode task that carries the fence of a lease taken over since it was queued
    decodes, then refuses at its commit: no shard, no record, no temporary, and the error
    names the new holder."""
    from latentbatch.decode import DecodeJob, decode_shard
    from latentbatch.engine.workers import register_model
    from latentbatch.models.checkpoint import read_once
    from latentbatch.stores.store import open_store as opened

    t, _ = two_stores
    out = tmp_path / "out"
    stalled = Lease(str(out), None, "decode of t.zarr", timeout=0.3)
    stalled.acquire()
    stalled._stop.set()  # stalled past its timeout
    stalled._thread.join()  # type: ignore[union-attr]
    time.sleep(0.5)
    taker = Lease(str(out), None, "decode of s.zarr", 60)
    taker.acquire()
    model = read_once(tiny_model)
    register_model(client, model, "decoder")
    store = opened(t)
    job = DecodeJob(
        store_url=t, storage_options={}, store_uuid=store.uuid, model_id=model.info.model_id,
        index=0, start=0, stop=256, out_url=str(out), out_options={}, fmt="tar",
        identity={"store_uuid": store.uuid}, check_canary=False, fence=stalled.fence(),
    )  # fmt: skip
    with pytest.raises(LeaseLostError, match=r"taken over by decode of s\.zarr by process"):
        client.submit(decode_shard, job, pure=False).result()
    assert sorted(p.name for p in out.iterdir()) == [
        ".latentbatch-lease-000000.json", ".latentbatch-lease-000001.json",
    ]  # the leases alone: no shard, record or temporary  # fmt: skip
    taker.release()
    stalled.release()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (OSError("An error occurred (PreconditionFailed) (412)"), "other writers keep taking"),
        (OSError("An error occurred (ConditionalRequestConflict) (409)"), "other writers keep"),
        (PermissionError("An error occurred (AccessDenied) (403)"), "If-None-Match: \\* "),
    ],
    ids=["412", "409", "403"],
)
def test_an_object_stores_answers_to_a_conditional_put_are_told_apart(
    monkeypatch: pytest.MonkeyPatch, answer: OSError, said: str
) -> None:
    """412 and 409 mean another writer got there first (the acquire tries again, then
    says so); 403 says the store refuses conditional writes or this user's writes."""
    from fsspec.implementations.memory import MemoryFileSystem

    from latentbatch.errors import LatentbatchError

    def refuse(self: Any, path: str, value: bytes, mode: str = "overwrite", **_: Any) -> None:
        if mode == "create":
            raise answer
        raise AssertionError("only the lease's create is expected")

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", refuse)
    with pytest.raises(LatentbatchError, match=said):
        Lease(f"memory://leases/{uuid.uuid4().hex}", None, "decode", 60).acquire()


class _Zeros:
    """A derived store's part: ``rows`` zero latents of ``shape``."""

    def __init__(self, rows: int, shape: tuple[int, ...]) -> None:
        self.rows, self.shape = rows, shape

    def make(self) -> tuple[Any, list[str], list[int]]:
        import numpy as np

        return (
            np.zeros((self.rows, *self.shape), np.float32),
            [f"z{i}" for i in range(self.rows)],
            [-1] * self.rows,
        )


def test_a_store_writers_late_task_writes_nothing(
    two_stores: tuple[str, str], tmp_path: Path
) -> None:
    """The store writers' tasks (encode, import, the derived operations) check their
    fence before they write a shard: a task of a taken-over writer writes nothing."""
    import shutil

    from latentbatch.uses.derive import DeriveJob, write_part

    t, _ = two_stores
    store = Path(shutil.copytree(t, tmp_path / "t.zarr"))
    stalled = Lease(str(store), None, "generate into t.zarr", timeout=0.3)
    stalled.acquire()
    stalled._stop.set()
    stalled._thread.join()  # type: ignore[union-attr]
    time.sleep(0.5)
    taker = Lease(str(store), None, "generate into t.zarr", 60)
    taker.acquire()
    before = {k: v for k, v in sha256s(store).items() if not is_lease(Path(k).name)}
    shape = open_store(str(store)).latent_shape
    job = DeriveJob(store_url=str(store), storage_options={}, start=0, stop=256,
                    part=_Zeros(256, shape), fence=stalled.fence())  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(LeaseLostError, match=r"taken over by generate into t\.zarr"):
        write_part(job)
    after = {k: v for k, v in sha256s(store).items() if not is_lease(Path(k).name)}
    assert after == before
    taker.release()
    stalled.release()
