"""generate: new latents per label into a derived store, seeded and the same whatever
the workers; a derived store decodes, verifies and is listed like any store."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from PIL import Image

from latentbatch.cli import main
from latentbatch.config import ModelConfig
from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.outputs.verify import verify_output
from latentbatch.stores.store import Layout, create_store, open_store
from latentbatch.uses.derive import DeriveJob, write_part
from latentbatch.uses.fit import FIT, FitError
from latentbatch.uses.generation import GenerateError, SamplePart, generate
from tests.helpers import sd_sized_store


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    """The digits (labels 0-9) encoded by the tiny model, in shards of 64 rows."""
    url = str(tmp_path_factory.mktemp("generation") / "digits.zarr")
    encode(tiny_model, "digits", url, layout=Layout(64, 32), limit=600, client=client)
    return url


def _bytes(url: str) -> tuple[bytes, list[str], list[int]]:
    store = open_store(url)
    latents = store.read_latents(0, store.count)
    return (
        latents.tobytes(),
        store.read_ids(0, store.count),
        store.read_labels(0, store.count).tolist(),
    )


def test_samples_per_label_are_the_same_across_runs_and_workers(
    tmp_path: Path, digits: str, tiny_model: Path, client: Client, process_client: Client
) -> None:
    first, second = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    result = generate(digits, first, count=70, labels=[3, 8], seed=5, client=client)
    assert (result.rows, result.shards) == (140, 3)  # the parent's shards of 64 rows
    generate(digits, second, count=70, labels=[3, 8], seed=5, client=process_client)
    assert _bytes(first) == _bytes(second)  # two in-process workers, two processes
    latents, ids, labels = _bytes(first)
    assert ids[0] == "sample-L3-000000" and ids[-1] == "sample-L8-000069"
    assert labels == [3] * 70 + [8] * 70
    other = str(tmp_path / "c.zarr")
    generate(digits, other, count=70, labels=[3, 8], seed=6, client=client)
    assert _bytes(other)[0] != latents  # another seed, other samples
    store = open_store(first)
    lineage = store.meta["lineage"]
    assert lineage["operation"] == "generate" and lineage["seed"] == 5
    assert lineage["parameters"]["count"] == 70 and lineage["parameters"]["labels"] == [3, 8]
    assert lineage["parents"][0]["uuid"] == open_store(digits).uuid
    # samples of label 3 lie nearer the digits 3 than the digits 8, on average
    parent = open_store(digits)
    flat = parent.read_latents(0, parent.count).reshape(parent.count, -1).astype(np.float32)
    truth = parent.read_labels(0, parent.count)
    drawn = store.read_latents(0, 70).reshape(70, -1).astype(np.float32)
    to_three = np.linalg.norm(drawn - flat[truth == 3].mean(0), axis=1).mean()
    to_eight = np.linalg.norm(drawn - flat[truth == 8].mean(0), axis=1).mean()
    assert to_three < to_eight


def test_a_generated_store_decodes_verifies_and_is_listed(
    tmp_path: Path, digits: str, tiny_model: Path, client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url, out, grid = str(tmp_path / "g.zarr"), tmp_path / "out", tmp_path / "grid.png"
    argv = ["generate", "--from", digits, "--store", url, "--count", "12", "--label", "1",
            "--label", "7", "--model", str(tiny_model), "--grid", str(grid), "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 24 samples" in capsys.readouterr().out
    assert main(argv) == 0  # again: the same lineage, already whole
    assert "already holds this generate; nothing to do" in capsys.readouterr().out
    with Image.open(grid) as picture:  # a line of samples per label, scaled up
        assert picture.size[1] > picture.size[0] / 10
    decode(tiny_model, url, str(out), client=client)
    report = verify_output(str(out), store_url=url)
    assert report.ok and report.images == 24
    assert main(["inspect", url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["operation"] == "generate" and shown["count"] == 24
    assert main(["inspect", url]) == 0
    assert "lineage  generate of" in capsys.readouterr().out
    assert main(["stores", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["stores"]
    assert [e["derived"] for e in listed if e["store"].endswith("g.zarr")] == ["generate"]


def test_generate_refuses_what_it_cannot_draw(
    tmp_path: Path, digits: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(GenerateError, match="--count 0 must lie between 1"):
        generate(digits, str(tmp_path / "x.zarr"), count=0)
    with pytest.raises(FitError, match="label 12 has no rows"):
        generate(digits, str(tmp_path / "x.zarr"), count=3, labels=[12])
    argv = ["generate", "--from", digits, "--store", str(tmp_path / "x.zarr"), "--grid", "g.png"]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("error: --grid needs --model")
    assert not (tmp_path / "x.zarr").exists()


def test_a_generate_task_carries_the_stores_address_not_the_fit(
    tmp_path: Path, client: Client
) -> None:
    """A fit of 100 labels of 4x32x32 latents is ~8 MiB of float64; it is written into the
    derived store once, and each task (what Dask pickles and sends) stays under 64 KiB."""
    config = ModelConfig("compact", 1, 128, (4, 8), 4)
    assert config.latent_shape == (4, 32, 32)
    reference = create_store(
        str(tmp_path / "reference.zarr"), model_id="0" * 64, config=config, capacity=800,
        layout=Layout(400, 200),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for a in (0, 400):
        latents = rng.standard_normal((400, 4, 32, 32), dtype=np.float32)
        reference.write_rows(a, latents, [f"r{i}" for i in range(a, a + 400)], np.arange(400) % 100)
    reference.write_meta(count=800, labels=True)
    out = str(tmp_path / "samples.zarr")
    generate(reference.url, out, count=2, client=client)
    store = open_store(out)
    assert len(store.meta[FIT]["labels"]) == 100 and store.count == 200
    assert store.group["fit_label_means"].nbytes + store.group["fit_factors"].nbytes > 6 * 2**20
    part = SamplePart(
        store_url=out, uuid=store.uuid, storage_options={}, labels=tuple(range(100)), count=2,
        seed=0, temperature=1.0, start=0, stop=200,
    )  # fmt: skip
    task = pickle.dumps((write_part, DeriveJob(store_url=out, storage_options={}, start=0,
                                               stop=200, part=part)))  # fmt: skip
    assert len(task) < 64 * 2**10
    latents, ids, labels = part.make()  # the task makes the store's rows from the kept fit
    assert np.array_equal(latents.astype(np.float16), store.read_latents(0, 200))
    assert ids == store.read_ids(0, 200) and labels.tolist() == store.read_labels(0, 200).tolist()


def test_generate_and_shift_take_sd_sized_latents(tmp_path: Path, client: Client) -> None:
    """4x64x64 latents (16,384 values, SD's at 512 px; refused before): samples per label,
    and rows of label 0 shifted towards label 2 by each method."""
    from latentbatch.uses.manipulation import shift

    url, _ = sd_sized_store(tmp_path / "sd.zarr")
    samples = str(tmp_path / "samples.zarr")
    generate(url, samples, count=4, client=client)
    store = open_store(samples)
    assert store.count == 12 and store.latent_shape == (4, 64, 64)
    reference = open_store(url)
    flat = reference.read_latents(0, reference.count).reshape(reference.count, -1)
    labels = reference.read_labels(0, reference.count)
    target = flat[labels == 2].astype(np.float64).mean(axis=0)
    before = np.linalg.norm(flat[labels == 0].astype(np.float64).mean(axis=0) - target)
    for method in ("matching", "gaussian", "mean"):
        out = str(tmp_path / f"{method}.zarr")
        shift(url, out, from_label=0, to_label=2, method=method, client=client)  # type: ignore[arg-type]
        moved = open_store(out)
        after = moved.read_latents(0, moved.count).reshape(moved.count, -1)
        gap = np.linalg.norm(after.astype(np.float64).mean(axis=0) - target)
        assert moved.count == 100 and gap < before / 2, (method, gap, before)
