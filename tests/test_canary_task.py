"""The canary's worker task: a store's canary rows decoded on a worker or in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client

from latentbatch.encode import encode
from latentbatch.engine.canary_task import canary_on, canary_pixels
from latentbatch.engine.kernel import decode_latents
from latentbatch.engine.workers import register_model
from latentbatch.models.checkpoint import read_once
from latentbatch.models.weights import load_model
from latentbatch.stores.store import Layout, open_store


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("canary-task") / "s.zarr")
    encode(tiny_model, "synthetic:48", url, layout=Layout(16, 8), client=client)
    return url


def test_canary_rows_decode_in_row_order_across_store_shards(
    store_url: str, tiny_model: Path
) -> None:
    store = open_store(store_url)
    decoder, _ = load_model(tiny_model, "decoder")
    rows = [40, 3, 17, 18]  # three store shards, given out of order
    cpu = torch.device("cpu")
    decoded = canary_pixels(decoder, store, rows, cpu)
    expected = decode_latents(decoder, store.read("latents", sorted(rows)).astype("f4"), cpu)
    assert decoded.rows == (3, 17, 18, 40) and decoded.device == "cpu"
    np.testing.assert_array_equal(decoded.pixels, expected)


def test_a_worker_decodes_the_canary_as_this_process_does(
    store_url: str, tiny_model: Path, client: Client
) -> None:
    store = open_store(store_url)
    decoder, info = load_model(tiny_model, "decoder")
    register_model(client, read_once(tiny_model), "decoder")
    rows = store.meta["canary"]["rows"]
    decoded = canary_on(client, store, info.model_id, rows)
    here = canary_pixels(decoder, store, rows, torch.device("cpu"))
    assert decoded.device == "cpu" and decoded.rows == here.rows == tuple(rows)
    np.testing.assert_array_equal(decoded.pixels, here.pixels)


def test_a_nonfinite_canary_row_is_left_out_not_the_canary(
    tmp_path: Path, store_url: str, tiny_model: Path
) -> None:
    import shutil

    copy = str(shutil.copytree(store_url, tmp_path / "s.zarr"))
    store = open_store(copy, writable=True)
    latents = store.read_latents(0, 16)
    latents[5, 0, 0, 0] = np.nan
    store.latents[0:16] = latents
    decoder, _ = load_model(tiny_model, "decoder")
    decoded = canary_pixels(decoder, open_store(copy), [30, 5, 2], torch.device("cpu"))
    assert decoded.rows == (2, 30) and len(decoded.pixels) == 2
    latents[[2, 5], 0, 0, 0] = np.nan
    store.latents[0:16] = latents
    decoded = canary_pixels(decoder, open_store(copy), [2, 5], torch.device("cpu"))
    assert decoded.rows == () and len(decoded.pixels) == 0
