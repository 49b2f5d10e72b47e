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
