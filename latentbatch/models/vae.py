"""diffusers autoencoders (``AutoencoderKL``: Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1
VAEs; ``AutoencoderTiny``: TAESD; ``AutoencoderDC``: Sana's DC-AE;
``AutoencoderKLFlux2``: FLUX.2's; ``AutoencoderKLQwenImage``: Qwen-Image's, one frame of
its 5-D interface) as latentbatch's encoder and decoder modules.

The architecture is diffusers' own, built from the directory's ``config.json`` (diffusers
is imported here, when such a model is used: it takes seconds), the weights are the
safetensors bytes checked against the model id, and nothing is unpickled. The modules
speak latentbatch's conventions, so the device kernel, the canary and every check treat
them like the presets':

- :class:`VaeDecoder`: stored latents → images in [0, 1]: the family's convention
  (:class:`latentbatch.config.Convention`) undone exactly as its diffusers pipeline does
  (``z / scaling + shift``; ``z * std / scaling + mean``; FLUX.2's BatchNorm statistics
  and 2×2 unpatchify), ``vae.decode(z)``, then ``(x + 1) / 2``; an image over the memory
  budget (:func:`latentbatch.config.tiled`) in diffusers' tiles;
- :class:`VaeEncoder`: images in [0, 1] → stored latents: the mean of the latent
  distribution (deterministic; TAESD's and DC-AE's latents as they are), then the
  convention applied.

The convention is the model's ``config.json``'s (FLUX.2's statistics its weights'); a
store records it (``latent.convention``) and ``inspect`` and ``models show`` show it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from latentbatch.config import Convention, ModelConfig, of_config, tiled
from latentbatch.errors import CheckpointError

FIVE_D = ("AutoencoderKLQwenImage",)
"""Families whose autoencoder takes video-shaped ``(B, C, T, H, W)`` tensors: an image is
one frame."""


def _diffusers_class(name: str) -> Any:
    import diffusers  # seconds to import: only when a diffusers model is used

    found = getattr(diffusers, name, None)
    if found is None:
        raise CheckpointError(
            f"this diffusers ({diffusers.__version__}) has no {name}; install a diffusers "
            "that has it (0.36 or later) to use this model"
        )
    return found


def convention_of(vae: Any, config: ModelConfig) -> Convention:
    """The model's convention, FLUX.2's with the BatchNorm statistics of its weights."""
    assert config.diffusers is not None
    if config.preset != "AutoencoderKLFlux2":
        return of_config(config.diffusers)
    stats = (vae.bn.running_mean.tolist(), vae.bn.running_var.tolist())
    return of_config(config.diffusers, batch_norm=stats)


class _Vectors(torch.nn.Module):
    """A convention's values as ``(1, C, 1, 1)`` tensors (buffers: they follow the
    module to its device)."""

    scale: torch.Tensor
    shift: torch.Tensor
    std: torch.Tensor

    def __init__(self, convention: Convention) -> None:
        super().__init__()
        self.convention = convention

        def vector(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values or (1.0,), dtype=torch.float32).view(1, -1, 1, 1)

        self.register_buffer("scale", vector(convention.scale), persistent=False)
        self.register_buffer("shift", vector(convention.shift or (0.0,)), persistent=False)
        self.register_buffer("std", vector(convention.std), persistent=False)

    def to_vae(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.convention.to_vae(x, (self.scale, self.shift, self.std))
        return z

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.convention.from_vae(z, (self.scale, self.shift, self.std))
        return x


def build_vae(config: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The diffusers autoencoder ``config`` describes with the weights ``tensors``, in
    float32 eval mode; weights that do not fit are refused with the misfits named."""
    if config.diffusers is None:
        raise CheckpointError(f"{where} is not a diffusers autoencoder")
    cls = _diffusers_class(config.preset)
    accepted = set(inspect.signature(cls.__init__).parameters)
    settings = {k: v for k, v in config.diffusers.items() if k in accepted}
    vae = cls.from_config(settings)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        problems += [f"{k} has shape {tuple(tensors[k].shape)}" for k in wrong]
        raise CheckpointError(
            f"weights in {where} do not fit its config.json ({config.preset}): "
            + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        )
    vae.load_state_dict({k: v.float() for k, v in tensors.items()})
    return vae.float().eval()


class VaeDecoder(torch.nn.Module):
    """Stored latents → images in [0, 1] through a diffusers autoencoder's decoder."""

    def __init__(self, vae: Any, config: ModelConfig) -> None:
        super().__init__()
        self.vae = vae
        self.config = config
        self.vectors = _Vectors(convention_of(vae, config))
        self.frames = config.preset in FIVE_D

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.vectors.to_vae(latents)
        side = self.config.downsampling
        image_bytes = self.config.decode_bytes(latents.shape[-2] * side, latents.shape[-1] * side)
        if self.frames:
            z = z[:, :, None]
        sample: torch.Tensor
        if tiled(image_bytes):  # over the memory budget: diffusers' tiled decode
            if hasattr(self.vae, "tiled_decode"):
                found = self.vae.tiled_decode(z)
                sample = found.sample if hasattr(found, "sample") else found
            else:
                sample = self.vae._tiled_decode(z)
        else:
            sample = self.vae.decode(z).sample
        if self.frames:
            sample = sample[:, :, 0]
        return (sample + 1) / 2


class VaeEncoder(torch.nn.Module):
    """Images in [0, 1] → stored latents (the distribution's mean, by the convention)
    through a diffusers autoencoder's encoder."""

    def __init__(self, vae: Any, config: ModelConfig) -> None:
        super().__init__()
        self.vae = vae
        self.vectors = _Vectors(convention_of(vae, config))
        self.frames = config.preset in FIVE_D

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        encoded = self.vae.encode(x[:, :, None] if self.frames else x)
        dist = getattr(encoded, "latent_dist", None)
        if dist is not None:
            latents: torch.Tensor = dist.mean
        else:  # TAESD's latents, DC-AE's latent
            latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent
        if self.frames:
            latents = latents[:, :, 0]
        return self.vectors.from_vae(latents)


class VaeAutoencoder(torch.nn.Module):
    """Both halves, sharing one diffusers model: ``encoder`` and ``decoder``, as
    :class:`latentbatch.models.autoencoder.Autoencoder` has them."""

    def __init__(self, vae: Any, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = VaeEncoder(vae, config)
        self.decoder = VaeDecoder(vae, config)
        self.prior = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        reconstructions: torch.Tensor = self.decoder(self.encoder(images))
        return reconstructions
