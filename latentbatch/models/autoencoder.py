"""The convolutional autoencoder family.

The ``seed`` preset is the Keras model of the article this product grew from, layer for
layer (``padding='same'`` convolutions, 2x2 max-pooling, nearest up-sampling)::

    image (B, 1, 28, 28)
      │  Conv3x3 32 + ReLU ─ MaxPool2      (B, 32, 14, 14)
      │  Conv3x3 64 + ReLU ─ MaxPool2      (B, 64, 7, 7)
      ▼
    latent (B, 64, 7, 7)     [compact: + Conv3x3 4 → (B, 4, 7, 7)]
      │  Conv3x3 64 + ReLU ─ Upsample2     (B, 64, 14, 14)
      │  Conv3x3 32 + ReLU ─ Upsample2     (B, 32, 28, 28)
      │  Conv3x3 1 + sigmoid               (B, 1, 28, 28)
      ▼
    reconstruction in [0, 1]

The ``codec`` preset is a learned lossy codec (a factorised-prior model after Ballé et
al., 2018, with GELU for GDN)::

    image (B, 1, 28, 28)
      │  Conv5x5/2 96 + GELU ─ Conv3x3 96 + GELU      (B, 96, 14, 14)
      │  Conv5x5/2 16 ─ round, clamp to int8           (B, 16, 7, 7)
      ▼
    latent (B, 16, 7, 7) integers
      │  ConvT5x5/2 96 + GELU ─ Conv3x3 96 + GELU     (B, 96, 14, 14)
      │  ConvT5x5/2 1 + sigmoid                        (B, 1, 28, 28)
      ▼
    reconstruction in [0, 1]

In training the rounding is replaced by additive uniform noise in [-0.5, 0.5), and a
:class:`LogisticPrior` (a logistic per latent channel, its location and scale learned)
gives the bits the latents would cost; training minimises bits + λ · 255² · MSE.

Encoder and decoder are separate modules: decoding is the product's hot path, and a
decode worker loads only the decoder.

The pixel contract of both directions lives here too: :func:`to_unit` turns stored
``uint8 (N, H, W, C)`` pixels into the model's ``float (N, C, H, W)`` input in [0, 1], and
:func:`to_uint8` turns the model's output back, rounding to nearest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from latentbatch.config import ModelConfig


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)


class Encoder(nn.Sequential):
    """Images ``(B, C, H, W)`` in [0, 1] → latents ``(B, latent_channels, H/2^L, W/2^L)``."""

    def __init__(self, config: ModelConfig) -> None:
        layers: list[nn.Module] = []
        c_in = config.channels
        for width in config.widths:
            layers += [_conv(c_in, width), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = width
        if config.latent_channels != c_in:
            layers.append(_conv(c_in, config.latent_channels))
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """Latents ``(B, latent_channels, h, w)`` → images ``(B, C, h*2^L, w*2^L)`` in [0, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        layers: list[nn.Module] = []
        c_in = config.latent_channels
        for width in reversed(config.widths):
            layers += [_conv(c_in, width), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest")]
            c_in = width
        layers += [_conv(c_in, config.channels), nn.Sigmoid()]
        super().__init__(*layers)


INT8_RANGE = (-128, 127)


class Quantizer(nn.Module):
    """Rounds to integers in the int8 range; in training mode adds uniform noise in
    [-0.5, 0.5) instead, the differentiable stand-in for rounding."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.training:
            return latents + (torch.rand_like(latents) - 0.5)
        low, high = INT8_RANGE
        return latents.round().clamp(low, high)


def _conv5_down(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=5, stride=2, padding=2)


def _conv5_up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=5, stride=2, padding=2, output_padding=1)


class CodecEncoder(nn.Sequential):
    """The ``codec`` preset's encoder: images → integer-valued latents (noisy in training)."""

    def __init__(self, config: ModelConfig) -> None:
        layers: list[nn.Module] = []
        c_in = config.channels
        for width in config.widths:
            layers += [_conv5_down(c_in, width), nn.GELU(), _conv(width, width), nn.GELU()]
            c_in = width
        layers += [_conv5_down(c_in, config.latent_channels), Quantizer()]
        super().__init__(*layers)


class CodecDecoder(nn.Sequential):
    """The ``codec`` preset's decoder: latents → images in [0, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        layers: list[nn.Module] = []
        c_in = config.latent_channels
        for width in reversed(config.widths):
            layers += [_conv5_up(c_in, width), nn.GELU(), _conv(width, width), nn.GELU()]
            c_in = width
        layers += [_conv5_up(c_in, config.channels), nn.Sigmoid()]
        super().__init__(*layers)


class LogisticPrior(nn.Module):
    """A factorised entropy model: each latent channel's integers follow a discretised
    logistic with a learned location and log-scale. :meth:`bits` is what an ideal entropy
    coder would spend on given latents (integers, or noisy ones in training)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def likelihoods(self, latents: torch.Tensor) -> torch.Tensor:
        """The probability of each latent value's unit bin, ``(B, C, h, w)``, at least 1e-9."""
        loc = self.loc.view(1, -1, 1, 1)
        scale = self.log_scale.exp().view(1, -1, 1, 1)
        upper = torch.sigmoid((latents + 0.5 - loc) / scale)
        lower = torch.sigmoid((latents - 0.5 - loc) / scale)
        return (upper - lower).clamp_min(1e-9)

    def bits(self, latents: torch.Tensor) -> torch.Tensor:
        """Bits for each latent ``(B,)``."""
        return -torch.log2(self.likelihoods(latents)).flatten(1).sum(1)

    def describe(self) -> dict[str, Any]:
        """The quantisation and this prior, JSON-ready: what a model's ``config.json`` and
        each store of its latents record (``latent.quantization``)."""
        low, high = INT8_RANGE
        return {
            "step": 1,
            "range": [low, high],
            "prior": "logistic",
            "loc": [float(v) for v in self.loc.detach()],
            "scale": [float(v) for v in self.log_scale.detach().exp()],
        }


def build_encoder(config: ModelConfig) -> nn.Module:
    """The encoder of the architecture ``config`` describes."""
    return CodecEncoder(config) if config.quantized else Encoder(config)


def build_decoder(config: ModelConfig) -> nn.Module:
    """The decoder of the architecture ``config`` describes."""
    return CodecDecoder(config) if config.quantized else Decoder(config)


class Autoencoder(nn.Module):
    """An encoder and a decoder built from one :class:`ModelConfig`, and for the ``codec``
    preset the entropy model of its latents (``prior``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)
        self.prior = LogisticPrior(config.latent_channels) if config.quantized else None

    def rate_distortion(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions and each image's latent bits (for the ``codec`` preset)."""
        if self.prior is None:
            raise TypeError(f"the {self.config.preset} preset has no entropy model")
        latents: torch.Tensor = self.encoder(images)
        reconstructions: torch.Tensor = self.decoder(latents)
        return reconstructions, self.prior.bits(latents)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        latents: torch.Tensor = self.encoder(images)
        reconstructions: torch.Tensor = self.decoder(latents)
        return reconstructions


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8 (N, H, W, C)`` → ``float32 (N, C, H, W)`` in [0, 1]."""
    unit = images.permute(0, 3, 1, 2).float()
    unit.div_(255)
    return unit


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``float (N, C, H, W)`` in [0, 1] → ``uint8 (N, H, W, C)``, rounded to nearest."""
    return (
        images.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    )
