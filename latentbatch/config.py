"""Frozen, validated configuration records.

``ModelConfig`` describes an autoencoder's architecture and the image geometry it takes;
``TrainConfig`` describes one training run. Both are validated when built and round-trip
through plain dicts (``to_dict`` / ``from_dict``) for ``config.json``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from latentbatch.errors import ConfigError

PRESETS = ("seed", "compact", "codec")
MAX_SIDE = 4096
"""The longest image side a model that takes any size is given (pixels)."""
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

    The ``codec`` preset is built otherwise (see :mod:`latentbatch.models.autoencoder`): one strided
    ``Conv5x5/2 + GELU + Conv3x3(width) + GELU`` per entry of ``widths``, then a last
    ``Conv5x5/2`` to ``latent_channels``, so it has ``len(widths) + 1`` levels; its latents
    are rounded to integers and stored as int8.
    """

    preset: str = "seed"
    channels: int = 1
    image_size: int = 28
    widths: tuple[int, ...] = (32, 64)
    latent_channels: int = 64
    diffusers: dict[str, Any] | None = None
    """A diffusers autoencoder's own ``config.json`` (``preset`` is then its class,
    ``AutoencoderKL`` or ``AutoencoderTiny``); None for latentbatch's presets."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.diffusers is not None:
            object.__setattr__(self, "diffusers", dict(self.diffusers))
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(
                f"widths must be a non-empty list of positive ints, got {self.widths}"
            )
        if self.latent_channels < 1:
            raise ConfigError(f"latent_channels must be positive, got {self.latent_channels}")
        factor = 2**self.levels
        if self.image_size < factor or self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} must be a multiple of {factor} "
                f"(2 ** {self.levels} down-sampling levels); resize the images or "
                "use fewer widths"
            )

    @property
    def quantized(self) -> bool:
        """Whether latents are integers (the ``codec`` preset), stored as int8."""
        return self.preset == "codec"

    @property
    def levels(self) -> int:
        """Down-sampling levels: each halves the image's side (a diffusers autoencoder's:
        one per block but the last)."""
        if self.diffusers is not None:
            return len(self.widths) - 1
        return len(self.widths) + 1 if self.quantized else len(self.widths)

    @property
    def downsampling(self) -> int:
        """How many pixels of a side one latent position covers."""
        return int(2**self.levels)

    @property
    def scaling_factor(self) -> float:
        """The factor latents are stored multiplied by (diffusers' ``scaling_factor``;
        1 for latentbatch's presets, whose latents are stored as the encoder made them)."""
        if self.diffusers is None:
            return 1.0
        return float(self.diffusers.get("scaling_factor") or 1.0)

    @property
    def shift_factor(self) -> float:
        """What is subtracted before scaling (diffusers' ``shift_factor``; 0 without)."""
        if self.diffusers is None:
            return 0.0
        return float(self.diffusers.get("shift_factor") or 0.0)

    @property
    def convention(self) -> dict[str, Any] | None:
        """How a diffusers autoencoder's latents are stored (a store's
        ``latent.convention``): scaled, ``(z - shift_factor) * scaling_factor``, as the
        diffusion model sees them; a decode applies ``z / scaling_factor + shift_factor``
        once. None for latentbatch's presets."""
        if self.diffusers is None:
            return None
        return {
            "scaled": True,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    @property
    def latent_dtype(self) -> str | None:
        """The dtype latents must be stored in, where the architecture fixes it."""
        return "int8" if self.quantized else None

    @property
    def force_upcast(self) -> bool | None:
        """Whether the model's config says its decoder must not run in float16
        (diffusers' ``force_upcast``: True for the original SD and SDXL VAEs, False for
        TAESD and the fp16-fix VAEs); None when it says nothing (latentbatch's presets)."""
        if self.diffusers is None or "force_upcast" not in self.diffusers:
            return None
        return bool(self.diffusers["force_upcast"])

    @property
    def any_size(self) -> bool:
        """Whether the model takes images of any size (a diffusers autoencoder: any
        multiple of its down-sampling factor up to :data:`MAX_SIDE`), or only its own."""
        return self.diffusers is not None

    def latent_shape_at(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of one latent ``(C, h, w)`` of a ``height`` x ``width`` image, refused in
        a sentence when the model does not take that size."""
        if not self.any_size:
            if (height, width) != (self.image_size, self.image_size):
                raise ConfigError(
                    f"the {self.preset} model takes {self.image_size}x{self.image_size} images "
                    f"only, not {height}x{width}; leave the size out"
                )
            return self.latent_shape
        factor = self.downsampling
        sides_fit = all(
            factor <= side <= MAX_SIDE and side % factor == 0 for side in (height, width)
        )
        if not sides_fit:
            raise ConfigError(
                f"{height}x{width} images do not fit the {self.preset}: each side must be a "
                f"multiple of {factor} from {factor} to {MAX_SIDE} px"
            )
        return (self.latent_channels, height // factor, width // factor)

    def decode_bytes(self, height: int, width: int) -> int:
        """An estimate of the float32 memory one ``height`` x ``width`` image takes
        through the decoder: 32 bytes per value of each level's activations (a level's
        input, its convolutions' and normalisations' outputs alive at once), summed over
        the levels, the widest at the coarsest. For SD's decoder at 512x512, 1.8 GiB."""
        total = 0
        for level, channels in enumerate(self.widths):  # widths[0] at full resolution
            total += (height >> level) * (width >> level) * channels * 32
        return total

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
        found = {**dataclasses.asdict(self), "widths": list(self.widths)}
        if self.diffusers is None:  # latentbatch's presets: as earlier releases wrote them
            del found["diffusers"]
        return found

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**_fields_only(cls, data))


def preset_config(name: str, channels: int = 1, image_size: int = 28) -> ModelConfig:
    """The architecture of a named preset for the given image geometry.

    ``seed`` is the article's Keras model: widths (32, 64), latent = 64 feature maps.
    ``compact`` compresses: widths (32, 64) and a 4-channel latent (4x7x7 for 28x28x1);
    from 64 pixels up it adds a third level of 128 (4x8x8 for 64x64x3).
    ``codec`` is a learned lossy codec: 96 hidden channels, an int8 latent of 16 channels
    (16x7x7 for 28x28x1), or of 32 with a third level from 64 pixels up (32x8x8 for
    64x64x3), whose entropy it learns together with the weights (see ``--lambda``).
    """
    if name == "seed":
        return ModelConfig("seed", channels, image_size, (32, 64), 64)
    if name == "compact":
        widths = (32, 64, 128) if image_size >= 64 else (32, 64)
        return ModelConfig("compact", channels, image_size, widths, 4)
    if name == "codec":
        if image_size >= 64:
            return ModelConfig("codec", channels, image_size, (96, 96), 32)
        return ModelConfig("codec", channels, image_size, (96,), 16)
    raise _unknown_preset(name)


def _unknown_preset(name: str) -> ConfigError:
    return ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


DEFAULT_LAMBDA = 0.01
"""The ``codec`` preset's default rate–distortion trade-off (see :class:`TrainConfig`)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, optimisation and split.

    ``rate_lambda`` (``--lambda``) is for the ``codec`` preset only, which minimises
    ``bits per pixel + rate_lambda * 255² * MSE``: a larger lambda buys PSNR with bits.
    Build one with a preset's defaults through :meth:`for_preset`.
    """

    source: str = "mnist5k"
    epochs: int = 10
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    loss: str = "bce"
    val_fraction: float = 0.1
    limit: int | None = None
    rate_lambda: float | None = None

    def __post_init__(self) -> None:
        if self.rate_lambda is not None and not self.rate_lambda > 0:
            raise ConfigError(f"lambda must be positive, got {self.rate_lambda}")
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
    def for_preset(cls, preset: str, source: str = "mnist5k", **given: Any) -> TrainConfig:
        """The preset's training defaults, with every given setting that is not None
        instead: the ``codec`` preset trains 40 epochs of 64 images at learning rate 2e-3
        on rate + lambda x MSE (lambda 0.01); the others 10 epochs of 32 at 1e-3 on BCE."""
        if preset not in PRESETS:
            raise _unknown_preset(preset)
        defaults: dict[str, Any] = (
            {"epochs": 40, "batch_size": 64, "learning_rate": 2e-3, "loss": "mse",
             "rate_lambda": DEFAULT_LAMBDA}
            if preset == "codec"
            else {}
        )  # fmt: skip
        chosen = {k: v for k, v in given.items() if v is not None}
        return cls(source=source, **(defaults | chosen))

    def check_preset(self, config: ModelConfig) -> None:
        """Refuse settings that do not fit the architecture they would train."""
        if config.quantized and self.rate_lambda is None:
            raise ConfigError(
                f"the {config.preset} preset trains for rate and distortion together and "
                f"needs a lambda (--lambda; {DEFAULT_LAMBDA} is its default)"
            )
        if config.quantized and self.loss != "mse":
            raise ConfigError(
                f"the {config.preset} preset's distortion is MSE, not {self.loss}; drop --loss"
            )
        if not config.quantized and self.rate_lambda is not None:
            raise ConfigError(
                f"--lambda is for the codec preset, whose latents are entropy-coded; "
                f"the {config.preset} preset has no rate to trade"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**_fields_only(cls, data))


MEMORY_ENV = "LATENTBATCH_DECODE_MEMORY_MIB"
DEFAULT_MEMORY_MIB = 4096
"""The memory a decoder call may take per worker (``$LATENTBATCH_DECODE_MEMORY_MIB``)."""


def memory_budget() -> int:
    """Bytes one decoder call may take (:data:`MEMORY_ENV`, default 4 GiB)."""
    return int(os.environ.get(MEMORY_ENV, DEFAULT_MEMORY_MIB)) * 2**20


def tiled(image_bytes: int) -> bool:
    """Whether one image is over the memory budget, so that a decoder that can (a
    diffusers autoencoder) decodes it in overlapping tiles."""
    return image_bytes > memory_budget()
