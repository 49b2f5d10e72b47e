from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from latentbatch.errors import CheckpointError
from latentbatch.ids import short_id
from latentbatch.models import checkpoint, weights


def _copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "copy"))


def test_model_id_is_sha256_of_weights(tiny_model: Path) -> None:
    digest = hashlib.sha256((tiny_model / checkpoint.WEIGHTS).read_bytes()).hexdigest()
    info = checkpoint.read_info(tiny_model)
    assert info.model_id == checkpoint.model_id(tiny_model) == digest
    assert info.meta["model_id"] == digest


def test_replaced_weights_are_noticed(tiny_model: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_model, tmp_path)
    model, _ = weights.load_model(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    weights.write_tensors(copy / checkpoint.WEIGHTS, model.state_dict())
    with pytest.raises(CheckpointError, match=r"is not the file config\.json was written for"):
        checkpoint.read_info(copy)


def test_missing_pieces_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_info(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        checkpoint.read_info(tmp_path)
    (tmp_path / checkpoint.CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        checkpoint.read_info(tmp_path)


@pytest.fixture
def remote_model(tiny_model: Path) -> Iterator[str]:
    """``tiny_model`` copied to fsspec's in-memory filesystem: a model at a URL."""
    fs = fsspec.filesystem("memory")
    url = f"memory://models/{uuid.uuid4().hex}/tiny"
    for name in (checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.CURVES):
        if (tiny_model / name).is_file():
            fs.pipe_file(f"{url}/{name}", (tiny_model / name).read_bytes())
    yield url
    fs.rm(url, recursive=True)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache for this test alone."""
    monkeypatch.setenv(checkpoint.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_model_at_a_url_is_fetched_once_into_the_cache_and_loads_alike(
    tiny_model: Path, remote_model: str, fresh_cache: Path
) -> None:
    info = checkpoint.read_info(remote_model)
    assert info.is_remote and info.location == remote_model
    assert info.model_id == checkpoint.model_id(tiny_model)
    assert not (fresh_cache / info.model_id).exists()  # reading the config fetches nothing
    decoder, _ = weights.load_model(remote_model, "decoder")
    local, _ = weights.load_model(tiny_model, "decoder")
    copy = fresh_cache / info.model_id
    assert sorted(p.name for p in copy.iterdir()) == [checkpoint.CONFIG, checkpoint.WEIGHTS]
    assert checkpoint.read_info(copy).model_id == info.model_id  # a model directory itself
    z = torch.rand(2, *info.config.latent_shape)
    with torch.inference_mode():
        torch.testing.assert_close(decoder(z), local(z), rtol=0, atol=0)
    before = (copy / checkpoint.WEIGHTS).stat().st_mtime_ns
    assert checkpoint.local_copy(info) == copy
    assert (copy / checkpoint.WEIGHTS).stat().st_mtime_ns == before  # not fetched again


def test_weights_altered_at_the_url_are_refused_naming_both_ids(
    remote_model: str, fresh_cache: Path
) -> None:
    info = checkpoint.read_info(remote_model)
    fs = fsspec.filesystem("memory")
    weights = bytearray(fs.cat_file(f"{remote_model}/{checkpoint.WEIGHTS}"))
    weights[-1] ^= 1  # one bit of the last tensor's data
    fs.pipe_file(f"{remote_model}/{checkpoint.WEIGHTS}", bytes(weights))
    actual = hashlib.sha256(weights).hexdigest()
    pattern = f"have id {short_id(actual)}, not the expected {short_id(info.model_id)}"
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.local_copy(info)
    assert not fresh_cache.exists()  # nothing cached, no leftovers


def test_a_cached_copy_that_no_longer_matches_is_fetched_again(
    remote_model: str, fresh_cache: Path
) -> None:
    info = checkpoint.read_info(remote_model)
    copy = checkpoint.local_copy(info)
    (copy / checkpoint.WEIGHTS).write_bytes(b"damaged on this disk")
    assert checkpoint.local_copy(info) == copy
    assert checkpoint.sha256_file(copy / checkpoint.WEIGHTS) == info.model_id


def test_url_models_need_a_config_with_an_id(remote_model: str) -> None:
    fs = fsspec.filesystem("memory")
    config = json.loads(fs.cat_file(f"{remote_model}/{checkpoint.CONFIG}"))
    del config["model_id"]
    fs.pipe_file(f"{remote_model}/{checkpoint.CONFIG}", json.dumps(config).encode())
    with pytest.raises(CheckpointError, match="records no model id"):
        checkpoint.read_info(remote_model)
    with pytest.raises(CheckpointError, match=r"memory://nowhere is not a model directory"):
        checkpoint.read_info("memory://nowhere")


def test_find_models_under_a_url_prefix(remote_model: str, tiny_model: Path) -> None:
    root = remote_model.rsplit("/", 1)[0]
    fsspec.filesystem("memory").pipe_file(f"{root}/broken/config.json", b"{}")
    listing = checkpoint.find_models(root)
    assert [m.location for m in listing.models] == [remote_model]
    assert listing.models[0].model_id == checkpoint.model_id(tiny_model)
    assert [path for path, _ in listing.broken] == [f"{root}/broken"]
    assert checkpoint.find_models("memory://no/such/root").models == ()


def test_model_directories_are_named_by_one_rule() -> None:
    assert checkpoint.model_dir_for("seed", "mnist5k") == Path("models/seed-mnist5k")
    assert checkpoint.model_dir_for("codec", "synthetic:512", "m") == Path("m/codec-synthetic-512")
    assert checkpoint.model_dir_for("compact", "folder:data/cats/") == Path(
        "models/compact-data-cats"
    )


def test_read_model_reads_the_weights_once_and_checks_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    info, data = checkpoint.read_model(tiny_model)
    assert hashlib.sha256(data).hexdigest() == info.model_id == checkpoint.model_id(tiny_model)
    assert checkpoint.weights_bytes(info) == data
    copy = _copy(tiny_model, tmp_path)
    info = checkpoint.read_info(copy)
    (copy / checkpoint.WEIGHTS).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="no longer the weights of model"):
        checkpoint.weights_bytes(info)
    with pytest.raises(CheckpointError, match=r"is not the file config\.json was written for"):
        checkpoint.read_model(copy)
    (copy / checkpoint.WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        checkpoint.read_model(copy)


@pytest.mark.parametrize("recorded", ["../../" + "a" * 58, "A" * 64, "g" * 64, "a" * 63])
def test_a_url_model_id_must_be_64_hex_digits(remote_model: str, recorded: str) -> None:
    """The recorded id becomes a cache folder's name: nothing else may pass."""
    fs = fsspec.filesystem("memory")
    config = json.loads(fs.cat_file(f"{remote_model}/{checkpoint.CONFIG}"))
    config["model_id"] = recorded
    fs.pipe_file(f"{remote_model}/{checkpoint.CONFIG}", json.dumps(config).encode())
    with pytest.raises(CheckpointError, match="64 hex digits"):
        checkpoint.read_info(remote_model)
