from __future__ import annotations

import pytest
import torch
from torch import nn

from latentbatch.config import ModelConfig, preset_config
from latentbatch.models.autoencoder import (
    Autoencoder,
    Decoder,
    Encoder,
    LogisticPrior,
    Quantizer,
    parameter_count,
    to_uint8,
    to_unit,
)


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


@pytest.mark.parametrize(("channels", "size", "latent"), [(1, 28, (16, 7, 7)), (3, 64, (32, 8, 8))])
def test_codec_preset_rounds_its_latents_to_int8_integers(
    channels: int, size: int, latent: tuple[int, int, int]
) -> None:
    config = preset_config("codec", channels, size)
    assert config.latent_shape == latent and config.latent_dtype == "int8"
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    with torch.inference_mode():
        latents = model.encoder(torch.rand(2, channels, size, size))
        assert torch.equal(latents, latents.round())
        assert float(latents.min()) >= -128 and float(latents.max()) <= 127
        assert model.decoder(latents).shape == (2, channels, size, size)


def test_quantizer_adds_unit_noise_in_training_and_rounds_and_clamps_otherwise() -> None:
    quantizer = Quantizer()
    values = torch.tensor([-300.0, -1.6, -0.4, 0.49, 2.5, 3.51, 500.0])
    assert quantizer.eval()(values).tolist() == [-128, -2, -0, 0, 2, 4, 127]
    torch.manual_seed(0)
    noisy = quantizer.train()(torch.zeros(10_000))
    assert float(noisy.min()) >= -0.5 and float(noisy.max()) < 0.5
    assert abs(float(noisy.mean())) < 0.01 and 0.07 < float(noisy.var()) < 0.097  # 1/12


def test_logistic_prior_is_a_distribution_over_the_integers() -> None:
    prior = LogisticPrior(3)
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([0.0, 2.0, -1.0]))
        prior.log_scale.copy_(torch.tensor([1.0, 0.5, 0.5]).log())
    symbols = torch.arange(-60, 61, dtype=torch.float32)
    grid = symbols.view(-1, 1, 1, 1).expand(-1, 3, 1, 1)  # every integer, per channel
    assert prior.likelihoods(grid).sum(0).flatten().tolist() == pytest.approx([1, 1, 1], abs=1e-6)
    # bits of one latent: -log2 of its bin's probability under its channel's logistic
    latent = torch.tensor([[[[0.0]], [[2.0]], [[0.0]]]])
    cdf = torch.sigmoid
    expected = -(
        torch.log2(cdf(torch.tensor(0.5)) - cdf(torch.tensor(-0.5)))
        + torch.log2(cdf(torch.tensor(0.5 / 0.5)) - cdf(torch.tensor(-0.5 / 0.5)))
        + torch.log2(cdf(torch.tensor(1.5 / 0.5)) - cdf(torch.tensor(0.5 / 0.5)))
    )
    assert float(prior.bits(latent)[0].detach()) == pytest.approx(float(expected), rel=1e-5)
    described = prior.describe()
    assert described["loc"] == pytest.approx([0, 2, -1])
    assert described["scale"] == pytest.approx([1, 0.5, 0.5])
    assert described["range"] == [-128, 127] and described["step"] == 1


def test_only_the_codec_preset_has_an_entropy_model() -> None:
    assert Autoencoder(preset_config("seed")).prior is None
    with pytest.raises(TypeError, match="seed preset has no entropy model"):
        Autoencoder(preset_config("seed")).rate_distortion(torch.rand(1, 1, 28, 28))
    model = Autoencoder(preset_config("codec")).train()
    reconstructions, bits = model.rate_distortion(torch.rand(4, 1, 28, 28))
    assert reconstructions.shape == (4, 1, 28, 28) and bits.shape == (4,)
    assert bool((bits > 0).all())
