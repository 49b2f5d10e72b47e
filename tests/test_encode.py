from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client

from latentbatch.decode import decode_rows
from latentbatch.encode import encode
from latentbatch.engine.kernel import encode_images
from latentbatch.models.autoencoder import to_unit
from latentbatch.models.quality import psnr_per_image
from latentbatch.models.weights import load_model
from latentbatch.progress import Progress
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import Layout, StoreError, open_store


class InterruptError(Exception):
    pass


def test_encoded_store_holds_the_encoder_output(mnist_store: Path, seed_model: Path) -> None:
    store = open_store(str(mnist_store))
    assert store.count == store.capacity == 5000
    assert store.shards()[-1] == (4096, 5000)
    assert store.pending is None
    assert store.meta["sources"][0]["spec"] == "mnist5k"
    assert store.read_ids(0, 2) == ["mnist5k-00000", "mnist5k-00001"]
    source = open_source("mnist5k")
    np.testing.assert_array_equal(store.read_labels(0, 5000), source.labels)
    encoder, _ = load_model(seed_model, "encoder")
    expected = encode_images(encoder, source.read(4000, 4100), torch.device("cpu"))
    np.testing.assert_allclose(
        store.read_latents(4000, 4100).astype(np.float32), expected, rtol=2e-3, atol=2e-3
    )


def test_each_rows_psnr_is_what_a_decode_of_it_gives(mnist_store: Path, seed_model: Path) -> None:
    store = open_store(str(mnist_store))
    rows = list(range(0, 5000, 97))
    decoded = decode_rows(seed_model, store, rows)
    originals = open_source("mnist5k").read(0, 5000)[rows]
    expected = psnr_per_image(
        to_unit(torch.from_numpy(originals)), to_unit(torch.from_numpy(decoded))
    )
    np.testing.assert_allclose(store.read("quality", rows), expected.numpy(), rtol=0, atol=1e-4)
    assert not np.isnan(store.read_quality(0, 5000)).any()


def test_rerun_of_a_finished_encode_does_nothing(
    mnist_store: Path, seed_model: Path, client: Client
) -> None:
    result = encode(seed_model, "mnist5k", str(mnist_store), client=client)
    assert result.skipped
    assert open_store(str(mnist_store)).count == 5000


def test_append_then_refuse_duplicates(tmp_path: Path, tiny_model: Path, client: Client) -> None:
    url = str(tmp_path / "s.zarr")
    layout = Layout(16, 8)
    encode(tiny_model, "synthetic:40", url, layout=layout, client=client)
    result = encode(tiny_model, "digits", url, append=True, limit=30, client=client)
    assert result.rows == (40, 70)
    store = open_store(url)
    assert store.count == 70
    assert store.read_ids(38, 42) == [
        "synthetic-0000038",
        "synthetic-0000039",
        "digits-0000",
        "digits-0001",
    ]
    assert [s["rows"] for s in store.meta["sources"]] == [[0, 40], [40, 70]]
    first = open_store(str(tmp_path / "s.zarr")).read_latents(0, 40)
    fresh = str(tmp_path / "fresh.zarr")
    encode(tiny_model, "synthetic:40", fresh, layout=layout, client=client)
    np.testing.assert_array_equal(open_store(fresh).read_latents(0, 40), first)
    with pytest.raises(StoreError, match="ids of digits are already in"):
        encode(tiny_model, "digits", url, append=True, limit=5, client=client)
    with pytest.raises(StoreError, match="pass --append"):
        encode(tiny_model, "photos", url, client=client)


def test_interrupted_encode_resumes_to_the_same_store(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    layout = Layout(8, 4)
    whole = str(tmp_path / "whole.zarr")
    encode(tiny_model, "synthetic:100", whole, layout=layout, client=client)

    url = str(tmp_path / "cut.zarr")
    seen: list[Progress] = []

    def stop_after_three(progress: Progress) -> None:
        seen.append(progress)
        if progress.done_tasks == 3:
            raise InterruptError

    with pytest.raises(InterruptError):
        encode(
            tiny_model,
            "synthetic:100",
            url,
            layout=layout,
            client=client,
            on_progress=stop_after_three,
        )
    cut = open_store(url)
    assert cut.pending is not None
    assert cut.count < 100
    assert cut.count % 8 == 0
    with pytest.raises(StoreError, match="unfinished encode of synthetic:100"):
        encode(tiny_model, "digits", url, append=True, client=client)
    resumed = encode(tiny_model, "synthetic:100", url, layout=layout, client=client)
    assert resumed.resumed
    assert resumed.encoded == 100 - cut.count
    store = open_store(url)
    assert store.count == 100
    assert store.pending is None
    np.testing.assert_array_equal(
        store.read_latents(0, 100), open_store(whole).read_latents(0, 100)
    )
    assert store.read_ids(0, 100) == open_store(whole).read_ids(0, 100)


def test_store_of_another_model_is_refused(
    mnist_store: Path, other_seed_model: Path, client: Client
) -> None:
    with pytest.raises(StoreError, match=r"holds latents of model .* not of"):
        encode(other_seed_model, "digits", str(mnist_store), append=True, client=client)


def test_folder_source_encodes_on_workers(tmp_path: Path, tiny_model: Path, client: Client) -> None:
    from tests.helpers import write_image

    for i in range(5):
        write_image(tmp_path / "imgs" / f"k{i % 2}" / f"{i}.png", i, size=(20, 20), mode="L")
    url = str(tmp_path / "f.zarr")
    encode(tiny_model, f"folder:{tmp_path / 'imgs'}", url, layout=Layout(2, 1), client=client)
    store = open_store(url)
    assert store.read_ids(0, 5) == ["k0__0", "k0__2", "k0__4", "k1__1", "k1__3"]
    assert store.read_labels(0, 5).tolist() == [0, 0, 0, 1, 1]
    source = open_source(f"folder:{tmp_path / 'imgs'}", Geometry(16, 1))
    encoder, _ = load_model(tiny_model, "encoder")
    expected = encode_images(encoder, source.read(0, 5), torch.device("cpu"))
    np.testing.assert_allclose(
        store.read_latents(0, 5).astype(np.float32), expected, atol=2e-3, rtol=2e-3
    )
