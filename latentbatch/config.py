"""Frozen, validated configuration records.

``ModelConfig`` describes an autoencoder's architecture and the image geometry it takes;
``Convention`` how a diffusers autoencoder's latents are stored (the formula its
family's pipeline undoes before ``vae.decode``: :mod:`latentbatch.models.convention`
says more); ``TrainConfig`` describes one training run. They are validated when built
and round-trip through plain dicts (``to_dict`` / ``from_dict``) for ``config.json``
and the stores' metadata.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from latentbatch.errors import ConfigError

PRESETS = ("seed", "compact", "codec")
MAX_SIDE = 4096
"""The longest image side a model that takes any size is given (pixels)."""
LOSSES = ("bce", "mse")


Formula = Literal["scale-shift", "mean-std"]
Packing = Literal["none", "2x2"]
CONVENTION_VERSION = 1


class ConventionError(ConfigError):
    """A convention that does not fit the latents (its vectors' lengths)."""


@dataclass(frozen=True, kw_only=True)
class Convention:
    """How stored latents ``x`` become the autoencoder's ``z`` (see the module
    docstring): ``formula``, ``scale`` and ``shift`` (one value, or one per channel),
    ``std`` (``mean-std``: one per channel; ``shift`` is then the mean) and ``packing``;
    ``source`` says where the values come from (``config``, ``weights``, ``given``)."""

    formula: Formula
    scale: tuple[float, ...] = (1.0,)
    shift: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = ()
    packing: Packing = "none"
    source: str = "config"

    def _vectors(self, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def shaped(values: tuple[float, ...], name: str) -> np.ndarray:
            if len(values) not in (1, channels):
                raise ConventionError(
                    f"the convention's {name} has {len(values)} values, the latents "
                    f"{channels} channels; give one value or one per channel"
                )
            return np.asarray(values, np.float64).reshape(1, -1, 1, 1)

        std = shaped(self.std or (1.0,), "std")
        return shaped(self.scale, "scale"), shaped(self.shift, "shift"), std

    def to_vae(self, stored: Any, vectors: tuple[Any, Any, Any] | None = None) -> Any:
        """Stored latents ``(n, C, h, w)`` → the autoencoder's (unpatchified): numpy
        arrays (in float64), or torch tensors given their ``vectors`` (scale, shift and
        std as ``(1, C, 1, 1)`` tensors: the decoder's)."""
        scale, shift, std = vectors or self._vectors(stored.shape[1])
        x = stored if vectors else stored.astype(np.float64)
        z = x / scale + shift if self.formula == "scale-shift" else x * std / scale + shift
        return unpatchify(z) if self.packing == "2x2" else z

    def from_vae(self, z: Any, vectors: tuple[Any, Any, Any] | None = None) -> Any:
        """The autoencoder's latents → stored ones (patchified first, when packed), as
        :meth:`to_vae` takes them."""
        z = z if vectors else z.astype(np.float64)
        z = patchify(z) if self.packing == "2x2" else z
        scale, shift, std = vectors or self._vectors(z.shape[1])
        x = (z - shift) * scale
        return x if self.formula == "scale-shift" else x / std

    def to_dict(self) -> dict[str, Any]:
        """The store's ``latent.convention`` record (with the scalar ``scaling_factor``
        and ``shift_factor`` earlier readers take)."""
        found = {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }
        return {
            **found,
            "version": CONVENTION_VERSION,
            "scaled": True,
            "scaling_factor": self.scale[0] if len(self.scale) == 1 else None,
            "shift_factor": self.shift[0]
            if self.formula == "scale-shift" and len(self.shift) == 1
            else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Convention:
        """A recorded convention; a store of an earlier release records scalars only."""
        if "formula" not in data:
            return cls(
                formula="scale-shift",
                scale=(float(data.get("scaling_factor") or 1.0),),
                shift=(float(data.get("shift_factor") or 0.0),),
            )
        return cls(
            formula=data["formula"],
            scale=tuple(float(v) for v in data["scale"]),
            shift=tuple(float(v) for v in data["shift"]),
            std=tuple(float(v) for v in data.get("std") or ()),
            packing=data.get("packing", "none"),
            source=str(data.get("source", "config")),
        )

    def describe(self) -> str:
        """One line: the formula with its values (vectors by their length)."""

        def shown(values: tuple[float, ...]) -> str:
            return f"{values[0]:g}" if len(values) == 1 else f"[{len(values)} per channel]"

        if self.formula == "scale-shift":
            text = f"z = x / {shown(self.scale)} + {shown(self.shift)}"
        else:
            text = f"z = x * std{shown(self.std)} / {shown(self.scale)} + mean{shown(self.shift)}"
        return text + (", 2x2-patchified" if self.packing == "2x2" else "")


def _permuted(values: Any, axes: tuple[int, ...]) -> Any:
    """``values`` with its axes reordered: a numpy array's or a torch tensor's."""
    return values.permute(*axes) if hasattr(values, "permute") else values.transpose(axes)


def patchify(z: Any) -> Any:
    """``(n, C, h, w)`` → ``(n, 4C, h/2, w/2)``, as FLUX.2's pipeline patchifies (a
    numpy array or a torch tensor)."""
    n, c, h, w = z.shape
    blocks = _permuted(z.reshape(n, c, h // 2, 2, w // 2, 2), (0, 1, 3, 5, 2, 4))
    return blocks.reshape(n, c * 4, h // 2, w // 2)


def unpatchify(x: Any) -> Any:
    """``(n, 4C, h, w)`` → ``(n, C, 2h, 2w)``: :func:`patchify` undone."""
    n, c, h, w = x.shape
    blocks = _permuted(x.reshape(n, c // 4, 2, 2, h, w), (0, 1, 4, 2, 5, 3))
    return blocks.reshape(n, c // 4, h * 2, w * 2)


def unpack_sequence(latents: np.ndarray) -> np.ndarray:
    """FLUX.1's and Qwen-Image's sequence latents ``(n, h*w/4, 4C)`` → ``(n, C, h, w)``,
    as their pipelines unpack them (a square latent: ``h == w``)."""
    n, patches, channels = latents.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ConventionError(
            f"packed latents of {patches} patches are not a square grid; import them "
            "unpacked, (N, C, h, w)"
        )
    x = latents.reshape(n, side, side, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels // 4, side * 2, side * 2)


def of_config(
    diffusers: Mapping[str, Any], batch_norm: tuple[Sequence[float], Sequence[float]] | None = None
) -> Convention:
    """A diffusers autoencoder's own convention, from its ``config.json`` (``diffusers``)
    and, for FLUX.2, its BatchNorm's running mean and variance (``batch_norm``, read
    from its weights; without them the record says they are the weights')."""
    name = diffusers.get("_class_name", "AutoencoderKL")
    scale = float(diffusers.get("scaling_factor") or 1.0)
    shift = float(diffusers.get("shift_factor") or 0.0)
    if name == "AutoencoderKLFlux2":
        if batch_norm is None:
            return Convention(formula="mean-std", scale=(1.0,), shift=(), std=(),
                              packing="2x2", source="weights")  # fmt: skip
        eps = float(diffusers.get("batch_norm_eps", 1e-4))
        mean, var = batch_norm
        std = tuple(float(np.sqrt(v + eps)) for v in var)
        return Convention(formula="mean-std", scale=(1.0,), shift=tuple(map(float, mean)),
                          std=std, packing="2x2", source="weights")  # fmt: skip
    if name == "AutoencoderKLQwenImage":
        return Convention(
            formula="mean-std",
            scale=(1.0,),
            shift=tuple(float(v) for v in diffusers["latents_mean"]),
            std=tuple(float(v) for v in diffusers["latents_std"]),
        )
    if diffusers.get("latents_mean") and diffusers.get("latents_std"):
        return Convention(
            formula="mean-std",
            scale=(scale,),
            shift=tuple(float(v) for v in diffusers["latents_mean"]),
            std=tuple(float(v) for v in diffusers["latents_std"]),
        )
    return Convention(formula="scale-shift", scale=(scale,), shift=(shift,))


FAMILIES = {
    "AutoencoderKL": "KL (SD 1.x/2.x, SDXL, SD3, FLUX.1)",
    "AutoencoderTiny": "TAESD",
    "AutoencoderDC": "DC-AE (Sana)",
    "AutoencoderKLFlux2": "FLUX.2",
    "AutoencoderKLQwenImage": "Qwen-Image",
}


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
        if self.diffusers is not None:  # FLUX.2's stored latents are 2x2-patchified too
            return len(self.widths) - (0 if self.preset == "AutoencoderKLFlux2" else 1)
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
        ``latent.convention``: :meth:`Convention.to_dict` of :func:`of_config`), as the
        diffusion model sees them; a decode undoes it once. None for latentbatch's
        presets."""
        if self.diffusers is None:
            return None
        return of_config(self.diffusers).to_dict()

    @property
    def family(self) -> str:
        """The autoencoder family, by its diffusers class (``latentbatch`` for the
        presets)."""
        return FAMILIES.get(self.preset, "latentbatch")

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
