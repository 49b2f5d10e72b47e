from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster

from latentbatch.decode import ImageEncoding, ModelMismatchError, decode
from latentbatch.encode import encode
from latentbatch.engine.kernel import NonFiniteLatentsError, decode_latents
from latentbatch.ids import InvalidIdError
from latentbatch.models.autoencoder import to_unit
from latentbatch.models.quality import psnr, psnr_per_image
from latentbatch.models.weights import load_model
from latentbatch.outputs.codecs import check_codec, encode_pngs
from latentbatch.outputs.shards import OutputError, read_output
from latentbatch.progress import Progress
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.canary import CanaryError
from latentbatch.stores.store import ATTRS, Layout, StoreError, open_store
from tests.helpers import mtimes, sha256s


@pytest.fixture(scope="module")
def mnist_tar(
    tmp_path_factory: pytest.TempPathFactory, seed_model: Path, mnist_store: Path, client: Client
) -> Path:
    out = tmp_path_factory.mktemp("decoded") / "tar"
    decode(seed_model, str(mnist_store), str(out), images_per_shard=1024, client=client)
    return out


def test_round_trip_is_exact_and_costs_under_a_fifth_of_a_db(
    mnist_tar: Path, mnist_store: Path, seed_model: Path
) -> None:
    manifest = json.loads((mnist_tar / "manifest.json").read_text())
    assert manifest["count"] == 5000
    table = (mnist_tar / "shards.jsonl").read_text().splitlines()
    assert manifest["shard_table"]["shards"] == len(table) == 5
    assert [json.loads(s)["count"] for s in table] == [1024] * 4 + [904]
    ids, images = read_output(str(mnist_tar))
    source = open_source("mnist5k")
    assert ids == list(source.ids)  # every id exactly once, in row order

    store = open_store(str(mnist_store))
    decoder, _ = load_model(seed_model, "decoder")
    direct = decode_latents(decoder, store.read_latents(0, 5000), torch.device("cpu"))
    np.testing.assert_array_equal(images, direct)

    originals = to_unit(torch.from_numpy(source.read(0, 5000)))
    model, _ = load_model(seed_model)
    with torch.inference_mode():
        float_psnr = psnr(originals, model(originals))
    pipeline_psnr = psnr(originals, to_unit(torch.from_numpy(images)))
    assert abs(float_psnr - pipeline_psnr) < 0.2


def test_tar_layout_is_webdataset(mnist_tar: Path) -> None:
    import webdataset as wds

    shard = mnist_tar / "shard-000004.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert members[0].name == "mnist5k-04096.png"
    assert members[1].name == "mnist5k-04096.json"
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert len(samples) == 904
    assert samples[0]["__key__"] == "mnist5k-04096"
    assert json.loads(samples[0]["json"]) == {"label": 8, "row": 4096}
    assert samples[0]["png"].startswith(b"\x89PNG")


def test_zarr_and_png_outputs_hold_the_same_pixels(
    tmp_path: Path, mnist_tar: Path, mnist_store: Path, seed_model: Path, client: Client
) -> None:
    _, tar_images = read_output(str(mnist_tar))
    for fmt in ("zarr", "png"):
        out = tmp_path / fmt
        decode(
            seed_model, str(mnist_store), str(out), fmt=fmt, images_per_shard=1024, client=client
        )
        ids, images = read_output(str(out))
        assert len(ids) == 5000
        np.testing.assert_array_equal(images, tar_images)
    array = zarr.open_array(str(tmp_path / "zarr" / "images.zarr"))
    assert array.shape == (5000, 28, 28, 1)
    assert array.dtype == np.uint8
    assert array.shards == (1024, 28, 28, 1)
    assert (
        sorted(p.name for p in (tmp_path / "png" / "shard-000001").iterdir())[0]
        == "mnist5k-01024.png"
    )


def test_rerun_skips_finished_shards_and_redoes_torn_ones(
    tmp_path: Path, mnist_tar: Path, mnist_store: Path, seed_model: Path, client: Client
) -> None:
    out = Path(shutil.copytree(mnist_tar, tmp_path / "out"))
    before = sha256s(out)
    again = decode(seed_model, str(mnist_store), str(out), images_per_shard=1024, client=client)
    assert again.shards_written == ()
    assert again.decoded == 0
    assert sha256s(out) == before

    torn = out / "shard-000002.tar"
    torn.write_bytes(torn.read_bytes()[:5000])
    (out / "shard-000004.tar").unlink()
    (out / ".shard-000001.tar.0123.tmp").write_bytes(b"left by a killed writer")
    (out / "manifest.json").unlink()
    stamps = mtimes(out)
    result = decode(seed_model, str(mnist_store), str(out), images_per_shard=1024, client=client)
    assert result.shards_written == (2, 4)
    assert result.shards_skipped == (0, 1, 3)
    assert sha256s(out) == before
    after = mtimes(out)
    assert all(
        after[n] == stamps[n] for n in ("shard-000000.tar", "shard-000001.tar", "shard-000003.tar")
    )


def _copy_store(mnist_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mnist_store, tmp_path / "store.zarr"))


def _protected_output(tmp_path: Path, mnist_tar: Path) -> tuple[Path, dict[str, str]]:
    out = Path(shutil.copytree(mnist_tar, tmp_path / "out"))
    return out, sha256s(out)


def test_model_mismatch_is_refused_naming_both_ids(
    tmp_path: Path,
    mnist_store: Path,
    mnist_tar: Path,
    seed_model: Path,
    other_seed_model: Path,
    client: Client,
) -> None:
    out, before = _protected_output(tmp_path, mnist_tar)
    theirs = open_store(str(mnist_store)).model_id
    from latentbatch.models.checkpoint import model_id

    ours = model_id(other_seed_model)
    with pytest.raises(ModelMismatchError, match=f"{theirs}.*{ours}.*--allow-model-mismatch"):
        decode(other_seed_model, str(mnist_store), str(out), client=client)
    assert sha256s(out) == before
    with pytest.raises(OutputError, match="decode by model"):  # out belongs to the right model
        decode(
            other_seed_model, str(mnist_store), str(out), allow_model_mismatch=True, client=client
        )
    with pytest.raises(CanaryError, match=r"the canary drifted.*--skip-canary"):
        decode(other_seed_model, str(mnist_store), str(tmp_path / "forced"),
               allow_model_mismatch=True, client=client)  # fmt: skip
    forced = decode(
        other_seed_model,
        str(mnist_store),
        str(tmp_path / "forced"),
        allow_model_mismatch=True,
        skip_canary=True,  # another decoder on purpose
        client=client,
    )
    assert forced.manifest.model_id == ours and forced.canary == "skipped"
    assert sha256s(out) == before


def test_bad_stores_are_refused_and_outputs_kept(
    tmp_path: Path,
    mnist_store: Path,
    mnist_tar: Path,
    seed_model: Path,
    tiny_model: Path,
    client: Client,
) -> None:
    out, before = _protected_output(tmp_path, mnist_tar)
    with pytest.raises(StoreError, match="does not exist"):
        decode(seed_model, str(tmp_path / "nowhere"), str(out), client=client)
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "a.txt").write_text("x")
    with pytest.raises(StoreError, match="not a latent store"):
        decode(seed_model, str(tmp_path / "notastore"), str(out), client=client)
    store = _copy_store(mnist_store, tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs[ATTRS] = {**group.attrs[ATTRS], "format": 3}
    with pytest.raises(StoreError, match="format version 3"):
        decode(seed_model, str(store), str(out), client=client)
    group.attrs[ATTRS] = {**group.attrs[ATTRS], "format": 2}  # format 2 is integer latents
    with pytest.raises(StoreError, match="claims format 2 but holds float16 latents without"):
        decode(seed_model, str(store), str(out), client=client)
    with pytest.raises(StoreError, match=r"shape \(64, 7, 7\).*takes \(2, 4, 4\)"):
        decode(tiny_model, str(mnist_store), str(out), allow_model_mismatch=True, client=client)
    assert sha256s(out) == before


def test_output_of_another_store_is_refused(
    tmp_path: Path, mnist_store: Path, mnist_tar: Path, seed_model: Path, client: Client
) -> None:
    out, before = _protected_output(tmp_path, mnist_tar)
    other = str(tmp_path / "other.zarr")
    encode(seed_model, "synthetic:50", other, client=client)
    with pytest.raises(OutputError, match="holds the decode of another store"):
        decode(seed_model, other, str(out), client=client)
    assert sha256s(out) == before


def test_nan_latents_are_refused_naming_rows(
    tmp_path: Path, seed_model: Path, client: Client
) -> None:
    url = str(tmp_path / "nan.zarr")
    encode(seed_model, "synthetic:40", url, layout=Layout(16, 8), client=client)
    store = open_store(url, writable=True)
    canary_row = store.meta["canary"]["rows"][0]  # the canary leaves NaN rows to the task
    latents = store.latents[:40]
    latents[19, 0, 0, 0] = np.nan
    latents[23, 1, 2, 3] = np.inf
    latents[canary_row, 0, 1, 1] = np.nan
    store.latents[:40] = latents
    named = ", ".join(f"{r} \\(synthetic-{r:07d}\\)" for r in sorted({19, 23, canary_row}))
    with pytest.raises(NonFiniteLatentsError, match=f"rows {named}"):
        decode(seed_model, url, str(tmp_path / "out"), client=client)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_unsafe_id_in_the_last_shard_fails_its_task_naming_row_and_id(
    tmp_path: Path, seed_model: Path, client: Client
) -> None:
    """The client reads no ids: the task of the shard holding ``../x`` refuses it before
    writing, naming row and id; shards an earlier run finished stay as they were."""
    url = str(tmp_path / "ids.zarr")
    encode(seed_model, "synthetic:20", url, layout=Layout(8, 4), client=client)
    out = tmp_path / "work" / "out"
    decode(seed_model, url, str(out), images_per_shard=8, client=client)
    (out / "manifest.json").unlink()  # an earlier run, stopped before its last shard
    (out / "shard-000002.tar").unlink()
    (out / ".records" / "shard-000002.json").unlink()
    finished = sha256s(out)
    store = open_store(url, writable=True)
    store.ids[17] = "../x"
    with pytest.raises(InvalidIdError, match=r"row 17 of .*ids\.zarr: id '\.\./x' is not a safe"):
        decode(seed_model, url, str(out), images_per_shard=8, client=client)
    assert sha256s(out) == finished
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]
    assert not list(tmp_path.rglob("x.png"))


def test_image_encoding_keeps_the_order_of_images_across_chunks() -> None:
    images = np.random.default_rng(1).integers(0, 256, (11, 5, 4, 1), dtype=np.uint8)
    encoding = ImageEncoding(3)
    encoding.add(images[:7])
    encoding.add(images[7:])
    encoding.add(images[:0])
    assert encoding.result() == encode_pngs(images)


@pytest.mark.parametrize("name", ["webp", "jpeg"])
def test_lossy_tar_members_open_with_webdataset_and_other_settings_are_refused(
    tmp_path: Path,
    mnist_tar: Path,
    mnist_store: Path,
    seed_model: Path,
    client: Client,
    name: str,
) -> None:
    import webdataset as wds

    codec = check_codec(name, 85)
    out = tmp_path / name
    decode(
        seed_model, str(mnist_store), str(out), codec=codec, images_per_shard=1024, client=client
    )
    settings = json.loads((out / "manifest.json").read_text())["format_settings"]
    assert settings["image_codec"] == name
    assert settings["quality"] == 85
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 1024
    assert {k for k in samples[0] if not k.startswith("__")} == {codec.extension, "json"}
    ids, images = read_output(str(out))
    png_ids, pngs = read_output(str(mnist_tar))
    assert ids == png_ids
    assert images.shape == pngs.shape  # grey again, though WebP stores RGB
    assert np.abs(images.astype(int) - pngs.astype(int)).mean() < 3

    before = sha256s(out)
    for other in (check_codec(name, 50), check_codec("png")):
        with pytest.raises(OutputError, match="holds images made with other settings"):
            decode(seed_model, str(mnist_store), str(out), codec=other, client=client)
    assert sha256s(out) == before
    with pytest.raises(OutputError, match="needs --format tar"):
        decode(seed_model, str(mnist_store), str(tmp_path / "p"), fmt="png", codec=codec)


def test_output_shards_group_whole_store_shards(
    tmp_path: Path, mnist_store: Path, mnist_tar: Path, seed_model: Path, client: Client
) -> None:
    """``images_per_shard`` 4096 over 1,024-row store shards: shards of 4,096 images and
    the rest, every id once, the same bytes from one worker as from two; another setting
    is refused for that folder. An explicit size is honoured exactly; the default is
    10,240 images, fewer for large ones (512 MiB of pixels), in whole store shards."""
    from latentbatch.decode import rows_per_output_shard

    assert [rows_per_output_shard(n, 1024) for n in (4096, 5000, 100, None)] == [
        4096, 5000, 100, 10240,
    ]  # fmt: skip
    assert rows_per_output_shard(None, 1024, 28 * 28) == 10240
    assert rows_per_output_shard(None, 1024, 512 * 512 * 3) == 682  # under a store shard
    assert rows_per_output_shard(None, 64, 512 * 512 * 3) == 640  # whole store shards
    # fewer rows than 32 full shards: spread over 32 shards of at least 32 rows, in whole
    # store shards or chunks when that leaves one
    spread = [rows_per_output_shard(None, 1024, 28 * 28, count=n, chunk_rows=128)
              for n in (100, 5000, 40_000, 1_000_000)]  # fmt: skip
    assert spread == [32, 128, 1024, 10240]
    assert rows_per_output_shard(None, 1024, 256 * 256 * 3, count=128, chunk_rows=128) == 32
    assert rows_per_output_shard(None, 16, 28 * 28, count=5000, chunk_rows=8) == 144
    out = tmp_path / "two"
    decode(seed_model, str(mnist_store), str(out), images_per_shard=4096, client=client)
    table = [json.loads(line) for line in (out / "shards.jsonl").read_text().splitlines()]
    assert [(r["start"], r["stop"]) for r in table] == [(0, 4096), (4096, 5000)]
    ids, images = read_output(str(out))
    assert ids == read_output(str(mnist_tar))[0]  # every id once, in row order
    assert len(set(ids)) == 5000
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as one:  # fmt: skip
        decode(seed_model, str(mnist_store), str(tmp_path / "one"), images_per_shard=4096,
               client=one)  # fmt: skip
    assert sha256s(tmp_path / "one") == sha256s(out)
    before = sha256s(out)
    with pytest.raises(OutputError, match="rows_per_shard=4096"):
        decode(seed_model, str(mnist_store), str(out), images_per_shard=2048, client=client)
    assert sha256s(out) == before
    zarr_out = tmp_path / "zarr"
    decode(seed_model, str(mnist_store), str(zarr_out), fmt="zarr", images_per_shard=4096,
           client=client)  # fmt: skip
    assert zarr.open_array(str(zarr_out / "images.zarr")).shards == (4096, 28, 28, 1)
    np.testing.assert_array_equal(read_output(str(zarr_out))[1], images)


@pytest.mark.parametrize("fmt", ["tar", "zarr"])
def test_images_per_shard_below_the_store_shards_is_honoured(
    tmp_path: Path, mnist_store: Path, mnist_tar: Path, seed_model: Path, client: Client, fmt: str
) -> None:
    """300 images per output shard over 1,024-row store shards: shards of 300 rows (tasks
    read parts of store shards), every id once and the same images as whole-shard tasks."""
    out = tmp_path / fmt
    decode(seed_model, str(mnist_store), str(out), fmt=fmt, images_per_shard=300, client=client)  # type: ignore[arg-type]
    table = [json.loads(line) for line in (out / "shards.jsonl").read_text().splitlines()]
    assert [r["stop"] - r["start"] for r in table] == [300] * 16 + [200]
    ids, images = read_output(str(out))
    reference_ids, reference = read_output(str(mnist_tar))
    assert ids == reference_ids
    np.testing.assert_array_equal(images, reference)


def test_an_output_continues_with_the_shard_size_it_was_begun_with(
    tmp_path: Path, mnist_tar: Path, mnist_store: Path, seed_model: Path, client: Client
) -> None:
    """Before --images-per-shard, an output held one shard per store shard and its
    manifest said nothing of it: the default continues it with the store's shard rows,
    rewriting no shard (today's default for 5,000 rows would be 128); another explicit
    size is refused, naming the size it has. A decode interrupted before its manifest
    continues with the size of its finished shards' records."""
    out = Path(shutil.copytree(mnist_tar, tmp_path / "old"))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["format_settings"]["rows_per_shard"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sha256s(out)
    with pytest.raises(OutputError, match="rows_per_shard=1024"):
        decode(seed_model, str(mnist_store), str(out), images_per_shard=2048, client=client)
    assert sha256s(out) == before
    again = decode(seed_model, str(mnist_store), str(out), client=client)
    assert again.shards_written == () and again.manifest.format_settings is not None
    assert again.manifest.format_settings["rows_per_shard"] == 1024

    interrupted = Path(shutil.copytree(mnist_tar, tmp_path / "interrupted"))
    for name in ("manifest.json", "shards.jsonl", "shard-000003.tar"):
        (interrupted / name).unlink()
    resumed = decode(seed_model, str(mnist_store), str(interrupted), client=client)
    assert resumed.shards_written == (3,)
    assert sha256s(interrupted) == sha256s(mnist_tar)


def test_a_codec_store_holds_int8_symbols_and_decodes_as_its_model_does(
    tmp_path: Path, tiny_codec_model: Path, client: Client
) -> None:
    store_url = str(tmp_path / "codec.zarr")
    encode(tiny_codec_model, "synthetic:40", store_url, client=client, layout=Layout(16, 8))
    store = open_store(store_url)
    symbols = store.read_latents(0, 40)
    assert symbols.dtype == np.int8 and store.meta["format"] == 2
    model, info = load_model(tiny_codec_model)
    assert store.quantization == info.quantization
    originals = to_unit(torch.from_numpy(open_source("synthetic:40", Geometry(16, 1)).read(0, 40)))
    with torch.inference_mode():
        expected = model.encoder(originals)
    np.testing.assert_array_equal(symbols, expected.numpy().astype(np.int8))
    result = decode(tiny_codec_model, store_url, str(tmp_path / "out"), client=client)
    assert result.canary == "exact"
    _, images = read_output(str(tmp_path / "out"))
    decoder, _ = load_model(tiny_codec_model, "decoder")
    direct = decode_latents(decoder, symbols.astype(np.float32), torch.device("cpu"))
    np.testing.assert_array_equal(images, direct)
    # the PSNR each row was stored with is that of the decoded image
    decoded = to_unit(torch.from_numpy(images))
    per_image = psnr_per_image(originals, decoded).numpy()
    np.testing.assert_allclose(store.read_quality(0, 40), per_image, rtol=1e-5)


def test_a_format_one_store_of_the_previous_release_decodes_and_appends(
    tmp_path: Path, client: Client
) -> None:
    fixture = Path(__file__).parent / "data" / "format1"
    shutil.copytree(fixture, tmp_path / "format1")
    model_dir, store_url = tmp_path / "format1" / "model", str(tmp_path / "format1" / "store.zarr")
    result = decode(model_dir, store_url, str(tmp_path / "out"), client=client)
    assert result.canary == "exact" and result.count == 20
    ids, images = read_output(str(tmp_path / "out"))
    assert len(ids) == 20 and images.shape == (20, 16, 16, 1)
    encode(model_dir, "digits", store_url, append=True, limit=6, client=client)
    store = open_store(store_url)
    assert store.count == 26 and store.meta["format"] == 1  # appends keep its format
    assert store.latents.dtype == np.float16 and store.quantization is None


def test_a_small_collection_gives_every_worker_work(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    """128 rows in one 1,024-row store shard: by default 4 output shards of 32 rows (tasks
    that read part of a store shard, at least 2 x 2 workers), the same images as one
    shard; an explicit size below the store's shard rows writes shards of that size."""
    store = str(tmp_path / "small.zarr")
    encode(tiny_model, "synthetic:128", store, client=client)
    assert open_store(store).shard_rows == 1024
    spread = decode(tiny_model, store, str(tmp_path / "spread"), client=client)
    assert spread.shards_written == (0, 1, 2, 3)
    table = [json.loads(line) for line in (tmp_path / "spread" / "shards.jsonl").open()]
    assert [(r["start"], r["stop"]) for r in table] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    decode(tiny_model, store, str(tmp_path / "one"), images_per_shard=128, client=client)
    assert read_output(str(tmp_path / "spread"))[0] == read_output(str(tmp_path / "one"))[0]
    np.testing.assert_array_equal(
        read_output(str(tmp_path / "spread"))[1], read_output(str(tmp_path / "one"))[1]
    )
    decode(tiny_model, store, str(tmp_path / "fifty"), images_per_shard=50, client=client)
    table = [json.loads(line) for line in (tmp_path / "fifty" / "shards.jsonl").open()]
    assert [(r["start"], r["stop"]) for r in table] == [(0, 50), (50, 100), (100, 128)]


def test_a_decode_records_what_shaped_its_pixels(
    tmp_path: Path, mnist_store: Path, seed_model: Path, client: Client, process_client: Client
) -> None:
    """The manifest records the decoder's dtype, TF32 and cuDNN flags, the rounding rule,
    the versions and the device (verify ignores them); the batch-invariance check decodes
    the canary rows one at a time and in one batch: 0 levels apart on CPU for the seed
    model, on worker processes of one torch thread each, as the embedded cluster's are
    (on this test suite's in-process threads, sharing the process's torch threads with
    other work, it once found 1 level under load)."""
    from latentbatch.outputs.verify import verify_output

    out = tmp_path / "recorded"
    result = decode(seed_model, str(mnist_store), str(out), images_per_shard=1024,
                    batch_invariance_check=True, client=process_client)  # fmt: skip
    assert result.batch_invariance == 0
    recorded = json.loads((out / "manifest.json").read_text())["environment"]
    assert recorded["batch_invariance_levels"] == 0
    (setting,) = recorded["settings"]  # both workers alike
    assert setting["decoder_dtype"] == "float32" and setting["device"].startswith("cpu")
    assert {"tf32_matmul", "tf32_cudnn", "cudnn", "rounding", "versions"} <= set(setting)
    assert setting["versions"]["torch"] == torch.__version__
    assert "round half to even" in setting["rounding"]
    assert verify_output(str(out), store_url=str(mnist_store)).ok
    again = decode(seed_model, str(mnist_store), str(out), images_per_shard=1024, client=client)
    assert again.shards_written == ()  # nothing decoded: the record is kept
    assert json.loads((out / "manifest.json").read_text())["environment"] == recorded


def test_a_model_that_overflows_float16_is_decoded_again_in_fp32_and_counted(
    tmp_path: Path, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--precision fp16`` of a model whose activations overflow float16 (on CPU by a
    cast copy): every batch is decoded again in fp32, the summary says so in a sentence
    and the manifest counts the batches; the images are the fp32 decode's. ``auto`` runs
    fp32 on CPU."""
    from latentbatch.cli import main
    from latentbatch.uses.import_latents import import_latents
    from tests.helpers import save_overflowing_kl_vae

    model = save_overflowing_kl_vae(tmp_path / "overflows")
    latents = np.random.default_rng(6).standard_normal((12, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "rows.npy", latents)
    store = str(tmp_path / "s.zarr")
    import_latents(model, str(tmp_path / "rows.npy"), store, client=client)
    fp32 = decode(model, store, str(tmp_path / "fp32"), fmt="png", client=client)
    assert fp32.batches > 0 and fp32.fp32_again == 0
    environment = json.loads((tmp_path / "fp32" / "manifest.json").read_text())["environment"]
    assert environment["settings"][0]["decoder_dtype"] == "float32"
    assert environment["precision"] == {"asked": "auto", "batches": fp32.batches, "fp32_again": 0}
    out = str(tmp_path / "fp16")
    argv = ["decode", "--model", str(model), "--store", store, "--out", out, "--format", "png",
            "--precision", "fp16", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "held NaN or Inf in reduced precision and was decoded again in fp32: decode " in err
    environment = json.loads((tmp_path / "fp16" / "manifest.json").read_text())["environment"]
    assert environment["settings"][0]["decoder_dtype"] == "float16 (a cast copy)"
    counted = environment["precision"]
    assert counted["asked"] == "fp16" and counted["batches"] == counted["fp32_again"] > 0
    np.testing.assert_array_equal(
        read_output(str(tmp_path / "fp16"))[1], read_output(str(tmp_path / "fp32"))[1]
    )
    bad = ["decode", "--model", str(model), "--store", store, "--out", str(tmp_path / "bad"),
           "--precision", "fp8", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(bad) == 1
    assert "--precision 'fp8' is not one of auto, fp32, bf16, fp16" in capsys.readouterr().err


class _StoppedError(Exception):
    """What kills a decode part-way in a test."""


def test_an_npz_output_is_what_evaluation_suites_read_and_resumes_to_the_same_bytes(
    tmp_path: Path, kl_vae: Path, client: Client
) -> None:
    """``--format npz``: 3,000 rows decoded by 2 workers into one ``samples.npz``, whose
    ``arr_0`` (uint8 N×H×W×3, a stored zip64 member) and ``arr_1`` (labels) numpy.load
    and a streaming zipfile read back equal to the tar output's images; a decode stopped
    after a few parts resumes to the same bytes, and verify checks the file."""
    import hashlib
    import zipfile

    from latentbatch.outputs.verify import verify_output
    from latentbatch.uses.import_latents import import_latents

    rng = np.random.default_rng(7)
    latents = rng.standard_normal((3000, 4, 2, 2)).astype(np.float32)  # 16x16 images
    labels = rng.integers(0, 10, 3000)
    np.savez(tmp_path / "rows.npz", latents=latents, labels=labels)
    store = str(tmp_path / "s.zarr")
    import_latents(kl_vae, str(tmp_path / "rows.npz"), store, layout=Layout(500, 100),
                   client=client)  # fmt: skip
    tar = decode(kl_vae, store, str(tmp_path / "tar"), images_per_shard=500, client=client)
    npz = decode(kl_vae, store, str(tmp_path / "npz"), fmt="npz", images_per_shard=500,
                 client=client)  # fmt: skip
    assert npz.shards_written == tar.shards_written == tuple(range(6))
    images = read_output(str(tmp_path / "tar"))[1]
    path = tmp_path / "npz" / "samples.npz"
    assert not list((tmp_path / "npz").glob("shard-*"))  # the parts are in the npz, and gone
    assert not list((tmp_path / "npz").glob(".records/*"))
    with np.load(path) as found:
        assert found["arr_0"].dtype == np.uint8 and found["arr_0"].shape == (3000, 16, 16, 3)
        np.testing.assert_array_equal(found["arr_0"], images)
        np.testing.assert_array_equal(found["arr_1"], labels)
    with zipfile.ZipFile(path) as archive:  # streamed: a block at a time, never whole
        info = archive.getinfo("arr_0.npy")
        assert info.compress_type == zipfile.ZIP_STORED
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            assert version == (1, 0)
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            assert shape == (3000, 16, 16, 3) and dtype == np.uint8
            blocks = list(iter(lambda: stream.read(65536), b""))
        streamed = np.frombuffer(b"".join(blocks), np.uint8).reshape(shape)
        np.testing.assert_array_equal(streamed, images)
    assert verify_output(str(tmp_path / "npz")).ok
    whole = hashlib.sha256(path.read_bytes()).hexdigest()

    again = decode(kl_vae, store, str(tmp_path / "npz"), fmt="npz", client=client)
    assert again.shards_written == () and again.decoded == 0  # finished: nothing to do
    assert hashlib.sha256(path.read_bytes()).hexdigest() == whole

    def stop_after_two(progress: Progress) -> None:
        if progress.done_tasks == 2:
            raise _StoppedError

    out = str(tmp_path / "stopped")
    with pytest.raises(_StoppedError):
        decode(kl_vae, store, out, fmt="npz", images_per_shard=500, client=client,
               on_progress=stop_after_two, max_in_flight=1)  # fmt: skip
    assert not (tmp_path / "stopped" / "samples.npz").exists()
    resumed = decode(kl_vae, store, out, fmt="npz", images_per_shard=500, client=client)
    assert len(resumed.shards_skipped) == 2 and len(resumed.shards_written) == 4
    assert hashlib.sha256((tmp_path / "stopped" / "samples.npz").read_bytes()).hexdigest() == whole

    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [p.kind for p in verify_output(str(tmp_path / "npz")).problems] == ["sha256"]
