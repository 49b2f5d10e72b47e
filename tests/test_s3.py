"""Stores and outputs on an S3 endpoint (moto on 127.0.0.1) behave like local ones."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
from distributed import Client

from latentbatch.cli import main
from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.errors import CheckpointError
from latentbatch.ids import short_id
from latentbatch.models.checkpoint import CONFIG, MODEL_CACHE_ENV, WEIGHTS, model_id
from latentbatch.outputs.shards import read_output
from latentbatch.outputs.verify import verify_output
from latentbatch.stores.store import Layout, StoreError, open_store
from tests.servers import dask_cluster, moto_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(**options).mkdir("latentbatch")
        yield options


def test_encode_and_decode_on_s3_match_local(
    tmp_path: Path, tiny_model: Path, client: Client, s3: dict[str, Any]
) -> None:
    layout = Layout(16, 8)
    local_store, local_out = str(tmp_path / "s.zarr"), str(tmp_path / "out")
    encode(tiny_model, "synthetic:50", local_store, layout=layout, client=client)
    decode(tiny_model, local_store, local_out, client=client)

    remote_store, remote_out = "s3://latentbatch/stores/s.zarr", "s3://latentbatch/outputs/s"
    encode(
        tiny_model, "synthetic:50", remote_store, layout=layout, storage_options=s3, client=client
    )
    store = open_store(remote_store, s3)
    assert store.count == 50
    np.testing.assert_array_equal(
        store.read_latents(0, 50), open_store(local_store).read_latents(0, 50)
    )
    assert store.written_rows() == 50
    assert store.bytes_on_disk()["latents"] > 0

    result = decode(tiny_model, remote_store, remote_out, storage_options=s3, client=client)
    assert result.decoded == 50
    local_manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    fs = s3fs.S3FileSystem(**s3)
    remote_manifest = json.loads(fs.cat_file("latentbatch/outputs/s/manifest.json"))
    assert remote_manifest["shard_table"] == local_manifest["shard_table"]  # same shards
    table = fs.cat_file("latentbatch/outputs/s/shards.jsonl")
    assert table == (tmp_path / "out" / "shards.jsonl").read_bytes()
    ids, images = read_output(remote_out, s3)
    local_ids, local_images = read_output(local_out)
    assert ids == local_ids
    np.testing.assert_array_equal(images, local_images)

    again = decode(tiny_model, remote_store, remote_out, storage_options=s3, client=client)
    assert again.shards_written == ()

    # npz: the parts streamed into one object by a multipart upload, the parts removed
    remote_npz, local_npz = "s3://latentbatch/outputs/npz", str(tmp_path / "npz")
    decode(tiny_model, local_store, local_npz, fmt="npz", client=client)
    decode(tiny_model, remote_store, remote_npz, fmt="npz", storage_options=s3, client=client)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("latentbatch/outputs/npz", detail=False)
            if "shard-" in p] == []  # fmt: skip
    np.testing.assert_array_equal(read_output(remote_npz, s3)[1], read_output(local_npz)[1])
    assert verify_output(remote_npz, s3).ok


def test_missing_remote_store_is_named(s3: dict[str, Any]) -> None:
    with pytest.raises(StoreError, match=r"s3://latentbatch/nothing\.zarr does not exist"):
        open_store("s3://latentbatch/nothing.zarr", s3)


def test_cli_on_s3(
    tmp_path: Path, tiny_model: Path, s3: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    opts = [f"--storage-option=endpoint_url={s3['endpoint_url']}", "--storage-option=key=testing"]
    opts += ["--storage-option=secret=testing"]
    store = "s3://latentbatch/cli/digits.zarr"
    common = ["--no-progress", "--json", "--workers", "1"]
    argv = [
        "encode",
        "--model",
        str(tiny_model),
        "--data",
        "digits",
        "--limit",
        "40",
        "--store",
        store,
    ]
    assert main([*argv, *opts, *common]) == 0
    assert json.loads(capsys.readouterr().out)["encoded"] == 40
    assert main(["inspect", store, "--bytes", *opts, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 40
    assert report["bits_per_pixel"] > 0
    argv = [
        "decode",
        "--model",
        str(tiny_model),
        "--store",
        store,
        "--out",
        "s3://latentbatch/cli/out",
    ]
    assert main([*argv, "--format", "png", *opts, *common]) == 0
    assert json.loads(capsys.readouterr().out)["decoded"] == 40


def _decode_on_a_cli_cluster(
    tmp_path: Path, model: str, store: str, out: str, s3: dict[str, Any]
) -> Path:
    """``latentbatch decode --model MODEL`` of ``store`` into ``out`` on a CLI-started
    cluster of two workers whose model cache is empty; returns that cache."""
    cache = tmp_path / "worker-cache"
    with dask_cluster(tmp_path, workers=2, worker_env={MODEL_CACHE_ENV: str(cache)}) as (
        address,
        _,
    ):
        argv = ["decode", "--model", model, "--store", store, "--out", out]
        argv += [f"--storage-option={k}={v}" for k, v in s3.items()]
        assert main([*argv, "--scheduler", address, "--no-progress"]) == 0
    return cache


def test_a_model_on_s3_decodes_on_a_cli_cluster_and_altered_weights_are_refused(
    tmp_path: Path, tiny_model: Path, client: Client, s3: dict[str, Any]
) -> None:
    """The workers of a CLI-started cluster have no copy of the model: each host fetches
    it from S3 into its cache once, checked by id; weights altered on S3 afterwards are
    refused by the workers, naming the expected and the actual id, and nothing is
    written."""
    fs = s3fs.S3FileSystem(**s3)
    for name in (WEIGHTS, CONFIG):
        fs.pipe_file(f"latentbatch/models/tiny/{name}", (tiny_model / name).read_bytes())
    url, store = "s3://latentbatch/models/tiny", "s3://latentbatch/m/store.zarr"
    expected = model_id(tiny_model)
    encode(url, "synthetic:40", store, layout=Layout(16, 8), storage_options=s3, client=client)
    decode(tiny_model, store, "s3://latentbatch/m/local", storage_options=s3, client=client)
    cache = _decode_on_a_cli_cluster(tmp_path, url, store, "s3://latentbatch/m/out", s3)
    assert sorted(p.name for p in (cache / expected).iterdir()) == [CONFIG, WEIGHTS]
    assert fs.cat_file("latentbatch/m/out/shards.jsonl") == fs.cat_file(
        "latentbatch/m/local/shards.jsonl"
    )  # the same shards, byte for byte, as the local model's decode

    weights = bytearray((tiny_model / WEIGHTS).read_bytes())
    weights[-1] ^= 1
    fs.pipe_file(f"latentbatch/models/tiny/{WEIGHTS}", bytes(weights))
    actual = hashlib.sha256(weights).hexdigest()
    with (
        dask_cluster(
            tmp_path, workers=2, worker_env={MODEL_CACHE_ENV: str(tmp_path / "fresh-cache")}
        ) as (address, _),
        pytest.raises(CheckpointError) as refused,
    ):
        decode(url, store, "s3://latentbatch/m/altered", storage_options=s3, scheduler=address)
    message = str(refused.value)
    assert re.search(r"Dask worker w\d refused the model", message), message
    assert f"have id {short_id(actual)}, not the expected {short_id(expected)}" in message
    assert not fs.exists("latentbatch/m/altered/shards.jsonl")
    assert not [p for p in fs.find("latentbatch/m/altered") if p.endswith(".tar")]
    assert not (tmp_path / "fresh-cache" / expected).exists()


def test_a_diffusers_model_on_s3_decodes_on_a_cli_cluster(
    tmp_path: Path, kl_vae: Path, client: Client, s3: dict[str, Any]
) -> None:
    """A diffusers directory on S3: its id is the sha256 of its weights, read once by the
    client; each worker host fetches the directory into its cache, checked by that id,
    and the decode equals the local directory's."""
    from latentbatch.models.checkpoint import read_info

    fs = s3fs.S3FileSystem(**s3)
    weights = "diffusion_pytorch_model.safetensors"
    for name in (weights, CONFIG):
        fs.pipe_file(f"latentbatch/models/kl/{name}", (kl_vae / name).read_bytes())
    url, store = "s3://latentbatch/models/kl", "s3://latentbatch/kl/store.zarr"
    info = read_info(url, s3)
    assert info.model_id == read_info(kl_vae).model_id and info.weights == weights
    encode(url, "synthetic:6", store, layout=Layout(4, 2), storage_options=s3, client=client)
    decode(kl_vae, store, "s3://latentbatch/kl/local", storage_options=s3, client=client)
    cache = _decode_on_a_cli_cluster(tmp_path, url, store, "s3://latentbatch/kl/out", s3)
    assert sorted(p.name for p in (cache / info.model_id).iterdir()) == [CONFIG, weights]
    assert fs.cat_file("latentbatch/kl/out/shards.jsonl") == fs.cat_file(
        "latentbatch/kl/local/shards.jsonl"
    )


def _sources(folder: Path) -> dict[str, Path]:
    """One small source of every layout import reads (4x4x4 latents, as the small
    AutoencoderKL makes for 32x32 images), labelled where the layout holds labels."""
    import io
    import tarfile
    import zipfile

    import torch
    import zarr
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    latents = rng.standard_normal((6, 4, 4, 4), dtype=np.float32)
    made: dict[str, Path] = {}
    edm2 = folder / "edm2"
    names = [f"{i // 3:05d}/img{i:08d}.npy" for i in range(6)]
    for name, latent in zip(names, latents, strict=True):
        (edm2 / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(edm2 / name, np.concatenate([latent, np.full_like(latent, 0.01)]))
    (edm2 / "dataset.json").write_text(json.dumps({"labels": [[n, 3] for n in names[:4]]}))
    made["edm2-folder"] = edm2
    made["edm2-zip"] = folder / "edm2.zip"
    with zipfile.ZipFile(made["edm2-zip"], "w") as archive:
        for path in sorted(edm2.rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(edm2)))
    for i, latent in enumerate(latents):
        (folder / "mar" / f"n0{i % 2}").mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "mar" / f"n0{i % 2}" / f"img{i}.npz", moments=np.concatenate([latent] * 2)
        )
    made["mar-npz-files"] = folder / "mar"
    np.save(folder / "rows.npy", latents.astype(np.float16))
    made["npy"] = folder / "rows.npy"
    np.savez(folder / "stored.npz", latents=latents, labels=np.arange(6))
    made["npz"] = folder / "stored.npz"
    np.savez_compressed(folder / "packed.npz", latents=latents)
    made["npz-compressed"] = folder / "packed.npz"
    tensors = folder / "tensors"
    tensors.mkdir()
    save_file({"latents": torch.from_numpy(latents[:4]).to(torch.bfloat16),
               "labels": torch.tensor([7, 8, 9, 10])}, str(tensors / "a.safetensors"))  # fmt: skip
    save_file({f"img-{i}": torch.from_numpy(latents[i]) for i in (4, 5)},
              str(tensors / "b.safetensors"))  # fmt: skip
    made["safetensors"] = tensors
    made["webdataset"] = folder / "wds-000000.tar"
    with tarfile.open(made["webdataset"], "w") as tar:
        for i, latent in enumerate(latents):
            buffer = io.BytesIO()
            np.save(buffer, latent)
            for name, data in ((f"s{i}.npy", buffer.getvalue()), (f"s{i}.cls", b"%d" % i)):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    group = zarr.open_group(str(folder / "group.zarr"), mode="w")
    group.create_array("latents", shape=latents.shape, chunks=(4, 4, 4, 4), dtype="float32")[:] = (
        latents
    )
    group.create_array("labels", shape=(6,), dtype="int64")[:] = np.arange(6) % 2
    made["zarr"] = folder / "group.zarr"
    return made


def test_every_import_layout_reads_from_s3_as_from_disk(
    tmp_path: Path, kl_vae: Path, client: Client, s3: dict[str, Any]
) -> None:
    """Each layout put on S3 and imported from its s3:// URL (the store on S3 too) holds
    the rows, ids and labels of the same files imported from disk, and decodes to the
    same images."""
    from latentbatch.decode import decode_rows
    from latentbatch.models.weights import loaded
    from latentbatch.uses.import_latents import Convention, import_latents

    kinds = {
        "edm2-folder": "npy-files", "edm2-zip": "npy-zip", "mar-npz-files": "npz-files",
        "npy": "array", "npz": "array", "npz-compressed": "array",
        "safetensors": "safetensors", "webdataset": "webdataset", "zarr": "zarr",
    }  # fmt: skip
    labelled = {"edm2-folder", "edm2-zip", "mar-npz-files", "npz", "safetensors", "webdataset",
                "zarr"}  # fmt: skip
    fs = s3fs.S3FileSystem(**s3)
    model = loaded(kl_vae)
    for name, source in _sources(tmp_path / "sources").items():
        remote = f"latentbatch/sources/{source.name}"
        fs.put(str(source), remote, recursive=source.is_dir())
        raw: Convention = (
            "raw" if name in ("edm2-folder", "edm2-zip", "mar-npz-files") else "scaled"
        )
        local_url = str(tmp_path / f"{name}.zarr")
        import_latents(kl_vae, str(source), local_url, latents=raw, client=client)
        remote_url = f"s3://latentbatch/imports/{name}.zarr"
        result = import_latents(kl_vae, f"s3://{remote}", remote_url, latents=raw,
                                storage_options=s3, client=client)  # fmt: skip
        local, there = open_store(local_url), open_store(remote_url, s3)
        assert result.layout == kinds[name], name
        assert there.meta["lineage"]["parameters"]["from"] == f"s3://{remote}"
        assert (set(there.read_labels(0, 6).tolist()) != {-1}) == (name in labelled), name
        assert there.count == local.count == 6, name
        assert there.read_ids(0, 6) == local.read_ids(0, 6), name
        assert there.read_labels(0, 6).tolist() == local.read_labels(0, 6).tolist(), name
        assert there.read_latents(0, 6).tobytes() == local.read_latents(0, 6).tobytes(), name
        np.testing.assert_array_equal(
            decode_rows(model, there, range(6)), decode_rows(model, local, range(6))
        )


def test_two_decodes_starting_into_one_s3_output_at_once(
    tmp_path: Path, tiny_model: Path, client: Client, s3: dict[str, Any]
) -> None:
    """Two processes start a decode into one output on S3 at the same moment (its lease
    is a PUT with If-None-Match: *): one writes, the other is refused in one sentence
    naming the holder, and the output verifies against the store that was decoded."""
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("latentbatch"))
    stores = []
    for name, data in (("a", "synthetic:600"), ("b", "digits")):
        url = f"s3://latentbatch/race/{name}.zarr"
        encode(tiny_model, data, url, limit=600, layout=Layout(128, 64), storage_options=s3,
               client=client)  # fmt: skip
        stores.append(url)
    out = "s3://latentbatch/race/out"
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    commands = [
        [cli, "decode", "--model", str(tiny_model), "--store", store, "--out", out,
         "--images-per-shard", "128", "--workers", "1", "--no-progress", *options]
        for store in stores
    ]  # fmt: skip
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    err = next(r[2] for r in results if r[0] == 1)
    assert err.startswith(f"error: {out} is being written by another decode of ")
    assert " by process " in err and len(err.strip().splitlines()) == 1
    winner = stores[next(i for i, r in enumerate(results) if r[0] == 0)]
    verified = subprocess.run(
        [cli, "verify", out, "--store", winner, "--full", *options], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
