"""import: the latents people already have, in each layout, into a store whose decode
equals decoding the source arrays directly."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from safetensors.torch import save_file

from latentbatch.cli import main
from latentbatch.decode import decode
from latentbatch.errors import DataError
from latentbatch.outputs.shards import read_output
from latentbatch.stores.store import Layout, open_store
from latentbatch.uses.import_latents import import_latents
from tests.helpers import diffusers_decode

SHAPE = (4, 4, 4)  # the small AutoencoderKL's latents of 32x32 images
SCALING = 0.18215


def _scaled(n: int, seed: int = 0) -> np.ndarray:
    """Latents as a diffusion model sees them: about unit variance."""
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def _decoded(model: Path, store_url: str, out: Path, client: Client) -> np.ndarray:
    """The store decoded by latentbatch (its images, in row order)."""
    decode(model, store_url, str(out), fmt="png", client=client)
    return read_output(str(out))[1]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_edm2_folder_and_zip_store_the_mean_of_raw_mean_and_std(
    tmp_path: Path, kl_vae: Path, client: Client
) -> None:
    means = _scaled(6) / SCALING  # raw: as the autoencoder makes them
    stds = np.full_like(means, 0.01)
    folder = tmp_path / "edm2"
    names = [f"{i // 3:05d}/img{i:08d}.npy" for i in range(6)]
    for name, mean, std in zip(names, means, stds, strict=True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / name, np.concatenate([mean, std]))  # (8, 4, 4): mean and std
    labels = [[name, 10 + i] for i, name in enumerate(names[:5])]  # the last has none
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    archive = tmp_path / "edm2.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, str(path.relative_to(folder)))
    expected = diffusers_decode(kl_vae, means, raw=True)
    for source in (folder, archive):
        url = str(tmp_path / f"{source.name}.zarr")
        result = import_latents(kl_vae, str(source), url, latents="raw", client=client)
        assert result.mean_of_mean_and_std and result.warning is None
        store = open_store(url)
        assert store.read_ids(0, 2) == ["00000__img00000000", "00000__img00000001"]
        assert store.read_labels(0, 6).tolist() == [10, 11, 12, 13, 14, -1]
        assert store.latents.dtype == np.float32 and store.meta["lineage"]["operation"] == "import"
        np.testing.assert_allclose(store.read_latents(0, 6), means * SCALING, rtol=1e-6)
        images = _decoded(kl_vae, url, tmp_path / f"{source.name}-out", client)
        assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_arrays_keep_their_dtype_and_labels(tmp_path: Path, kl_vae: Path, client: Client) -> None:
    latents = _scaled(10).astype(np.float16)
    np.save(tmp_path / "half.npy", latents)
    url = str(tmp_path / "half.zarr")
    import_latents(kl_vae, str(tmp_path / "half.npy"), url, layout=Layout(4, 2), client=client)
    store = open_store(url)
    assert store.latents.dtype == np.float16 and store.shard_rows == 4
    assert store.read_latents(0, 10).tobytes() == latents.tobytes()  # as found
    assert store.read_ids(0, 1) == ["half-00000000"]
    images = _decoded(kl_vae, url, tmp_path / "half-out", client)
    expected = diffusers_decode(kl_vae, latents.astype(np.float32))
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    np.savez(tmp_path / "labelled.npz", latents=latents.astype(np.float32), labels=np.arange(10))
    url = str(tmp_path / "npz.zarr")
    import_latents(kl_vae, str(tmp_path / "labelled.npz"), url, client=client)
    assert open_store(url).read_labels(0, 10).tolist() == list(range(10))


def test_safetensors_files_of_rows_and_of_named_rows(
    tmp_path: Path, kl_vae: Path, client: Client
) -> None:
    latents = _scaled(5, seed=1)
    folder = tmp_path / "tensors"
    folder.mkdir()
    rows = torch.from_numpy(latents[:3]).to(torch.bfloat16)
    save_file({"latents": rows, "labels": torch.tensor([7, 8, 9])}, str(folder / "a.safetensors"))
    named = {f"img-{i}": torch.from_numpy(latents[i]) for i in (3, 4)}
    save_file(named, str(folder / "b.safetensors"))
    url = str(tmp_path / "st.zarr")
    import_latents(kl_vae, str(folder), url, client=client)
    store = open_store(url)
    assert store.read_ids(0, 5) == ["a-00000000", "a-00000001", "a-00000002", "img-3", "img-4"]
    assert store.read_labels(0, 5).tolist() == [7, 8, 9, -1, -1]
    found = np.concatenate([rows.float().numpy(), latents[3:]])
    np.testing.assert_array_equal(store.read_latents(0, 5), found)  # bfloat16 → float32


def test_webdataset_tars_with_npy_members(tmp_path: Path, kl_vae: Path, client: Client) -> None:
    latents = _scaled(4, seed=2)
    shard = tmp_path / "latents-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, latent in enumerate(latents):
            for name, data in ((f"s{i:03d}.npy", _npy(latent)), (f"s{i:03d}.cls", b"%d" % i)):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    url = str(tmp_path / "wds.zarr")
    import_latents(kl_vae, str(shard), url, client=client)
    store = open_store(url)
    assert store.read_ids(0, 4) == ["s000", "s001", "s002", "s003"]
    assert store.read_labels(0, 4).tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(store.read_latents(0, 4), latents)


def test_zarr_arrays_and_groups_of_any_writer(tmp_path: Path, kl_vae: Path, client: Client) -> None:
    latents = _scaled(9, seed=3)
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=latents.shape, chunks=(4, *SHAPE),
                              dtype="float32")  # fmt: skip
    plain[:] = latents
    group = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    group.create_array("latents", shape=latents.shape, chunks=(2, *SHAPE), dtype="float32")[:] = (
        latents
    )
    group.create_array("labels", shape=(9,), dtype="int64")[:] = np.arange(9) % 3
    for name in ("plain.zarr", "v2.zarr"):
        url = str(tmp_path / f"in-{name}")
        import_latents(kl_vae, str(tmp_path / name), url, layout=Layout(4, 2), client=client)
        store = open_store(url)
        np.testing.assert_array_equal(store.read_latents(0, 9), latents)
    assert open_store(str(tmp_path / "in-v2.zarr")).read_labels(0, 9).tolist() == [0, 1, 2] * 3


def test_pickles_and_misfits_are_refused(
    tmp_path: Path, kl_vae: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "latents.pt").write_bytes(b"\x80\x04not really")
    argv = ["import", "--model", str(kl_vae), "--from", str(tmp_path / "latents.pt"),
            "--store", str(tmp_path / "x.zarr")]  # fmt: skip
    assert main(argv) == 1
    assert "is a pickle (.pt); latentbatch never unpickles" in capsys.readouterr().err
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"shape \(3, 4, 4\) per row; .* makes 4 channels"):
        import_latents(kl_vae, str(tmp_path / "wrong.npy"), str(tmp_path / "y.zarr"))
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_a_file_of_another_shape_is_named_in_a_sentence(
    tmp_path: Path, kl_vae: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"img{i}.npy", _scaled(1, seed=i)[0])
    np.save(folder / "img3.npy", np.zeros((4, 8, 8), np.float32))  # another size
    argv = ["import", "--model", str(kl_vae), "--from", str(folder), "--store",
            str(tmp_path / "m.zarr"), "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'img3.npy'} holds latents of shape (4, 8, 8), the others (4, 4, 4)" in err
    assert "Traceback" not in err and open_store(str(tmp_path / "m.zarr")).count == 0


def test_unscaled_latents_declared_scaled_warn(
    tmp_path: Path, kl_vae: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "raw.npy", _scaled(16, seed=4) / SCALING)  # SD's raw spread: ~5.5
    argv = ["import", "--model", str(kl_vae), "--from", str(tmp_path / "raw.npy"),
            "--store", str(tmp_path / "raw.zarr"), "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "imported 16 rows" in captured.out
    assert re.search(r"standard deviation is 5\.\d+ per channel", captured.err)
    assert "they look unscaled (raw latents declared scaled?)" in captured.err
    assert "--latents raw" in captured.err
    fixed = [*argv[:6], str(tmp_path / "fixed.zarr"), "--latents", "raw", *argv[7:]]
    assert main(fixed) == 0
    assert "standard deviation" not in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "fixed.zarr")]) == 0
    assert f"lineage  import: from {tmp_path / 'raw.npy'}, layout array, latents raw" in (
        capsys.readouterr().out
    )


def test_an_interrupted_import_resumes(tmp_path: Path, kl_vae: Path, client: Client) -> None:
    latents = _scaled(20, seed=5)
    np.save(tmp_path / "rows.npy", latents)
    url = str(tmp_path / "r.zarr")
    import_latents(kl_vae, str(tmp_path / "rows.npy"), url, layout=Layout(8, 4), client=client)
    store = open_store(url, writable=True)  # as a run killed after its first shard leaves it
    store.write_meta(count=8, pending={"operation": "import", "rows": 20})
    store.latents[8:] = 0
    result = import_latents(kl_vae, str(tmp_path / "rows.npy"), url, layout=Layout(8, 4),
                            client=client)  # fmt: skip
    assert result.derived.resumed and result.derived.written == 12
    done = open_store(url)
    assert done.count == 20 and done.pending is None
    np.testing.assert_array_equal(done.read_latents(0, 20), latents)


def test_a_changed_source_is_refused_on_resume(
    tmp_path: Path, kl_vae: Path, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """One file removed and another added between an interrupted import and its re-run:
    refused in a sentence naming the change; nothing written, no id twice or skipped."""
    folder = tmp_path / "edm2"
    folder.mkdir()
    for i in range(10):
        np.save(folder / f"img{i:08d}.npy", _scaled(1, seed=i)[0])
    url = str(tmp_path / "r.zarr")
    import_latents(kl_vae, str(folder), url, layout=Layout(4, 2), client=client)
    store = open_store(url, writable=True)  # as a run killed after its first shard leaves it
    store.write_meta(count=4, pending={"operation": "import", "rows": 10})
    (folder / "img00000002.npy").unlink()
    np.save(folder / "img00000099.npy", _scaled(1, seed=99)[0])
    argv = ["import", "--model", str(kl_vae), "--from", str(folder), "--store", url,
            "--shard-rows", "4", "--chunk-rows", "2", "--workers", "1"]  # fmt: skip
    argv.append("--no-progress")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{folder} changed since the import into {url} began: it listed 10 rows, now 10" in err
    assert "row 2 was img00000002, now img00000003" in err and "delete" in err
    again = open_store(url)
    assert again.count == 4 and again.read_ids(0, 4) == [f"img{i:08d}" for i in range(4)]
    (folder / "img00000099.npy").unlink()
    np.save(folder / "img00000002.npy", _scaled(1, seed=2)[0])  # as it was: resumes
    assert main(argv) == 0
    assert open_store(url).read_ids(0, 10) == [f"img{i:08d}" for i in range(10)]


def test_mars_cache_of_npz_files_imports_its_means_and_classes(
    tmp_path: Path, kl_vae: Path, client: Client
) -> None:
    means = _scaled(4, seed=8) / SCALING
    for i, mean in enumerate(means):
        folder = tmp_path / "cache" / f"n0{i // 2}"
        folder.mkdir(parents=True, exist_ok=True)
        moments = np.concatenate([mean, np.full_like(mean, -4.0)])  # mean and log-variance
        np.savez(folder / f"img{i}.npz", moments=moments, moments_flip=moments[:, :, ::-1])
    url = str(tmp_path / "mar.zarr")
    result = import_latents(kl_vae, str(tmp_path / "cache"), url, latents="raw", client=client)
    assert result.layout == "npz-files" and result.mean_of_mean_and_std
    store = open_store(url)
    assert store.read_ids(0, 4) == ["n00__img0", "n00__img1", "n01__img2", "n01__img3"]
    assert store.read_labels(0, 4).tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(store.read_latents(0, 4), means * SCALING, rtol=1e-6)


@pytest.mark.parametrize("mistake", ["truncated", "not npy", "object", "cls"])
def test_a_bad_member_is_one_sentence_naming_it(
    tmp_path: Path, kl_vae: Path, mistake: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A task's error on a bad input member is one `error:` line naming the file (and the
    member of a tar), no traceback, and the store keeps no rows."""
    rows = _scaled(3, seed=1)
    if mistake == "cls":
        source = tmp_path / "s.tar"
        with tarfile.open(source, "w") as archive:
            for i, row in enumerate(rows):
                for suffix, data in ((".npy", _npy(row)), (".cls", b"cat" if i == 1 else b"3")):
                    info = tarfile.TarInfo(f"k{i}{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        named = f"{source}::k1.cls holds 'cat', not an integer label"
    else:
        source = tmp_path / "edm2"
        source.mkdir()
        for i, row in enumerate(rows):
            np.save(source / f"img{i}.npy", row)
        bad = source / "img1.npy"
        if mistake == "truncated":
            bad.write_bytes(bad.read_bytes()[:-10])
            named = f"{bad} is truncated or corrupt"
        elif mistake == "not npy":
            bad.write_bytes(b"hello")
            named = f"{bad} is not a .npy (no numpy header)"
        else:
            np.save(bad, np.array([{"a": 1}] * 4, dtype=object).reshape(4, 1, 1), allow_pickle=True)
            named = f"{bad} is an object array (a pickle)"
    store = tmp_path / "x.zarr"
    argv = ["import", "--model", str(kl_vae), "--from", str(source), "--store", str(store),
            "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not store.exists() or open_store(str(store)).count == 0
