from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from latentbatch import checkpoint
from latentbatch.errors import CheckpointError
from latentbatch.model import Autoencoder, Decoder, Encoder


def _copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "copy"))


def test_round_trip_gives_the_same_outputs(tiny_model: Path) -> None:
    model, info = checkpoint.load_model(tiny_model)
    assert isinstance(model, Autoencoder) and not model.training
    weights = checkpoint.read_tensors(tiny_model / checkpoint.WEIGHTS)
    fresh = Autoencoder(info.config)
    fresh.load_state_dict(weights)
    fresh = fresh.to(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, *info.config.image_shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fresh.eval()(x), rtol=0, atol=0)


def test_parts_load_alone(tiny_model: Path) -> None:
    encoder, info = checkpoint.load_model(tiny_model, "encoder")
    decoder, _ = checkpoint.load_model(tiny_model, "decoder")
    full, _ = checkpoint.load_model(tiny_model)
    assert isinstance(encoder, Encoder) and isinstance(decoder, Decoder)
    x = torch.rand(2, *info.config.image_shape)
    with torch.inference_mode():
        torch.testing.assert_close(decoder(encoder(x)), full(x), rtol=0, atol=0)


def test_model_id_is_sha256_of_weights(tiny_model: Path) -> None:
    digest = hashlib.sha256((tiny_model / checkpoint.WEIGHTS).read_bytes()).hexdigest()
    info = checkpoint.read_info(tiny_model)
    assert info.model_id == checkpoint.model_id(tiny_model) == digest
    assert info.meta["model_id"] == digest


def test_saving_again_is_byte_identical(tiny_model: Path, tmp_path: Path) -> None:
    model, info = checkpoint.load_model(tiny_model)
    new_id = checkpoint.save_model(tmp_path, model, {})
    assert new_id == info.model_id


def test_config_that_does_not_fit_the_weights_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_model, tmp_path)
    meta = json.loads((copy / checkpoint.CONFIG).read_text())
    meta["model"]["latent_channels"] = 5
    (copy / checkpoint.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"do not fit its config\.json: .*shape"):
        checkpoint.load_model(copy)


def test_pickle_passed_as_weights_is_refused_without_unpickling(
    tiny_model: Path, tmp_path: Path
) -> None:
    copy = _copy(tiny_model, tmp_path)
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (copy / checkpoint.WEIGHTS).write_bytes(pickle.dumps(Trap()))
    meta = json.loads((copy / checkpoint.CONFIG).read_text())
    del meta["model_id"]
    (copy / checkpoint.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="a pickle; latentbatch loads safetensors only"):
        checkpoint.load_model(copy)
    torch.save({"w": torch.zeros(1)}, copy / checkpoint.WEIGHTS)
    with pytest.raises(CheckpointError, match="zip archive"):
        checkpoint.read_tensors(copy / checkpoint.WEIGHTS)
    assert not marker.exists()


def test_replaced_weights_are_noticed(tiny_model: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_model, tmp_path)
    model, _ = checkpoint.load_model(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    checkpoint.write_tensors(copy / checkpoint.WEIGHTS, model.state_dict())
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
    decoder, _ = checkpoint.load_model(remote_model, "decoder")
    local, _ = checkpoint.load_model(tiny_model, "decoder")
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
    pattern = f"have id {actual[:12]}, not the expected {info.model_id[:12]}"
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
