from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray
import zarr
from hypothesis import given
from hypothesis import strategies as st

from latentbatch.models.checkpoint import read_info
from latentbatch.stores.store import (
    ATTRS,
    Layout,
    StoreError,
    create_store,
    open_store,
    shard_ranges,
)

FORMAT_ONE = Path(__file__).parent / "data" / "format1"  # written by latentbatch at 9c5277a


@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(1, 700))
def test_shard_ranges_tile_the_rows_at_shard_boundaries(a: int, n: int, size: int) -> None:
    ranges = shard_ranges(a, a + n, size)
    rows = [r for s, e in ranges for r in range(s, e)]
    assert rows == list(range(a, a + n))
    for s, e in ranges:
        assert s < e
        assert s // size == (e - 1) // size  # never crosses a shard
        assert e % size == 0 or e == a + n


def _store(tmp_path: Path, tiny_model: Path, capacity: int = 10) -> Path:
    url = tmp_path / "s.zarr"
    info = read_info(tiny_model)
    create_store(
        str(url), model_id=info.model_id, config=info.config, capacity=capacity, layout=Layout(4, 2)
    )
    return url


def test_create_write_read_commit(tmp_path: Path, tiny_model: Path) -> None:
    url = _store(tmp_path, tiny_model)
    store = open_store(str(url), writable=True)
    assert (store.count, store.capacity, store.latent_shape) == (0, 10, (2, 4, 4))
    latents = np.random.default_rng(0).normal(size=(4, 2, 4, 4)).astype(np.float32)
    store.write_rows(0, latents, ["a", "b", "c", "d"], np.array([1, 2, 3, -1]))
    with pytest.raises(StoreError, match="outside the 0 committed rows"):
        store.read_latents(0, 1)
    store.write_meta(count=4)
    again = open_store(str(url))
    assert again.count == 4
    np.testing.assert_array_equal(again.read_latents(0, 4), latents.astype(np.float16))
    assert again.read_ids(1, 3) == ["b", "c"]
    assert again.read_labels(0, 4).tolist() == [1, 2, 3, -1]
    assert again.shards() == [(0, 4)]
    assert again.written_rows() == 4


def test_float_latents_keep_the_format_one_layout_on_disk(tmp_path: Path, tiny_model: Path) -> None:
    url = _store(tmp_path, tiny_model)
    meta = json.loads((url / "latents" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["sample", "channel", "y", "x"]
    assert meta["data_type"] == "float16"
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [2, 2, 4, 4]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 2, 4, 4]
    names = [c["name"] for c in sharding["configuration"]["codecs"]]
    assert names == ["bytes", "zstd", "crc32c"]
    attrs = json.loads((url / "zarr.json").read_text())["attributes"][ATTRS]
    assert attrs["format"] == 1
    assert attrs["model_id"] == read_info(tiny_model).model_id
    assert attrs["image"] == {"height": 16, "width": 16, "mode": "L"}
    assert attrs["latent"] == {"dtype": "float16", "shape": [2, 4, 4], "quantization": None}


def test_integer_latents_are_stored_a_channel_per_chunk_with_their_quantization(
    tmp_path: Path, tiny_codec_model: Path
) -> None:
    info = read_info(tiny_codec_model)
    url = tmp_path / "codec.zarr"
    store = create_store(
        str(url),
        model_id=info.model_id,
        config=info.config,
        capacity=8,
        layout=Layout(4, 2),
        quantization=info.quantization,
    )
    meta = json.loads((url / "latents" / "zarr.json").read_text())
    assert meta["data_type"] == "int8"
    sharding = meta["codecs"][0]["configuration"]
    assert sharding["chunk_shape"] == [4, 1, 4, 4]  # one channel of a whole shard's rows
    assert sharding["codecs"][1] == {
        "name": "zstd",
        "configuration": {"level": 15, "checksum": False},
    }
    assert store.quantization == info.quantization
    assert store.quantization is not None and store.quantization["range"] == [-128, 127]
    symbols = np.random.default_rng(0).integers(-20, 20, (4, 4, 4, 4)).astype(np.int8)
    store.write_rows(0, symbols, ["a", "b", "c", "d"], np.full(4, -1))
    store.write_meta(count=4)
    again = open_store(str(url))
    assert again.latents.dtype == np.int8 and again.meta["format"] == 2
    np.testing.assert_array_equal(again.read_latents(0, 4), symbols)
    # an ordinary integer array with its dimension names, to any Zarr reader
    dataset = xarray.open_zarr(str(url), consolidated=False)
    assert dataset["latents"].dims == ("sample", "channel", "y", "x")
    np.testing.assert_array_equal(dataset["latents"][:4].values, symbols)
    with pytest.raises(StoreError, match="drop --latent-dtype float32"):
        create_store(
            str(tmp_path / "other.zarr"),
            model_id=info.model_id,
            config=info.config,
            capacity=8,
            layout=Layout(latent_dtype="float32"),
            quantization=info.quantization,
        )


def test_format_one_stores_of_the_previous_release_still_open(tmp_path: Path) -> None:
    url = tmp_path / "store.zarr"
    shutil.copytree(FORMAT_ONE / "store.zarr", url)
    store = open_store(str(url))
    assert store.meta["format"] == 1 and store.count == 20
    assert store.quantization is None and store.latents.dtype == np.float16
    assert store.read_latents(0, 20).shape == (20, 2, 4, 4)
    assert store.read_ids(0, 2) == ["synthetic-0000000", "synthetic-0000001"]


def test_each_rows_quality_is_kept_and_stores_without_it_still_open(
    tmp_path: Path, tiny_model: Path
) -> None:
    url = _store(tmp_path, tiny_model)
    meta = json.loads((url / "quality" / "zarr.json").read_text())
    assert (meta["data_type"], meta["dimension_names"]) == ("float32", ["sample"])
    store = open_store(str(url), writable=True)
    latents = np.zeros((4, 2, 4, 4), np.float32)
    store.write_rows(0, latents, ["a", "b", "c", "d"], np.full(4, -1), np.array([20, 31.5, 9, 40]))
    store.write_rows(4, latents, ["e", "f", "g", "h"], np.full(4, -1))  # not measured
    store.write_meta(count=8)
    again = open_store(str(url))
    assert again.has_quality
    np.testing.assert_array_equal(again.read_quality(2, 6), [9, 40, np.nan, np.nan])
    assert again.read("quality", [3, 1]).tolist() == [40, 31.5]
    assert "quality" in again.bytes_on_disk()
    # a store of an earlier release has no quality array: it opens, and says so when asked
    for path in sorted((url / "quality").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (url / "quality").rmdir()
    old = open_store(str(url))
    assert not old.has_quality
    np.testing.assert_array_equal(old.read_latents(0, 8), np.zeros((8, 2, 4, 4)))
    with pytest.raises(StoreError, match=r"records no per-image quality .* re-encode"):
        old.read_quality(0, 8)


@pytest.mark.parametrize("array", ["latents", "ids", "labels"])
def test_flipped_byte_is_named_with_store_array_and_rows(
    tmp_path: Path, tiny_model: Path, array: str
) -> None:
    url = _store(tmp_path, tiny_model)
    store = open_store(str(url), writable=True)
    store.write_rows(0, np.ones((4, 2, 4, 4), np.float32), list("abcd"), np.zeros(4))
    store.write_meta(count=4)
    shard = next(p for p in sorted((url / array / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    opened = open_store(str(url))
    read = {
        "latents": lambda: opened.read_latents(0, 4),
        "ids": lambda: opened.read("ids", [2, 0]).tolist(),
        "labels": lambda: opened.read_labels(0, 4),
    }[array]
    with pytest.raises(StoreError) as caught:
        read()
    message = str(caught.value)
    assert str(url) in message and f"'{array}' array" in message
    assert "rows" in message and "checksum" in message.lower()
    assert "restore the store" in message


def test_resize_cannot_drop_committed_rows(tmp_path: Path, tiny_model: Path) -> None:
    store = open_store(str(_store(tmp_path, tiny_model)), writable=True)
    store.write_meta(count=3)
    store.resize(20)
    assert open_store(store.url).capacity == 20
    with pytest.raises(StoreError, match="below its 3 committed rows"):
        store.resize(2)


def test_refusals_say_what_is_wrong(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "missing.zarr"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a latent store"):
        open_store(str(tmp_path / "plain"))
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a latent store \\(no 'latentbatch' attributes\\)"):
        open_store(str(tmp_path / "bare.zarr"))
    url = _store(tmp_path, tiny_model)
    with pytest.raises(StoreError, match="already exists"):
        create_store(str(url), model_id="0" * 64, config=read_info(tiny_model).config, capacity=4)
    group = zarr.open_group(str(url), mode="r+")
    group.attrs[ATTRS] = {**group.attrs[ATTRS], "format": 99}
    with pytest.raises(StoreError, match="format version 99; this latentbatch reads formats 1, 2"):
        open_store(str(url))


def test_missing_array_is_named(tmp_path: Path, tiny_model: Path) -> None:
    url = _store(tmp_path, tiny_model)
    import shutil

    shutil.rmtree(url / "labels")
    with pytest.raises(StoreError, match="lacks the 'labels' array"):
        open_store(str(url))


def test_layout_validation() -> None:
    with pytest.raises(StoreError, match="multiple of chunk_rows"):
        Layout(shard_rows=10, chunk_rows=3)
    with pytest.raises(StoreError, match="latent dtype"):
        Layout(latent_dtype="int8")
    with pytest.raises(StoreError, match="positive multiple"):
        Layout(chunk_rows=0)


def test_rows_not_given_follow_the_latents_bytes() -> None:
    """Shards aim at 16 MiB of latents (16 to 1,024 rows), chunks at 1 MiB (at most 128),
    powers of two; rows given are kept and the other divides them."""
    kib = 1024
    assert Layout().rows_for(4 * 7 * 7 * 2) == (1024, 128)  # digits: as before
    assert Layout().rows_for(4 * 32 * 32 * 2) == (1024, 128)  # TAESD 256x256, float16
    assert Layout().rows_for(4 * 64 * 64 * 2) == (512, 32)  # SD at 512x512, float16
    assert Layout().rows_for(16 * 128 * 128 * 2) == (32, 2)  # FLUX at 1024x1024
    assert Layout().rows_for(4096 * kib) == (16, 1)  # at least 16 rows a shard
    assert Layout(shard_rows=100).rows_for(64 * kib) == (100, 4)
    assert Layout(chunk_rows=8).rows_for(64 * kib) == (256, 8)
    assert Layout(chunk_rows=48).rows_for(4096 * kib) == (48, 48)
    assert Layout(16, 8).rows_for(1) == (16, 8)


def test_commits_advance_over_the_finished_prefix_only(tmp_path: Path, tiny_model: Path) -> None:
    from latentbatch.stores.store import Commits

    store = open_store(str(_store(tmp_path, tiny_model, capacity=12)), writable=True)
    checks: list[int] = []
    commits = Commits(store, lambda: checks.append(store.count))
    commits.finish(4, 8, labelled=True)  # a later shard first: nothing is contiguous yet
    assert store.count == 0 and not store.meta["labels"] and checks == []
    commits.finish(0, 4)
    assert store.count == 8 and store.meta["labels"]  # both, and the labels with them
    commits.finish(8, 12)
    assert store.count == 12 and checks == [0, 8]  # the lease checked before each write
    assert open_store(store.url).count == 12
