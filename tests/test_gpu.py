"""Decoding on CUDA. Skipped without a CUDA device (see conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from latentbatch.decode import decode
from latentbatch.engine.cluster import connect, gpu_resources
from latentbatch.engine.kernel import decode_latents
from latentbatch.engine.workers import loaded_models
from latentbatch.models.weights import load_model
from latentbatch.outputs.shards import read_output
from latentbatch.stores.store import open_store
from tests.helpers import sha256s

pytestmark = pytest.mark.gpu

# float16 autocast against float32: pixels may differ by rounding, never by more than this
MAX_PIXEL_DIFFERENCE = 3
MEAN_PIXEL_DIFFERENCE = 0.05


def test_cuda_decode_matches_cpu_within_tolerance(mnist_store: Path, seed_model: Path) -> None:
    latents = open_store(str(mnist_store)).read_latents(0, 2048)
    cpu_decoder, _ = load_model(seed_model, "decoder")
    gpu_decoder, _ = load_model(seed_model, "decoder", "cuda")
    cpu = decode_latents(cpu_decoder, latents, torch.device("cpu")).astype(int)
    gpu = decode_latents(gpu_decoder, latents, torch.device("cuda")).astype(int)
    difference = np.abs(cpu - gpu)
    assert difference.max() <= MAX_PIXEL_DIFFERENCE
    assert difference.mean() <= MEAN_PIXEL_DIFFERENCE


def test_embedded_cluster_puts_decode_on_gpu_workers(
    tmp_path: Path, mnist_store: Path, seed_model: Path
) -> None:
    with connect() as client:
        assert gpu_resources(client) == {"GPU": 1}
        decode(seed_model, str(mnist_store), str(tmp_path / "out"), client=client)
        loaded = client.run(loaded_models)
    assert loaded
    assert all([device for _, _, device in models] == ["cuda"] for models in loaded.values())
    _, images = read_output(str(tmp_path / "out"))
    cpu_decoder, _ = load_model(seed_model, "decoder")
    cpu = decode_latents(
        cpu_decoder, open_store(str(mnist_store)).read_latents(0, 5000), torch.device("cpu")
    )
    assert np.abs(images.astype(int) - cpu.astype(int)).max() <= MAX_PIXEL_DIFFERENCE


def test_cuda_decode_is_byte_identical_across_runs(
    tmp_path: Path, mnist_store: Path, seed_model: Path
) -> None:
    with connect() as client:
        for name in ("first", "second"):
            decode(seed_model, str(mnist_store), str(tmp_path / name), client=client)
    assert sha256s(tmp_path / "first") == sha256s(tmp_path / "second")


def test_embedded_cluster_has_one_worker_per_gpu() -> None:
    with connect() as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert len(workers) == torch.cuda.device_count()
        assert all(w["resources"].get("GPU") == 1 for w in workers)


def test_embedded_cluster_pins_each_worker_to_its_own_device() -> None:
    def seen() -> str:  # the device this worker decodes on: its first visible one
        return str(torch.cuda.get_device_properties(0).uuid)

    with connect() as client:
        pinned = list(client.run(seen).values())
    assert len(pinned) == torch.cuda.device_count()
    assert len(set(pinned)) == len(pinned)  # never all on cuda:0 (dask-cuda or not)


@pytest.mark.parametrize("by", ["index", "uuid"])
def test_workers_decode_on_the_device_the_host_gave_us(
    by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inherited CUDA_VISIBLE_DEVICES, by index and by UUID, is what the workers use."""
    last = torch.cuda.device_count() - 1
    uuid = f"GPU-{torch.cuda.get_device_properties(last).uuid}"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(last) if by == "index" else uuid)

    def seen() -> tuple[str | None, str]:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), str(torch.cuda.get_device_properties(0).uuid)

    with connect() as client:
        found = list(client.run(seen).values())
    assert len(found) == 1
    assert found[0][1] == uuid.removeprefix("GPU-")


def test_pipelined_cuda_decode_hands_batches_on_in_order(
    mnist_store: Path, seed_model: Path
) -> None:
    latents = open_store(str(mnist_store)).read_latents(0, 1000)
    decoder, _ = load_model(seed_model, "decoder", "cuda")
    handed: list[np.ndarray] = []
    images = decode_latents(decoder, latents, torch.device("cuda"), 384, handed.append)
    assert [len(b) for b in handed] == [384, 384, 232]
    np.testing.assert_array_equal(np.concatenate(handed), images)
    cpu_decoder, _ = load_model(seed_model, "decoder")
    cpu = decode_latents(cpu_decoder, latents, torch.device("cpu")).astype(int)
    assert np.abs(images.astype(int) - cpu).max() <= MAX_PIXEL_DIFFERENCE


def test_two_workers_sharing_a_gpu_write_the_same_bytes(
    tmp_path: Path, mnist_store: Path, seed_model: Path
) -> None:
    from distributed import Client

    from latentbatch.engine.cluster import gpu_cluster

    with connect() as client:
        decode(seed_model, str(mnist_store), str(tmp_path / "one"), images_per_shard=1024,
               client=client)  # fmt: skip
    with gpu_cluster(2) as cluster, Client(cluster) as client:
        decode(seed_model, str(mnist_store), str(tmp_path / "two"), images_per_shard=1024,
               client=client)  # fmt: skip
    assert sha256s(tmp_path / "one") == sha256s(tmp_path / "two")


def test_a_codec_store_encoded_on_cuda_decodes_on_cpu_within_its_canary(
    tmp_path: Path, tiny_codec_model: Path
) -> None:
    """Integer latents go to the GPU as int8 and are decoded in float16 autocast; the
    canary a GPU encode records must hold for a CPU decode (or stop it, never pass
    silently), and the pixels stay within the CUDA tolerance."""
    from latentbatch.decode import decode_rows
    from latentbatch.encode import encode

    store = str(tmp_path / "codec.zarr")
    with connect(None, 1) as client:  # a worker on this host's GPU
        encode(tiny_codec_model, "synthetic:64", store, client=client)
    opened = open_store(store)
    assert opened.meta["canary"]["device"].startswith("cuda")
    cpu = decode_rows(tiny_codec_model, opened, range(64)).astype(int)  # checks the canary
    gpu_decoder, _ = load_model(tiny_codec_model, "decoder", "cuda")
    latents = opened.read_latents(0, 64)
    gpu = decode_latents(gpu_decoder, latents, torch.device("cuda")).astype(int)
    assert np.abs(cpu - gpu).max() <= MAX_PIXEL_DIFFERENCE
