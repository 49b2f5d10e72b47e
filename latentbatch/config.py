"""Frozen, validated configuration records.

``ModelConfig`` describes an autoencoder's architecture and the image geometry it takes;
``TrainConfig`` describes one training run. Both are validated when built and round-trip
through plain dicts (``to_dict`` / ``from_dict``) for ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from latentbatch.errors import ConfigError

PRESETS = ("seed", "compact")
LOSSES = ("bce", "mse")


def _fields_only(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{cls.__name__} got unknown keys {unknown}; expected some of {sorted(names)}"
        )
    return data


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a convolutional autoencoder.

    The encoder has one level per entry of ``widths``: ``Conv3x3(width) + ReLU + MaxPool2``.
    If ``latent_channels`` differs from ``widths[-1]`` a linear ``Conv3x3(latent_channels)``
    projects to the latent. The decoder mirrors it: one ``Conv3x3 + ReLU + Upsample2`` per
    level in reverse order, then ``Conv3x3(channels) + sigmoid``.
    """

    preset: str = "seed"
    channels: int = 1
    image_size: int = 28
    widths: tuple[int, ...] = (32, 64)
    latent_channels: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(
                f"widths must be a non-empty list of positive ints, got {self.widths}"
            )
        if self.latent_channels < 1:
            raise ConfigError(f"latent_channels must be positive, got {self.latent_channels}")
        factor = 2 ** len(self.widths)
        if self.image_size < factor or self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} must be a multiple of {factor} "
                f"(2 ** {len(self.widths)} down-sampling levels); resize the images or "
                "use fewer widths"
            )

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def mode(self) -> Literal["L", "RGB"]:
        """The PIL mode of the images the model takes."""
        return "L" if self.channels == 1 else "RGB"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one latent, ``(C, h, w)``."""
        side = self.image_size // 2**self.levels
        return (self.latent_channels, side, side)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image tensor, ``(C, H, W)``."""
        return (self.channels, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**_fields_only(cls, data))


def preset_config(name: str, channels: int = 1, image_size: int = 28) -> ModelConfig:
    """The architecture of a named preset for the given image geometry.

    ``seed`` is the article's Keras model: widths (32, 64), latent = 64 feature maps.
    ``compact`` compresses: widths (32, 64) and a 4-channel latent (4x7x7 for 28x28x1);
    from 64 pixels up it adds a third level of 128 (4x8x8 for 64x64x3).
    """
    if name == "seed":
        return ModelConfig("seed", channels, image_size, (32, 64), 64)
    if name == "compact":
        widths = (32, 64, 128) if image_size >= 64 else (32, 64)
        return ModelConfig("compact", channels, image_size, widths, 4)
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, optimisation and split."""

    source: str = "mnist5k"
    epochs: int = 10
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    loss: str = "bce"
    val_fraction: float = 0.1
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"limit must be at least 2 images, got {self.limit}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**_fields_only(cls, data))
