"""diffusers autoencoders (``AutoencoderKL``: Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1
VAEs; ``AutoencoderTiny``: TAESD) as latentbatch's encoder and decoder modules.

The architecture is diffusers' own, built from the directory's ``config.json`` (diffusers
is imported here, when such a model is used: it takes seconds), the weights are the
safetensors bytes checked against the model id, and nothing is unpickled. The modules
speak latentbatch's conventions, so the device kernel, the canary and every check treat
them like the presets':

- :class:`VaeDecoder`: stored latents → images in [0, 1]: ``vae.decode(z / scaling +
  shift)``, exactly as diffusers' pipelines undo the convention, then ``(x + 1) / 2``; an
  image over the memory budget (:func:`latentbatch.config.tiled`) in diffusers' tiles;
- :class:`VaeEncoder`: images in [0, 1] → stored latents: the mean of the latent
  distribution (deterministic; TAESD's latents as they are), then ``(z - shift) *
  scaling``.

The convention (scaling factor, shift) is the model's ``config.json``'s; a store records
it (``latent.convention``) and ``inspect`` shows it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from latentbatch.config import ModelConfig, tiled
from latentbatch.errors import CheckpointError


def _diffusers_class(name: str) -> Any:
    import diffusers  # seconds to import: only when a diffusers model is used

    return getattr(diffusers, name)


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
        self.scaling = config.scaling_factor
        self.shift = config.shift_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling + self.shift
        side = self.config.downsampling
        image_bytes = self.config.decode_bytes(z.shape[-2] * side, z.shape[-1] * side)
        sample: torch.Tensor
        if tiled(image_bytes):  # over the memory budget: diffusers' tiled decode
            if hasattr(self.vae, "tiled_decode"):
                sample = self.vae.tiled_decode(z).sample
            else:
                sample = self.vae._tiled_decode(z)
        else:
            sample = self.vae.decode(z).sample
        return (sample + 1) / 2


class VaeEncoder(torch.nn.Module):
    """Images in [0, 1] → stored latents (the distribution's mean, scaled) through a
    diffusers autoencoder's encoder."""

    def __init__(self, vae: Any, config: ModelConfig) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = config.scaling_factor
        self.shift = config.shift_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images * 2 - 1)
        dist = getattr(encoded, "latent_dist", None)
        latents: torch.Tensor = dist.mean if dist is not None else encoded.latents
        return (latents - self.shift) * self.scaling


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
