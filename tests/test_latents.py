"""Found latents' layouts (sources/latents.py): each listed as pieces in row order, read
a piece at a time, with no torch; the rows of a store shard are the pieces' segments."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from latentbatch.errors import DataError
from latentbatch.sources.latents import find, read_piece, segments


def _edm2(folder: Path, rows: int) -> np.ndarray:
    values = np.arange(rows * 8 * 2 * 2, dtype=np.float32).reshape(rows, 8, 2, 2)
    names = [f"{i // 3:05d}/img{i:08d}.npy" for i in range(rows)]
    for name, value in zip(names, values, strict=True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / name, value)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[names[1], 7]]}))
    return values


def test_an_npy_folder_and_its_zip_list_the_same_rows(tmp_path: Path) -> None:
    values = _edm2(tmp_path / "edm2", 5)
    with zipfile.ZipFile(tmp_path / "edm2.zip", "w") as archive:
        for path in sorted((tmp_path / "edm2").rglob("*")):
            archive.write(path, str(path.relative_to(tmp_path / "edm2")))
    folder, zipped = find(str(tmp_path / "edm2")), find(str(tmp_path / "edm2.zip"))
    assert (folder.kind, zipped.kind) == ("npy-files", "npy-zip")
    assert folder.ids == zipped.ids == tuple(f"0000{i // 3}__img0000000{i}" for i in range(5))
    assert folder.shape == (8, 2, 2) and folder.dtype == "float32"
    assert folder.labels is not None and folder.labels.tolist() == [-1, 7, -1, -1, -1]
    for found in (folder, zipped):
        rows = np.concatenate([read_piece(p)[0] for p in found.pieces])
        np.testing.assert_array_equal(rows, values)


def test_segments_cover_a_range_with_the_pieces_that_hold_it(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((10, 4, 2, 2), np.float16))
    found = find(str(tmp_path / "a.npy"))
    assert sum(p.rows for p in found.pieces) == 10
    for start, stop in ((0, 10), (3, 7), (9, 10)):
        wanted = list(segments(found.pieces, start, stop))
        assert sum(b - a for _, a, b in wanted) == stop - start


def test_what_is_not_latents_is_refused_in_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(DataError, match="pickle"):
        find(str(tmp_path / "weights.pt"))
    with pytest.raises(DataError, match="does not exist"):
        find(str(tmp_path / "nothing"))


def test_reading_layouts_imports_no_torch() -> None:
    code = "import sys, latentbatch.sources.latents; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
