"""Weights into torch modules, and modules into weights: safetensors only.

Loading reads safetensors only, so nothing is ever unpickled; a weights file whose tensor
names or shapes do not fit ``config.json`` is refused with a message listing the misfits.
:func:`load_model` reads a model directory's weights once (:func:`checkpoint.read_model
<latentbatch.models.checkpoint.read_model>`), checks them against the id and builds the part
asked for; a command that needs several parts loads the autoencoder once
(:class:`LoadedModel`) and hands its parts on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from latentbatch.config import ModelConfig
from latentbatch.errors import CheckpointError
from latentbatch.ids import short_id
from latentbatch.models.autoencoder import Autoencoder, build_decoder, build_encoder
from latentbatch.models.checkpoint import (
    CONFIG,
    FORMAT,
    NORMALISATION,
    WEIGHTS,
    ModelInfo,
    ModelLocation,
    model_id,
    read_model,
)
from latentbatch.storage.fs import StorageOptions, write_bytes, write_json


def _describe_not_safetensors(head: bytes, where: str) -> str:
    if head.startswith(b"PK"):
        kind = "a zip archive (a torch.save checkpoint?)"
    elif head[:1] == b"\x80":
        kind = "a pickle"
    else:
        kind = "not a safetensors file"
    return (
        f"{where} is {kind}; latentbatch loads safetensors only and never unpickles. "
        "Convert the weights with safetensors.torch.save_file"
    )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, refusing anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_describe_not_safetensors(path.read_bytes()[:4], str(path))) from exc


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (byte-identical for identical tensors)."""
    write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def save_model(directory: Path, model: Autoencoder, meta: dict[str, Any]) -> str:
    """Write weights, then ``config.json`` (with the new id); return the model id."""
    directory = Path(directory)
    write_tensors(directory / WEIGHTS, model.state_dict())
    new_id = model_id(directory)
    payload = {
        **meta,
        "format": FORMAT,
        "model": model.config.to_dict(),
        "image": {
            "height": model.config.image_size,
            "width": model.config.image_size,
            "mode": model.config.mode,
        },
        "latent": {
            "shape": list(model.config.latent_shape),
            "quantization": model.prior.describe() if model.prior is not None else None,
        },
        "normalisation": NORMALISATION,
        "model_id": new_id,
    }
    write_json(directory / CONFIG, payload)
    return new_id


def _check_fit(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str
) -> None:
    problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
    problems += [
        f"{k} has shape {tuple(found[k].shape)}, config needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        raise CheckpointError(f"weights in {where} do not fit its {CONFIG}: {shown}")


Part = Literal["autoencoder", "encoder", "decoder"]


def build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], part: Part, where: str
) -> torch.nn.Module:
    """The ``part`` of the autoencoder ``config`` describes, with weights from ``tensors``
    (checked against the architecture first), in eval mode and channels-last, which about
    doubles CPU convolution and up-sampling speed; a diffusers autoencoder's through
    :mod:`latentbatch.models.vae`, in diffusers' own layout."""
    if config.diffusers is not None:
        from latentbatch.models import vae  # diffusers: imported only for its models

        built = vae.build_vae(config, tensors, where)
        parts = {"encoder": vae.VaeEncoder, "decoder": vae.VaeDecoder}
        wrapper = vae.VaeAutoencoder if part == "autoencoder" else parts[part]
        wrapped: torch.nn.Module = wrapper(built, config).eval()
        return wrapped
    full = Autoencoder(config)
    _check_fit(full.state_dict(), tensors, where)
    module: torch.nn.Module
    if part == "autoencoder":
        module, state = full, tensors
    else:
        module = build_encoder(config) if part == "encoder" else build_decoder(config)
        prefix = f"{part}."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(state)
    # torch's stubs for Module.to omit memory_format, which it accepts
    return module.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload,no-any-return]


def load_model(
    location: ModelLocation,
    part: Part = "autoencoder",
    device: str | torch.device = "cpu",
    options: StorageOptions | None = None,
) -> tuple[torch.nn.Module, ModelInfo]:
    """Load a model directory's model (or only its encoder or decoder), and its info; the
    weights are read once and checked against the id (a URL's through this host's
    checked copy, :func:`latentbatch.models.checkpoint.weights_bytes`)."""
    info, weights = read_model(location, options)
    where = f"{info.location.rstrip('/')}/{WEIGHTS}"
    return _build_from_bytes(weights, info.config, part, where).to(device), info


def _build_from_bytes(
    weights: bytes, config: ModelConfig, part: Part, where: str
) -> torch.nn.Module:
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(_describe_not_safetensors(weights[:4], where)) from exc
    return build_model(config, tensors, part, where)


def load_model_bytes(
    weights: bytes, config: ModelConfig, expected_id: str, part: Part = "autoencoder"
) -> torch.nn.Module:
    """Like :func:`load_model`, from the bytes of a ``model.safetensors`` file whose sha256
    must be ``expected_id`` (what a worker receives instead of a path)."""
    digest = hashlib.sha256(weights).hexdigest()
    if digest != expected_id:
        raise CheckpointError(
            f"model bytes have id {short_id(digest)}, expected {short_id(expected_id)}; "
            "the model directory changed while it was being sent: run again"
        )
    return _build_from_bytes(weights, config, part, f"model {short_id(expected_id)}")


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model's autoencoder, loaded once, with its info: what a command that encodes and
    decodes in this process hands to each step, so the weights are read once."""

    autoencoder: torch.nn.Module  # with .encoder and .decoder: Autoencoder, VaeAutoencoder
    info: ModelInfo

    @property
    def encoder(self) -> torch.nn.Module:
        encoder = self.autoencoder.encoder
        assert isinstance(encoder, torch.nn.Module)
        return encoder

    @property
    def decoder(self) -> torch.nn.Module:
        decoder = self.autoencoder.decoder
        assert isinstance(decoder, torch.nn.Module)
        return decoder


def loaded(
    model: ModelLocation | LoadedModel, options: StorageOptions | None = None
) -> LoadedModel:
    """``model`` itself when already loaded, else its autoencoder loaded on the CPU."""
    if isinstance(model, LoadedModel):
        return model
    autoencoder, info = load_model(model, "autoencoder", options=options)
    return LoadedModel(autoencoder=autoencoder, info=info)
