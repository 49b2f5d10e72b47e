from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentbatch.errors import OutputError
from latentbatch.manifest import ShardRecord
from latentbatch.shards import (
    build_tar,
    check_format,
    encode_png,
    encode_pngs,
    remove_temporaries,
    write_png_shard,
    write_tar_shard,
)


def test_png_is_deterministic_and_lossless() -> None:
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    data = encode_png(image)
    assert data == encode_png(image.copy())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    grey = encode_png(image[..., :1])
    assert Image.open(io.BytesIO(grey)).mode == "L"


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
    smooth=st.booleans(),
)
def test_png_of_every_mode_and_size_decodes_exactly_with_pillow(
    height: int, width: int, channels: int, seed: int, smooth: bool
) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if smooth:  # digit-like: large flat areas, which compress
        image = (image > 200).astype(np.uint8) * 255
    data = encode_png(image)
    assert data == encode_png(image.copy())
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)
    assert Image.open(io.BytesIO(data)).mode == ("L" if channels == 1 else "RGB")
    assert encode_pngs(image[None].repeat(2, axis=0)) == [data, data]


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
