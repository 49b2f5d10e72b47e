from __future__ import annotations

import pytest

from latentbatch.errors import ConfigError
from latentbatch.storage import filesystem, is_remote, join, parse_options, zarr_options


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


def test_local_filesystem(tmp_path) -> None:
    fs, path = filesystem(str(tmp_path))
    assert fs.isdir(path)
