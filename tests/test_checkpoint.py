from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

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
