from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from latentbatch.errors import ConfigError
from latentbatch.storage.fs import (
    filesystem,
    is_remote,
    is_temporary,
    join,
    parse_options,
    sha256_file,
    write_bytes,
    write_folder,
    write_json,
    zarr_options,
)


def test_parse_options_converts_simple_values() -> None:
    assert parse_options(["endpoint_url=http://127.0.0.1:9000", "anon=false", "n=3"]) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "n": 3,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["nope"])


def test_remote_and_join() -> None:
    assert is_remote("s3://b/k")
    assert not is_remote("/tmp/x")
    assert not is_remote("file:///tmp/x")
    assert join("s3://b/k/", "a", "b") == "s3://b/k/a/b"
    assert zarr_options("/tmp/x", {"a": 1}) is None


def test_s3_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert zarr_options("s3://b/k", {}) == {"endpoint_url": "http://127.0.0.1:1"}
    assert zarr_options("s3://b/k", {"endpoint_url": "x"}) == {"endpoint_url": "x"}


def test_local_filesystem(tmp_path: Path) -> None:
    fs, path = filesystem(str(tmp_path))
    assert fs.isdir(path)


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    write_bytes(target, b"one")
    write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    assert sha256_file(target) == hashlib.sha256(b"two").hexdigest()
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_json(target, {"b": 1, "a": [1]})
    assert target.read_bytes() == b'{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": [1], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_folder_write_replaces_the_whole_folder(tmp_path: Path) -> None:
    folder = tmp_path / "shard"
    write_folder(str(folder), [("a.png", b"1"), ("b.png", b"2")])
    write_folder(str(folder), [("c.png", b"3")])
    assert sorted(p.name for p in folder.iterdir()) == ["c.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard"]
    assert is_temporary(".shard.0123.tmp")
    assert not is_temporary("shard.tmp")
    assert not is_temporary(".records")


def test_a_fenced_writes_temporary_carries_its_writer_and_a_refusal_keeps_nothing(
    tmp_path: Path,
) -> None:
    """Inside ``checked_commits`` the check runs right before the rename, while the
    temporary (named with the writer's mark) exists; a check that raises leaves neither
    the file nor its temporary."""
    from latentbatch.storage.fs import checked_commits, temporary_of, write_bytes

    seen: list[str] = []

    def check() -> None:
        seen.extend(p.name for p in tmp_path.iterdir())

    with checked_commits(check, "c" * 32):
        write_bytes(tmp_path / "kept.bin", b"data")
    assert (tmp_path / "kept.bin").read_bytes() == b"data"
    assert [temporary_of(name) for name in seen] == ["c" * 12]

    def refuse() -> None:
        raise RuntimeError("taken over")

    with pytest.raises(RuntimeError), checked_commits(refuse, "d" * 32):
        write_bytes(tmp_path / "refused.bin", b"late")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin"]
