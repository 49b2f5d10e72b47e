from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentbatch.errors import OutputError
from latentbatch.outputs.manifest import ShardRecord
from latentbatch.outputs.shards import (
    _sidecar,
    build_tar,
    check_format,
    remove_beyond,
    remove_temporaries,
    write_png_shard,
    write_tar_shard,
)


def tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    """What tarfile itself writes for members with build_tar's fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            # any name tarfile can write: no NUL, no lone surrogates (not UTF-8 encodable;
            # ids never hold them, ids.validate_ids refuses them first)
            st.text(
                st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                min_size=1,
                max_size=140,
            ),
            st.binary(max_size=1500),
        ),
        max_size=12,
    )
)
def test_tar_is_byte_equal_to_tarfiles(members: list[tuple[str, bytes]]) -> None:
    data = build_tar(members)
    assert data == tarfile_reference(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == members  # type: ignore[union-attr]


def test_tar_bytes_depend_only_on_members() -> None:
    members = [("a.png", b"1"), ("a.json", b"{}"), ("b" * 150 + ".png", b"22")]
    first = build_tar(members)
    assert first == build_tar(list(members))
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert tar.getnames() == [m[0] for m in members]


def test_tar_shard_is_renamed_into_place(tmp_path: Path) -> None:
    record = write_tar_shard(str(tmp_path), None, 3, 30, ["x", "y"], [b"p1", b"p2"], [4, -1])
    assert record == ShardRecord(
        index=3,
        path="shard-000003.tar",
        start=30,
        stop=32,
        bytes=record.bytes,
        sha256=record.sha256,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000003.tar"]
    with tarfile.open(tmp_path / "shard-000003.tar") as tar:
        assert tar.getnames() == ["x.png", "x.json", "y.png", "y.json"]
        assert tar.extractfile("y.json").read() == b'{"label": -1, "row": 31}'  # type: ignore[union-attr]


@given(st.integers(-(2**31), 2**31 - 1), st.integers(0, 2**63 - 1))
def test_sidecar_is_sorted_json(label: int, row: int) -> None:
    """The sidecar's bytes are json.dumps' with sorted keys, which shards were written
    with before (their bytes and hashes must not change)."""
    expected = json.dumps({"label": label, "row": row}, sort_keys=True).encode()
    assert _sidecar(row, label) == expected
    assert json.loads(_sidecar(row, label)) == {"label": label, "row": row}


def test_png_shard_digest_ignores_write_order(tmp_path: Path) -> None:
    a = write_png_shard(str(tmp_path / "a"), None, 0, 0, ["x", "y"], [b"1", b"2"])
    b = write_png_shard(str(tmp_path / "b"), None, 0, 0, ["y", "x"], [b"2", b"1"])
    assert a.sha256 == b.sha256
    assert sorted(p.name for p in (tmp_path / "a" / "shard-000000").iterdir()) == ["x.png", "y.png"]


def test_remove_temporaries(tmp_path: Path) -> None:
    (tmp_path / ".shard-000000.tar.abc.tmp").write_bytes(b"")
    (tmp_path / ".shard-000001.abc.tmp").mkdir()
    (tmp_path / "shard-000002.tar").write_bytes(b"keep")
    assert remove_temporaries(str(tmp_path), None) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000002.tar"]


def test_unknown_format_is_named() -> None:
    assert check_format("png") == "png"
    with pytest.raises(
        OutputError, match="unknown output format 'gif'; choose one of tar, zarr, png"
    ):
        check_format("gif")


def test_shards_beyond_a_decodes_count_are_removed_with_their_records(tmp_path: Path) -> None:
    """What a stopped decode of more shards left (tar files, png folders, records) from
    index N on goes; shards below N, the lease, the table and temporaries stay."""
    for index in range(5):
        (tmp_path / f"shard-{index:06d}.tar").write_bytes(b"t")
    (tmp_path / "shard-000006").mkdir()
    (tmp_path / "shard-000006" / "a.png").write_bytes(b"p")
    (tmp_path / ".records").mkdir()
    for index in (1, 3, 6):
        (tmp_path / ".records" / f"shard-{index:06d}.json").write_text("{}")
    kept = [".latentbatch-lease-000000.json", "shards.jsonl", ".shard-000004.tar.x.tmp"]
    for name in kept:
        (tmp_path / name).write_text("")
    assert remove_beyond(str(tmp_path), None, 3) == 5
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar",
    ]  # fmt: skip
    assert [p.name for p in (tmp_path / ".records").iterdir()] == ["shard-000001.json"]
    assert all((tmp_path / name).exists() for name in kept)


def test_a_writer_removes_only_its_own_temporaries(tmp_path: Path) -> None:
    """Temporaries carry their writer's mark: a cleanup with writers removes theirs and
    unmarked ones (an older release's), never another live writer's."""
    mine, other = "a" * 32, "b" * 32
    names = [
        f".shard-000001.tar.{mine[:12]}.k3j4h5g6.tmp",
        f".shard-000002.tar.{other[:12]}.q1w2e3r4.tmp",
        ".shard-000003.tar.0123.tmp",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    assert remove_temporaries(str(tmp_path), None, {mine}) == 2
    assert [p.name for p in tmp_path.iterdir()] == [names[1]]
    assert remove_temporaries(str(tmp_path), None) == 1  # no writers given: all of them
