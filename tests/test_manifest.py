from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentbatch.errors import OutputError
from latentbatch.manifest import (
    Manifest,
    ShardRecord,
    StoreRef,
    read_manifest,
    read_records,
    write_manifest,
    write_record,
)
from latentbatch.shards import write_tar_shard


def _manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = {
        "store": StoreRef(url="/s.zarr", uuid="u", count=3),
        "model_id": "m" * 64,
        "output_format": "tar",
        "count": 3,
        "shards": (
            ShardRecord(index=0, path="shard-000000.tar", start=0, stop=3, bytes=10, sha256="h"),
        ),
        "format_settings": {"png_compress_level": 6, "batch_size": "auto"},
    }
    return Manifest(**{**fields, **changes})  # type: ignore[arg-type]


def test_manifest_round_trips_and_keeps_its_bytes(tmp_path: Path) -> None:
    manifest = _manifest()
    write_manifest(str(tmp_path), None, manifest)
    assert read_manifest(str(tmp_path)) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data == {
        "count": 3,
        "format": 1,
        "format_settings": {"batch_size": "auto", "png_compress_level": 6},
        "model_id": "m" * 64,
        "output_format": "tar",
        "shards": [
            {
                "bytes": 10,
                "count": 3,
                "index": 0,
                "path": "shard-000000.tar",
                "sha256": "h",
                "start": 0,
                "stop": 3,
            }
        ],
        "store": {"count": 3, "url": "/s.zarr", "uuid": "u"},
    }
    assert (tmp_path / "manifest.json").read_text().endswith("}\n")


def test_selection_manifest_lists_its_rows(tmp_path: Path) -> None:
    manifest = _manifest(selection=(7, 2, 9), format_settings=None)
    write_manifest(str(tmp_path), None, manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["selection"] == [7, 2, 9]
    assert "format_settings" not in data
    assert read_manifest(str(tmp_path)) == manifest


def test_missing_manifest_is_none(tmp_path: Path) -> None:
    assert read_manifest(str(tmp_path)) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": 1, "store": "elsewhere"}', "is not a latentbatch manifest"),
        ("[1, 2]", "is not a latentbatch manifest"),
        ('{"format": 7}', "has manifest format 7"),
    ],
)
def test_foreign_manifests_are_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(OutputError, match=message) as caught:
        read_manifest(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(caught.value)


def test_records_are_trusted_only_with_their_shard(tmp_path: Path) -> None:
    identity = {"store_uuid": "u", "model_id": "m", "format": "tar"}
    record = write_tar_shard(str(tmp_path), None, 0, 0, ["x"], [b"1"], None)
    write_record(str(tmp_path), None, record, identity)
    assert read_records(str(tmp_path), None, identity) == {0: record}
    assert read_records(str(tmp_path), None, {**identity, "model_id": "other"}) == {}
    (tmp_path / record.path).write_bytes(b"torn")
    assert read_records(str(tmp_path), None, identity) == {}
