from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from latentbatch.errors import CheckpointError
from latentbatch.models import checkpoint, weights
from latentbatch.models.autoencoder import Autoencoder, Decoder, Encoder


def _copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "copy"))


def test_round_trip_gives_the_same_outputs(tiny_model: Path) -> None:
    model, info = weights.load_model(tiny_model)
    assert isinstance(model, Autoencoder) and not model.training
    tensors = weights.read_tensors(tiny_model / checkpoint.WEIGHTS)
    fresh = Autoencoder(info.config)
    fresh.load_state_dict(tensors)
    fresh = fresh.to(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, *info.config.image_shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fresh.eval()(x), rtol=0, atol=0)


def test_parts_load_alone(tiny_model: Path) -> None:
    encoder, info = weights.load_model(tiny_model, "encoder")
    decoder, _ = weights.load_model(tiny_model, "decoder")
    full, _ = weights.load_model(tiny_model)
    assert isinstance(encoder, Encoder) and isinstance(decoder, Decoder)
    x = torch.rand(2, *info.config.image_shape)
    with torch.inference_mode():
        torch.testing.assert_close(decoder(encoder(x)), full(x), rtol=0, atol=0)


def test_saving_again_is_byte_identical(tiny_model: Path, tmp_path: Path) -> None:
    model, info = weights.load_model(tiny_model)
    new_id = weights.save_model(tmp_path, model, {})
    assert new_id == info.model_id


def test_config_that_does_not_fit_the_weights_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_model, tmp_path)
    meta = json.loads((copy / checkpoint.CONFIG).read_text())
    meta["model"]["latent_channels"] = 5
    (copy / checkpoint.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"do not fit its config\.json: .*shape"):
        weights.load_model(copy)


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
        weights.load_model(copy)
    torch.save({"w": torch.zeros(1)}, copy / checkpoint.WEIGHTS)
    with pytest.raises(CheckpointError, match="zip archive"):
        weights.read_tensors(copy / checkpoint.WEIGHTS)
    assert not marker.exists()


def test_a_loaded_model_hands_on_its_parts_without_reading_again(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = weights.loaded(tiny_model)
    assert model.info.model_id == checkpoint.model_id(tiny_model)
    decoder, _ = weights.load_model(tiny_model, "decoder")
    z = torch.rand(2, *model.info.config.latent_shape)
    with torch.inference_mode():
        torch.testing.assert_close(model.decoder(z), decoder(z), rtol=0, atol=0)

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read again")

    monkeypatch.setattr(weights, "read_model", no_reads)
    assert weights.loaded(model) is model
