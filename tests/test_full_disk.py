"""A full disk loses nothing: a decode or encode that hits ENOSPC stops in one sentence
naming the shard, records nothing half-written, and the same command completes once
there is space again, with the bytes of an uninterrupted run. The disk "fills" by fault
injection at the one place each write goes through (our atomic file write, zarr's local
store), so what the engine does with the error is real."""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr.storage
from distributed import Client

from latentbatch.cli import main
from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.storage import fs
from latentbatch.storage.fs import WriteError
from latentbatch.stores.store import Layout, open_store
from tests.helpers import sha256s

FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("full") / "s.zarr")
    encode(tiny_model, "synthetic:80", url, layout=Layout(16, 8), client=client)
    return url


def _fills_at(name: str, original: Callable[[Path, bytes], None]) -> Callable[[Path, bytes], None]:
    """A ``_write_file`` whose disk fills half-way through the file called ``name``."""

    def write(path: Path, data: bytes) -> None:
        if path.name != name:
            original(path, data)
            return
        (path.parent / f".{name}.partial.tmp").write_bytes(data[: len(data) // 2])
        raise FULL

    return write


@pytest.mark.parametrize("fmt", ["tar", "png"])
def test_a_decode_that_fills_the_disk_stops_and_finishes_later(
    tmp_path: Path,
    store: str,
    tiny_model: Path,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    reference, out = tmp_path / "reference", tmp_path / "out"
    decode(tiny_model, store, str(reference), fmt=fmt, images_per_shard=16, client=client)  # type: ignore[arg-type]
    shard = "shard-000002.tar" if fmt == "tar" else "shard-000002"
    if fmt == "tar":
        monkeypatch.setattr(fs, "_write_file", _fills_at(shard, fs._write_file))
    else:  # a png folder's files are written one by one before the rename
        original = Path.write_bytes

        def write_bytes(self: Path, data: Any) -> int:
            if self.parent.name.startswith(f".{shard}.") and self.name.endswith("-0000033.png"):
                raise FULL
            return original(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(WriteError, match=rf"{shard}.* could not be written: No space left"):
        decode(tiny_model, store, str(out), fmt=fmt, images_per_shard=16, client=client)  # type: ignore[arg-type]
    records = {p.name for p in (out / ".records").glob("*.json")}
    assert "shard-000002.json" not in records  # nothing half-written is recorded
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()  # space freed
    argv = ["decode", "--model", str(tiny_model), "--store", store, "--out", str(out),
            "--format", fmt, "--images-per-shard", "16", "--scheduler",
            client.scheduler.address, "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    skipped = {f"shard-{i:06d}.json" for i in result["shards_skipped"]}
    assert 2 in result["shards_written"] and records <= skipped  # (in flight ones finished)
    assert sha256s(out) == sha256s(reference)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_the_cli_says_it_in_one_sentence(
    tmp_path: Path, store: str, tiny_model: Path, client: Client, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(fs, "_write_file", _fills_at("shard-000001.tar", fs._write_file))
    out = tmp_path / "out"
    argv = [
        "decode",
        "--model",
        str(tiny_model),
        "--store",
        store,
        "--out",
        str(out),
        "--images-per-shard",
        "16",
        "--scheduler",
        client.scheduler.address,
        "--no-progress",
    ]  # fmt: skip  (a bar drawn when a shard finished first is not the error)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'shard-000001.tar'} could not be written: No space")
    assert "run the same command again" in err and len(err.strip().splitlines()) == 1


def test_an_encode_that_fills_the_disk_stops_and_resumes(
    tmp_path: Path, tiny_model: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, url = str(tmp_path / "reference.zarr"), str(tmp_path / "s.zarr")
    encode(tiny_model, "synthetic:80", reference, layout=Layout(16, 8), client=client)
    original = zarr.storage.LocalStore.set

    async def set_(self: Any, key: str, value: Any) -> None:
        if key.startswith("latents/c/2/") and Path(str(self.root)).name == "s.zarr":
            raise FULL
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    with pytest.raises(WriteError, match=rf"rows \[32, 48\) of {url} could not be written"):
        encode(tiny_model, "synthetic:80", url, layout=Layout(16, 8), client=client)
    opened = open_store(url)
    assert opened.count <= 32 and opened.pending is not None  # shard 2 not committed
    monkeypatch.undo()
    result = encode(tiny_model, "synthetic:80", url, layout=Layout(16, 8), client=client)
    assert result.resumed
    done, expected = open_store(url), open_store(reference)
    assert done.count == 80 and done.pending is None
    np.testing.assert_array_equal(done.read_latents(0, 80), expected.read_latents(0, 80))
    assert done.read_ids(0, 80) == expected.read_ids(0, 80)


def _fills_zarr(store_name: str, prefix: str) -> Callable[..., Any]:
    """A ``LocalStore.set`` whose disk is full for the keys of ``store_name`` that start
    with ``prefix``."""
    original = zarr.storage.LocalStore.set

    async def set_(self: Any, key: str, value: Any) -> None:
        if key.startswith(prefix) and Path(str(self.root)).name == store_name:
            raise FULL
        await original(self, key, value)

    return set_


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("full-digits") / "digits.zarr")
    encode(tiny_model, "digits", url, layout=Layout(16, 8), limit=160, client=client)
    return url


def test_a_generate_that_fills_the_disk_stops_and_resumes(
    tmp_path: Path, digits: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from latentbatch.uses.generation import generate

    reference, url = str(tmp_path / "reference.zarr"), str(tmp_path / "g.zarr")
    generate(digits, reference, count=20, labels=[1, 2], seed=3, client=client)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", _fills_zarr("g.zarr", "latents/c/2/"))
    with pytest.raises(WriteError, match=rf"rows \[32, 40\) of {url} could not be written"):
        generate(digits, url, count=20, labels=[1, 2], seed=3, client=client)
    stopped = open_store(url)
    assert stopped.count <= 32 and stopped.pending is not None  # never read as done
    monkeypatch.undo()
    result = generate(digits, url, count=20, labels=[1, 2], seed=3, client=client)
    assert result.resumed
    done, expected = open_store(url), open_store(reference)
    assert done.count == 40 and done.pending is None
    assert done.read_latents(0, 40).tobytes() == expected.read_latents(0, 40).tobytes()


def test_a_shift_whose_matching_fills_the_disk_writes_it_again(
    tmp_path: Path, digits: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from latentbatch.uses.manipulation import shift

    reference, url = str(tmp_path / "reference.zarr"), str(tmp_path / "s.zarr")
    shift(digits, reference, from_label=3, to_label=8, client=client)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", _fills_zarr("s.zarr", "shift_moves/"))
    with pytest.raises(WriteError, match=rf"the matched pairs \(shift_moves\) of {url}"):
        shift(digits, url, from_label=3, to_label=8, client=client)
    stopped = open_store(url)
    assert stopped.count == 0 and stopped.pending is not None
    assert "matching" not in stopped.meta  # the half-written pairs are not recorded
    monkeypatch.undo()
    assert shift(digits, url, from_label=3, to_label=8, client=client).resumed
    done, expected = open_store(url), open_store(reference)
    assert done.pending is None and done.count == expected.count > 0
    assert (
        done.read_latents(0, done.count).tobytes()
        == expected.read_latents(0, expected.count).tobytes()
    )


def _at_metadata(name: str, key: str, wanted: Callable[[dict[str, Any]], bool]) -> Any:
    """A ``LocalStore.set`` whose disk is full for ``key`` of the store ``name`` when the
    metadata written there is ``wanted`` (parsed ``zarr.json``)."""
    original = zarr.storage.LocalStore.set

    async def set_(self: Any, at: str, value: Any) -> None:
        if at == key and Path(str(self.root)).name == name and wanted(json.loads(value.to_bytes())):
            raise FULL
        await original(self, at, value)

    return set_


def _count(document: dict[str, Any]) -> int:
    return int(document.get("attributes", {}).get("latentbatch", {}).get("count", -1))


@pytest.mark.parametrize("where", ["commit", "canary", "resize", "anomaly"])
def test_a_full_disk_at_a_metadata_write_is_one_sentence_and_the_rerun_completes(
    tmp_path: Path, tiny_model: Path, client: Client, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC at a store's metadata write (a commit, the canary's record, the arrays grown
    by an append, the anomaly scores' record): one sentence naming it, the store still
    opens with its last metadata whole, and the same command again completes, as an
    uninterrupted run does."""
    from latentbatch.stores.canary import has_canary
    from latentbatch.uses.anomaly import score

    layout = Layout(16, 8)
    reference, url = str(tmp_path / "reference.zarr"), str(tmp_path / "s.zarr")
    first = 48 if where != "resize" else 32

    def run() -> None:
        if where == "resize":  # 48 more rows of other ids
            encode(tiny_model, "digits", url, append=True, limit=48, layout=layout, client=client)
        elif where == "anomaly":
            score(url, reference, client=client)
        else:
            encode(tiny_model, "synthetic:48", url, layout=layout, client=client)

    encode(tiny_model, "synthetic:48", reference, layout=layout, client=client)
    if where in ("resize", "anomaly"):
        encode(tiny_model, f"synthetic:{first}", url, layout=layout, client=client)
    blocked = {
        "commit": _at_metadata("s.zarr", "zarr.json", lambda d: _count(d) > 0),  # the first
        "canary": _fills_zarr("s.zarr", "canary/"),
        "resize": _at_metadata("s.zarr", "latents/zarr.json", lambda d: d["shape"][0] > 32),
        "anomaly": _at_metadata("s.zarr", "zarr.json", lambda d: "threshold" in str(d)),
    }[where]
    named = {
        "commit": f"the metadata of {url} could not be written",
        "canary": f"the canary of {url} could not be written",
        "resize": f"the array shapes of {url} (grown to 80 rows) could not be written",
        "anomaly": f"the metadata of {url} could not be written",
    }[where]
    monkeypatch.setattr(zarr.storage.LocalStore, "set", blocked)
    with pytest.raises(WriteError, match=re.escape(named)):
        run()
    stopped = open_store(url)  # whole: its last metadata
    assert stopped.count == (0 if where == "commit" else first)
    if where == "anomaly":
        assert not stopped.has_anomaly  # marked unfinished, never read as done
    monkeypatch.undo()
    run()
    done = open_store(url)
    assert done.pending is None and has_canary(done)
    rows = 80 if where == "resize" else 48
    assert done.count == rows
    expected = open_store(reference).read_latents(0, first)
    assert done.read_latents(0, first).tobytes() == expected.tobytes()
    if where == "anomaly":
        assert done.has_anomaly


def test_an_npz_whose_assembly_fills_the_disk_keeps_its_parts_and_finishes_later(
    tmp_path: Path, store: str, tiny_model: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the parts stream into ``samples.npz``: one sentence naming
    it, no manifest, no temporary, every part and record kept; once there is space the
    same decode writes nothing again but the npz, byte-identical to an uninterrupted
    run's."""
    import contextlib
    import hashlib

    reference, out = tmp_path / "reference", tmp_path / "out"
    decode(tiny_model, store, str(reference), fmt="npz", images_per_shard=16, client=client)
    original = fs._local_stream

    @contextlib.contextmanager
    def filling(path: Path) -> Any:
        with original(path) as handle:
            if path.name != "samples.npz":
                yield handle
                return

            class Full:  # the disk fills 20 kB into the npz
                written = 0

                def write(self, data: bytes) -> int:
                    self.written += len(data)
                    if self.written > 20_000:
                        raise FULL
                    return handle.write(data)

                def flush(self) -> None:
                    handle.flush()

            yield Full()

    monkeypatch.setattr(fs, "_local_stream", filling)
    with pytest.raises(WriteError, match=r"samples\.npz could not be written: No space left"):
        decode(tiny_model, store, str(out), fmt="npz", images_per_shard=16, client=client)
    assert not (out / "manifest.json").exists() and not (out / "samples.npz").exists()
    assert len(list(out.glob("shard-*.npy"))) == len(list((out / ".records").glob("*.json"))) == 5
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()  # space freed
    again = decode(tiny_model, store, str(out), fmt="npz", images_per_shard=16, client=client)
    assert again.shards_written == () and len(again.shards_skipped) == 5
    digest = [
        hashlib.sha256((d / "samples.npz").read_bytes()).hexdigest() for d in (out, reference)
    ]
    assert digest[0] == digest[1]
