"""Model directories: ``model.safetensors`` + ``config.json``, and nothing executable.

::

    models/NAME/
      model.safetensors      weights (encoder.* and decoder.*); the model id is its sha256
      config.json            architecture, image geometry, normalisation, training record
      optimizer.safetensors  Adam state, only for resuming training
      reconstructions.png    originals above, reconstructions below
      curves.png             loss and validation PSNR/SSIM per epoch

Loading reads safetensors only, so nothing is ever unpickled; a weights file whose tensor
names or shapes do not fit ``config.json`` is refused with a message listing the misfits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from latentbatch.config import ModelConfig
from latentbatch.errors import CheckpointError, ConfigError, LatentbatchError
from latentbatch.model import Autoencoder, Decoder, Encoder
from latentbatch.storage import sha256_file, write_bytes, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.safetensors"
RECONSTRUCTIONS = "reconstructions.png"
CURVES = "curves.png"
FORMAT = 1
NORMALISATION = {"pixels": "uint8 / 255 -> [0, 1]", "output": "sigmoid in [0, 1]"}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What ``config.json`` says about a model directory, plus its id."""

    path: Path
    model_id: str
    config: ModelConfig
    meta: dict[str, Any]

    @property
    def short_id(self) -> str:
        return self.model_id[:12]


def _describe_not_safetensors(path: Path) -> str:
    head = path.read_bytes()[:4]
    if head.startswith(b"PK"):
        kind = "a zip archive (a torch.save checkpoint?)"
    elif head[:1] == b"\x80":
        kind = "a pickle"
    else:
        kind = "not a safetensors file"
    return (
        f"{path} is {kind}; latentbatch loads safetensors only and never unpickles. "
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
        raise CheckpointError(_describe_not_safetensors(path)) from exc


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (byte-identical for identical tensors)."""
    write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def model_id(directory: Path) -> str:
    """The model id: sha256 of ``model.safetensors``."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {WEIGHTS} is missing")
    return sha256_file(path)


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
        "latent": {"shape": list(model.config.latent_shape)},
        "normalisation": NORMALISATION,
        "model_id": new_id,
    }
    write_json(directory / CONFIG, payload)
    return new_id


def read_info(directory: Path) -> ModelInfo:
    """Read ``config.json`` and the model id; check that they belong together."""
    directory = Path(directory)
    config_path = directory / CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG} is missing")
    try:
        meta = json.loads(config_path.read_text())
        config = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{config_path} is not a valid model config: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_path} has format {meta.get('format')!r}; this latentbatch reads {FORMAT}"
        )
    actual = model_id(directory)
    recorded = meta.get("model_id")
    if recorded is not None and recorded != actual:
        raise CheckpointError(
            f"{directory / WEIGHTS} (id {actual[:12]}) is not the file {CONFIG} was written for "
            f"(id {str(recorded)[:12]}); restore the weights or retrain"
        )
    return ModelInfo(path=directory, model_id=actual, config=config, meta=meta)


@dataclass(frozen=True, kw_only=True)
class ModelListing:
    """The model directories found under a folder, and the ones that could not be read."""

    models: tuple[ModelInfo, ...]
    broken: tuple[tuple[Path, str], ...]


def find_models(root: Path) -> ModelListing:
    """Every model directory (a folder with ``config.json``) under ``root``, sorted by path;
    unreadable ones are listed with the reason."""
    models: list[ModelInfo] = []
    broken: list[tuple[Path, str]] = []
    if Path(root).is_dir():
        for config_path in sorted(Path(root).rglob(CONFIG)):
            try:
                models.append(read_info(config_path.parent))
            except LatentbatchError as exc:
                broken.append((config_path.parent, str(exc)))
    return ModelListing(models=tuple(models), broken=tuple(broken))


def summary(info: ModelInfo) -> dict[str, Any]:
    """The facts ``latentbatch models`` shows: path, id, preset, geometry, latent shape,
    data source, epochs and the last validation PSNR/SSIM."""
    history = info.meta.get("training", {}).get("history", [])
    final = history[-1] if history else {}
    return {
        "path": str(info.path),
        "model_id": info.model_id,
        "preset": info.config.preset,
        "image": f"{info.config.image_size}x{info.config.image_size}x{info.config.channels}",
        "latent": list(info.config.latent_shape),
        "source": info.meta.get("source", {}).get("spec"),
        "epochs": len(history),
        "val_psnr": final.get("val_psnr"),
        "val_ssim": final.get("val_ssim"),
    }


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
    doubles CPU convolution and up-sampling speed."""
    full = Autoencoder(config)
    _check_fit(full.state_dict(), tensors, where)
    module: torch.nn.Module
    if part == "autoencoder":
        module, state = full, tensors
    else:
        module = Encoder(config) if part == "encoder" else Decoder(config)
        prefix = f"{part}."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(state)
    # torch's stubs for Module.to omit memory_format, which it accepts
    return module.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload,no-any-return]


def load_model(
    directory: Path, part: Part = "autoencoder", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelInfo]:
    """Load a model directory's model (or only its encoder or decoder), and its info."""
    info = read_info(directory)
    tensors = read_tensors(Path(directory) / WEIGHTS)
    module = build_model(info.config, tensors, part, str(Path(directory) / WEIGHTS))
    return module.to(device), info


def load_model_bytes(
    weights: bytes, config: ModelConfig, expected_id: str, part: Part = "autoencoder"
) -> torch.nn.Module:
    """Like :func:`load_model`, from the bytes of a ``model.safetensors`` file whose sha256
    must be ``expected_id`` (what a worker receives instead of a path)."""
    digest = hashlib.sha256(weights).hexdigest()
    if digest != expected_id:
        raise CheckpointError(
            f"model bytes have id {digest[:12]}, expected {expected_id[:12]}; "
            "the model directory changed while it was being sent: run again"
        )
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"model {expected_id[:12]} is not a safetensors file") from exc
    return build_model(config, tensors, part, f"model {expected_id[:12]}")
