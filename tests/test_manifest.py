from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from latentbatch.errors import OutputError
from latentbatch.outputs.manifest import (
    Manifest,
    ShardRecord,
    StoreRef,
    iter_shards,
    read_manifest,
    read_records,
    write_manifest,
    write_record,
)
from latentbatch.outputs.shards import write_tar_shard

SHARDS = [
    ShardRecord(
        index=i, path=f"shard-{i:06d}.tar", start=3 * i, stop=3 * i + 3, bytes=10, sha256="h"
    )
    for i in range(3)
]


def _write(folder: Path, **changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "store": StoreRef(url="/s.zarr", uuid="u", count=9),
        "model_id": "m" * 64,
        "output_format": "tar",
        "count": 9,
        "shards": SHARDS,
        "format_settings": {"image_codec": "png", "batch_size": "auto"},
    }
    return write_manifest(str(folder), None, **{**fields, **changes})


def test_manifest_is_a_summary_and_the_shards_a_streamed_table(tmp_path: Path) -> None:
    manifest = _write(tmp_path)
    assert read_manifest(str(tmp_path)) == manifest
    table = (tmp_path / "shards.jsonl").read_bytes()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data == {
        "count": 9,
        "format": 2,
        "format_settings": {"batch_size": "auto", "image_codec": "png"},
        "model_id": "m" * 64,
        "output_format": "tar",
        "shard_table": {
            "path": "shards.jsonl",
            "sha256": hashlib.sha256(table).hexdigest(),
            "shards": 3,
        },
        "store": {"count": 9, "url": "/s.zarr", "uuid": "u"},
    }
    assert [json.loads(line)["index"] for line in table.splitlines()] == [0, 1, 2]
    assert list(iter_shards(str(tmp_path), None, manifest)) == SHARDS
    assert (tmp_path / "manifest.json").read_text().endswith("}\n")


def test_manifest_size_does_not_grow_with_the_shards(tmp_path: Path) -> None:
    many = [
        ShardRecord(index=i, path=f"shard-{i:06d}.tar", start=i, stop=i + 1, bytes=1, sha256="h")
        for i in range(20_000)
    ]
    _write(tmp_path / "few")
    _write(tmp_path / "many", shards=many, count=20_000)
    few_size = (tmp_path / "few" / "manifest.json").stat().st_size
    many_size = (tmp_path / "many" / "manifest.json").stat().st_size
    assert many_size - few_size <= 16  # the digits of two counts
    assert many_size < 1024


def test_a_damaged_or_foreign_shard_table_is_named(tmp_path: Path) -> None:
    manifest = _write(tmp_path)
    table = tmp_path / "shards.jsonl"
    table.write_bytes(table.read_bytes().replace(b'"bytes": 10', b'"bytes": 11', 1))
    with pytest.raises(OutputError, match=r"shards\.jsonl is not the table its manifest"):
        list(iter_shards(str(tmp_path), None, manifest))
    table.write_bytes(b"{not json\n")
    with pytest.raises(OutputError, match=r"shards\.jsonl is damaged"):
        list(iter_shards(str(tmp_path), None, manifest))
    table.unlink()
    with pytest.raises(OutputError, match=r"shards\.jsonl is missing; run the decode again"):
        list(iter_shards(str(tmp_path), None, manifest))


def test_format_1_manifests_of_earlier_releases_still_read(tmp_path: Path) -> None:
    old = {
        "format": 1,
        "store": {"url": "/s.zarr", "uuid": "u", "count": 3},
        "model_id": "m" * 64,
        "output_format": "tar",
        "count": 3,
        "shards": [SHARDS[0].to_dict()],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = read_manifest(str(tmp_path))
    assert manifest is not None
    assert manifest.format == 1 and manifest.shard_count == 1
    assert list(iter_shards(str(tmp_path), None, manifest)) == [SHARDS[0]]


def test_selection_manifest_lists_its_rows(tmp_path: Path) -> None:
    manifest = _write(tmp_path, selection=(7, 2, 9), format_settings=None)
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
        ('{"format": 2, "store": {"url": "x", "uuid": "u", "count": 1}}', "not a latentbatch"),
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
