"""The canary: rows decoded at encode time that every decode checks before writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import Client

from latentbatch.decode import decode, decode_rows
from latentbatch.encode import encode
from latentbatch.errors import LatentbatchError
from latentbatch.stores.canary import (
    CANARY_ROWS,
    CanaryError,
    canary_rows,
    check_canary,
    digest,
    has_canary,
    record_canary,
)
from latentbatch.stores.store import Layout, open_store
from tests.helpers import altered_model


@pytest.fixture(scope="module")
def canary_store(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("canary") / "s.zarr")
    encode(tiny_model, "synthetic:80", url, layout=Layout(16, 8), client=client)
    return url


def test_an_encode_records_the_canary_decoded(canary_store: str, tiny_model: Path) -> None:
    store = open_store(canary_store)
    assert has_canary(store)
    meta = store.meta["canary"]
    assert meta["rows"] == canary_rows(store) and len(meta["rows"]) == CANARY_ROWS
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    pixels = np.asarray(store.group["canary"][...])
    np.testing.assert_array_equal(pixels, decode_rows(tiny_model, store, meta["rows"]))
    assert digest(pixels) == meta["sha256"]
    attributes = json.loads((Path(canary_store) / "canary" / "zarr.json").read_text())
    assert attributes["dimension_names"] == ["canary", "image_y", "image_x", "image_channel"]


def test_the_same_decoder_decodes_the_canary_exactly(
    canary_store: str, tiny_model: Path, tmp_path: Path, client: Client
) -> None:
    result = decode(tiny_model, canary_store, str(tmp_path / "out"), client=client)
    assert result.canary == "exact" and result.to_dict()["canary"] == "exact"


def test_the_tolerance_takes_another_devices_numerics_and_no_more(canary_store: str) -> None:
    store = open_store(canary_store)
    pixels = np.asarray(store.group["canary"][...]).astype(np.int16)
    rng = np.random.default_rng(0)
    nudged = pixels + rng.integers(-1, 2, pixels.shape) * (rng.random(pixels.shape) < 0.1)
    nudged.flat[7] += 3  # CUDA float16 against CPU: up to 3 levels, 0.05 on average
    result = check_canary(store, np.clip(nudged, 0, 255).astype(np.uint8))
    assert result.status == "within" and result.max_levels <= 4
    assert str(result).startswith("within (max")
    broken = pixels.copy()
    broken.flat[7] += 40 if broken.flat[7] < 200 else -40
    with pytest.raises(CanaryError, match=f"{canary_store}: the canary drifted: .* 40 levels"):
        check_canary(store, broken.astype(np.uint8))
    shifted = np.clip(pixels + 1, 0, 255).astype(np.uint8)  # everything off by one level
    with pytest.raises(CanaryError, match=r"up to 1 levels \(mean 1\.000\)"):
        check_canary(store, shifted)


def test_altered_weights_past_the_id_check_are_stopped_by_the_canary(
    canary_store: str, tiny_model: Path, tmp_path: Path, client: Client
) -> None:
    altered = altered_model(tiny_model, tmp_path / "altered")
    out = tmp_path / "out"
    with pytest.raises(CanaryError, match=f"{canary_store}: the canary drifted") as stopped:
        decode(altered, canary_store, str(out), allow_model_mismatch=True, client=client)
    assert "beyond the tolerance of 4" in str(stopped.value)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_stores_without_a_canary_decode_as_before(
    tmp_path: Path, tiny_model: Path, client: Client, canary_store: str
) -> None:
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(canary_store, old)
    shutil.rmtree(old / "canary")
    store = open_store(str(old), writable=True)
    meta: dict[str, Any] = dict(store.meta)
    del meta["canary"]
    store.group.attrs["latentbatch"] = meta  # as an earlier release wrote it
    result = decode(tiny_model, str(old), str(tmp_path / "out"), client=client)
    assert result.canary == "none" and result.decoded == 80


def test_in_process_decodes_check_the_canary_too(
    canary_store: str, tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "s.zarr"
    shutil.copytree(canary_store, copy)
    store = open_store(str(copy), writable=True)
    recorded = np.asarray(store.group["canary"][...])
    assert decode_rows(tiny_model, store, [0, 1]).shape[0] == 2  # exact: decodes
    # pixels recorded by a decoder that computed differently (another torch, say)
    shifted = np.where(recorded < 128, recorded + 20, recorded - 20).astype(np.uint8)
    record_canary(store, store.meta["canary"]["rows"], shifted, "cpu")
    with pytest.raises(CanaryError, match=f"{copy}: the canary drifted: .* 20 levels"):
        decode_rows(tiny_model, open_store(str(copy)), [0, 1])


def _with_nan_rows(canary_store: str, copy: Path, count: int) -> list[int]:
    """A copy of the store whose first ``count`` canary rows hold a NaN."""
    import shutil

    shutil.copytree(canary_store, copy)
    store = open_store(str(copy), writable=True)
    rows = store.meta["canary"]["rows"][:count]
    for row in rows:
        start = row - row % store.shard_rows
        block = store.read_latents(start, start + store.shard_rows)
        block[row - start, 0, 0, 0] = np.nan
        store.latents[start : start + store.shard_rows] = block
    return rows


@pytest.mark.parametrize("fmt", ["zarr", "tar"])
def test_a_nan_canary_row_does_not_switch_the_canary_off(
    canary_store: str, tiny_model: Path, tmp_path: Path, client: Client, fmt: str
) -> None:
    """The NaN row is left out; the other rows still catch a drifted decoder, before
    anything of the output exists (a zarr output's metadata included)."""
    copy = tmp_path / "nan.zarr"
    _with_nan_rows(canary_store, copy, 1)
    altered = altered_model(tiny_model, tmp_path / "altered")
    out = tmp_path / "out"
    drift = r"the canary drifted: its 15 rows .*\(1 rows holding NaN or Inf left out\)"
    with pytest.raises(CanaryError, match=drift):
        decode(altered, str(copy), str(out), fmt=fmt, allow_model_mismatch=True, client=client)  # type: ignore[arg-type]
    assert not out.exists() or not list(out.rglob("*"))


def test_a_canary_of_nan_rows_only_refuses_unless_skipped(
    canary_store: str, tiny_model: Path, tmp_path: Path, client: Client
) -> None:
    copy = tmp_path / "nan.zarr"
    _with_nan_rows(canary_store, copy, 16)
    with pytest.raises(CanaryError, match="all 16 canary rows hold NaN or Inf"):
        decode(tiny_model, str(copy), str(tmp_path / "out"), client=client)
    with pytest.raises(LatentbatchError, match="hold NaN or Inf: rows"):  # the task's refusal
        decode(tiny_model, str(copy), str(tmp_path / "out"), skip_canary=True, client=client)


def test_every_worker_checks_the_canary_before_its_first_shard(
    canary_store: str, tiny_model: Path, tmp_path: Path, process_client: Client
) -> None:
    from latentbatch.engine import canary_task

    result = decode(
        tiny_model, canary_store, str(tmp_path / "out"), images_per_shard=16, client=process_client
    )
    assert result.canary == "exact" and len(result.shards_written) == 5
    checked = process_client.run(lambda: list(canary_task._CHECKED))
    assert len(checked) == 2  # both workers decoded shards of this run, and checked first
    runs = [set(runs) for runs in checked.values()]
    assert runs[0] & runs[1]
