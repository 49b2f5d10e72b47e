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

Encoder and decoder are separate modules: decoding is the product's hot path, and a
decode worker loads only the decoder.

The pixel contract of both directions lives here too: :func:`to_unit` turns stored
``uint8 (N, H, W, C)`` pixels into the model's ``float (N, C, H, W)`` input in [0, 1], and
:func:`to_uint8` turns the model's output back, rounding to nearest.
"""

from __future__ import annotations

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


class Autoencoder(nn.Module):
    """An encoder and a decoder built from one :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

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
