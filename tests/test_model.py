from __future__ import annotations

import pytest
import torch
from torch import nn

from latentbatch.config import ModelConfig, preset_config
from latentbatch.model import Autoencoder, Decoder, Encoder, parameter_count, to_uint8, to_unit


@pytest.mark.parametrize("preset", ["seed", "compact"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 64])
def test_preset_shapes(preset: str, channels: int, size: int) -> None:
    config = preset_config(preset, channels, size)
    model = Autoencoder(config)
    images = torch.rand(2, channels, size, size)
    latents = model.encoder(images)
    assert latents.shape == (2, *config.latent_shape)
    with torch.inference_mode():
        out = model.decoder(latents)
    assert out.shape == images.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_seed_preset_is_the_article_model_layer_for_layer() -> None:
    model = Autoencoder(preset_config("seed"))
    layers = [type(m).__name__ for m in (*model.encoder, *model.decoder)]
    assert layers == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
        "Conv2d", "ReLU", "Upsample", "Conv2d", "ReLU", "Upsample", "Conv2d", "Sigmoid",
    ]  # fmt: skip
    convs = [m for m in (*model.encoder, *model.decoder) if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 32), (32, 64), (64, 64), (64, 32), (32, 1),
    ]  # fmt: skip
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert model.config.latent_shape == (64, 7, 7)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 64)])
def test_compact_latent_holds_fewer_numbers_than_the_image(channels: int, size: int) -> None:
    config = preset_config("compact", channels, size)
    latent_numbers = torch.Size(config.latent_shape).numel()
    assert latent_numbers < channels * size * size
    if size == 28:
        assert config.latent_shape == (4, 7, 7)
    else:
        assert config.latent_shape == (4, 8, 8)


def test_encoder_and_decoder_stand_alone() -> None:
    config = ModelConfig("custom", 3, 32, (8, 16, 32), 6)
    encoder, decoder = Encoder(config), Decoder(config)
    latents = encoder(torch.rand(1, 3, 32, 32))
    assert latents.shape == (1, 6, 4, 4)
    assert decoder(latents).shape == (1, 3, 32, 32)
    assert parameter_count(encoder) > 0 and parameter_count(decoder) > 0


def test_uint8_round_trip() -> None:
    images = torch.randint(0, 256, (3, 5, 5, 3), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_unit(images)), images)
    assert to_uint8(torch.tensor([[[[0.4999 / 255, 1.5]]]])).flatten().tolist() == [0, 255]
