"""Found latents' layouts (sources/latents.py, sources/listing.py): each listed by tasks
into blocks on storage, in row order, and read by range with no torch; the rows of a
store shard are the listing's segments."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from latentbatch.errors import DataError
from latentbatch.sources import listing as listing_module
from latentbatch.sources.latents import Reader
from latentbatch.sources.listing import Listing, list_source, read_rows


def find(spec: str) -> Listing:
    """The listing of ``spec``, its blocks in a folder beside it, listed in this process."""
    folder = Path(spec.partition("::")[0]).parent / f".listing-{Path(spec).name}"
    return list_source(spec, str(folder))


def rows(found: Listing, start: int = 0, stop: int | None = None) -> np.ndarray:
    return labelled(found, start, stop)[0]


def labelled(
    found: Listing, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    with Reader() as reader:
        return read_rows(found.segments(start, found.rows if stop is None else stop), reader,
                         found.shape)  # fmt: skip


def _edm2(folder: Path, rows: int, size: int = 2) -> np.ndarray:
    values = np.arange(rows * 8 * size * size, dtype=np.float32).reshape(rows, 8, size, size)
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
    assert (
        folder.ids(0, 5) == zipped.ids(0, 5) == [f"0000{i // 3}__img0000000{i}" for i in range(5)]
    )
    assert folder.shape == (8, 2, 2) and folder.dtype == "float32"
    for found in (folder, zipped):
        latents, _, labels = labelled(found)
        np.testing.assert_array_equal(latents, values)
        assert labels.tolist() == [-1, 7, -1, -1, -1]


def test_segments_cover_a_range_with_the_groups_that_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "a.npy", np.zeros((10, 4, 2, 2), np.float16))
    found = find(str(tmp_path / "a.npy"))
    assert found.rows == 10 and len(found.groups) == 1 and found.groups[0].by_range
    monkeypatch.setattr(listing_module, "BLOCK_ROWS", 3)  # a range spans listing blocks
    folder = _edm2(tmp_path / "edm2", 7)
    listed = find(str(tmp_path / "edm2"))
    assert len(list((tmp_path / ".listing-edm2").iterdir())) == 3
    for start, stop in ((0, 7), (2, 5), (6, 7), (3, 3), (1, 6)):
        latents, ids, _ = labelled(listed, start, stop)
        assert ids == [f"0000{i // 3}__img{i:08d}" for i in range(start, stop)]
        np.testing.assert_array_equal(latents, folder[start:stop])
    for start, stop in ((0, 10), (3, 7), (9, 10)):
        wanted = found.segments(start, stop)
        assert sum(b - a for _, a, b in wanted) == stop - start


def test_ids_that_repeat_across_files_are_refused_naming_both(tmp_path: Path) -> None:
    values = np.zeros((2, 8, 2, 2), np.float32)
    (tmp_path / "wds").mkdir()
    for name in ("a", "b"):
        _tar(tmp_path / "wds" / f"{name}.tar", values, [b"1", b"2"])
    with pytest.raises(DataError, match=r"id 's00000' appears in .*a\.tar and in .*b\.tar"):
        find(str(tmp_path / "wds"))


def test_the_listing_the_client_holds_is_a_few_numbers_per_file_group(tmp_path: Path) -> None:
    """A folder of one file per row is one group however many files it has; what the
    client keeps is the groups, and the rows' names lie in the listing's blocks."""
    sizes = []
    for count in (30, 3000):
        _edm2(tmp_path / f"{count:04d}", count)
        found = find(str(tmp_path / f"{count:04d}"))
        assert found.rows == count and len(found.groups) == 1
        sizes.append(len(pickle.dumps(found)))
    assert abs(sizes[1] - sizes[0]) < 8, sizes  # the row count's digits, not the rows


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


def _read_chars() -> int:
    with Path("/proc/self/io").open() as handle:
        return int(next(line for line in handle if line.startswith("rchar")).split()[1])


def _tar(path: Path, values: np.ndarray, labels: list[bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for i, (value, label) in enumerate(zip(values, labels, strict=True)):
            for suffix, data in ((".npy", _npy(value)), (".cls", label)):
                info = tarfile.TarInfo(f"s{i:05d}{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def test_each_source_byte_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a zip or tar and reading every shard's rows reads about the source's
    bytes once, however many members it has (not its directory once per row), with
    the listing's blocks (about 20 bytes a row) read by each shard that needs them. Here
    a block holds a shard's rows, as an import's (a store shard holds 16 MiB of rows:
    at least as many rows as a block of these small latents)."""
    monkeypatch.setattr(listing_module, "BLOCK_ROWS", 64)
    values = _edm2(tmp_path / "edm2", 300, size=4)
    with zipfile.ZipFile(tmp_path / "edm2.zip", "w", zipfile.ZIP_STORED) as archive:
        for path in sorted((tmp_path / "edm2").rglob("*.npy")):
            archive.write(path, str(path.relative_to(tmp_path / "edm2")))
    tar = _tar(tmp_path / "s.tar", values, [b"%d" % (i % 7) for i in range(300)])
    for source in (tmp_path / "edm2.zip", tar):
        find(str(source))  # modules imported on first use read their files now
        before = _read_chars()
        found = find(str(source))
        shards = [rows(found, start, min(start + 64, 300)) for start in range(0, 300, 64)]
        read = _read_chars() - before
        np.testing.assert_array_equal(np.concatenate(shards), values)
        assert read <= 1.2 * source.stat().st_size, (source.name, read)


def test_a_tars_labels_and_what_is_not_latents_are_named(tmp_path: Path) -> None:
    values = np.zeros((3, 8, 2, 2), np.float32)
    good = find(str(_tar(tmp_path / "good.tar", values, [b"4", b" 5\n", b"6"])))
    assert labelled(good)[2].tolist() == [4, 5, 6]
    bad = find(str(_tar(tmp_path / "bad.tar", values, [b"4", b"cat", b"6"])))
    with pytest.raises(DataError, match=r"bad\.tar::s00001\.cls holds 'cat', not an integer"):
        rows(bad, 1, 2)
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "good.tar", "inner.tar")
    (tmp_path / "packed.tar.gz").rename(tmp_path / "packed.tar")
    with pytest.raises(DataError, match="not an uncompressed tar; decompress it"):
        find(str(tmp_path / "packed.tar"))
    (tmp_path / "objects").mkdir()
    np.save(tmp_path / "objects" / "a.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"objects/a\.npy is an object array \(a pickle\)"):
        rows(find(str(tmp_path / "objects")))


def test_a_zip_members_bytes_are_checked_and_deflated_ones_read(tmp_path: Path) -> None:
    values = _edm2(tmp_path / "edm2", 4)
    archive_path = tmp_path / "deflated.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((tmp_path / "edm2").rglob("*.npy")):
            archive.write(path, str(path.relative_to(tmp_path / "edm2")))
    np.testing.assert_array_equal(rows(find(str(archive_path))), values)
    with zipfile.ZipFile(tmp_path / "extra.zip", "w") as archive:  # a local extra field
        info = zipfile.ZipInfo("a/img00000000.npy")
        info.extra = b"\xfe\xca\x0c\x00" + bytes(12)  # an unknown 12-byte extra block
        archive.writestr(info, _npy(values[0]))
    np.testing.assert_array_equal(rows(find(str(tmp_path / "extra.zip")))[0], values[0])
    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a/img00000000.npy", _npy(values[0]))
    found = find(str(stored))
    data = bytearray(stored.read_bytes())
    data[200] ^= 0xFF  # a flipped byte in the member's data (its header is 30 + 17 bytes)
    stored.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"stored\.zip::a/img00000000\.npy does not match its CRC"):
        rows(found)


def test_a_folder_of_mar_npz_files_reads_its_moments_and_class_folders(tmp_path: Path) -> None:
    """MAR's cache: one .npz per image (``moments`` and ``moments_flip``) in ImageNet's
    class folders, labelled by the folder's index among the sorted class folders."""
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((5, 32, 2, 2)).astype(np.float32)  # mean and logvar of 16
    for i, (folder, name) in enumerate(
        [("n02", "a"), ("n01", "b"), ("n01", "c"), ("n03", "d"), ("n02", "e")]
    ):
        (tmp_path / "cache" / folder).mkdir(parents=True, exist_ok=True)
        np.savez(tmp_path / "cache" / folder / f"{name}.npz", moments=moments[i],
                 moments_flip=moments[i][:, :, ::-1])  # fmt: skip
    found = find(str(tmp_path / "cache"))
    assert found.kind == "npz-files" and found.shape == (32, 2, 2)
    latents, ids, labels = labelled(found)
    assert ids == ["n01__b", "n01__c", "n02__a", "n02__e", "n03__d"]
    assert labels.tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_array_equal(latents, moments[[1, 2, 0, 4, 3]])


def test_an_array_read_by_offset_must_be_in_c_order(tmp_path: Path) -> None:
    """A whole-array ``.npy`` is read by row ranges, so a Fortran-order one is refused in
    a sentence; a Fortran-order ``.npy`` per image is read whole, and kept."""
    values = np.asfortranarray(np.arange(2 * 4 * 2 * 2, dtype=np.float32).reshape(2, 4, 2, 2))
    np.save(tmp_path / "f.npy", values)
    with pytest.raises(DataError, match=r"f\.npy holds its array in Fortran order"):
        find(str(tmp_path / "f.npy"))
    (tmp_path / "rows").mkdir()
    for i, value in enumerate(values):
        np.save(tmp_path / "rows" / f"{i}.npy", np.asfortranarray(value))
    np.testing.assert_array_equal(rows(find(str(tmp_path / "rows"))), values)
