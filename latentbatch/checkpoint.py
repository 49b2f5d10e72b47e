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

A model is a location: a local folder or any fsspec URL (``s3://bucket/models/NAME`` with
storage options). For a URL only ``config.json`` is read to learn the model (its recorded
id is the expected one); whoever loads the weights copies ``config.json`` and
``model.safetensors`` once into a local cache keyed by that id
(``$LATENTBATCH_MODEL_CACHE``, default ``~/.cache/latentbatch/models/ID``) and checks
their sha256 against it first, so weights altered after training are refused by id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from latentbatch.config import ModelConfig
from latentbatch.errors import CheckpointError, ConfigError, LatentbatchError
from latentbatch.model import Autoencoder, build_decoder, build_encoder
from latentbatch.storage import (
    TEMPORARY_SUFFIX,
    StorageOptions,
    filesystem,
    is_remote,
    join,
    sha256_file,
    write_bytes,
    write_json,
)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.safetensors"
RECONSTRUCTIONS = "reconstructions.png"
CURVES = "curves.png"
FORMAT = 1
NORMALISATION = {"pixels": "uint8 / 255 -> [0, 1]", "output": "sigmoid in [0, 1]"}
MODEL_CACHE_ENV = "LATENTBATCH_MODEL_CACHE"
ModelLocation = str | Path  # a local model directory or an fsspec URL of one


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What ``config.json`` says about a model directory, plus its id and where it is."""

    location: str  # a local path, or a URL whose weights are checked where they are loaded
    model_id: str
    config: ModelConfig
    meta: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.model_id[:12]

    @property
    def is_remote(self) -> bool:
        return is_remote(self.location)

    @property
    def rate_lambda(self) -> float | None:
        """The lambda a ``codec`` model was trained with (``--lambda``), else None."""
        trained = self.meta.get("training", {}).get("config", {})
        value = trained.get("rate_lambda") if isinstance(trained, dict) else None
        return float(value) if value is not None else None

    @property
    def quantization(self) -> dict[str, Any] | None:
        """A quantised model's step, range and prior (see ``LogisticPrior.describe``)."""
        found = self.meta.get("latent", {}).get("quantization")
        return dict(found) if isinstance(found, dict) else None


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
        "latent": {
            "shape": list(model.config.latent_shape),
            "quantization": model.prior.describe() if model.prior is not None else None,
        },
        "normalisation": NORMALISATION,
        "model_id": new_id,
    }
    write_json(directory / CONFIG, payload)
    return new_id


def _parse_config(text: str | bytes, where: str) -> tuple[dict[str, Any], ModelConfig]:
    try:
        meta = json.loads(text)
        config = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{where} is not a valid model config: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} has format {meta.get('format')!r}; this latentbatch reads {FORMAT}"
        )
    return meta, config


def _read_remote_info(url: str, options: StorageOptions | None) -> ModelInfo:
    fs, path = filesystem(url, options)
    where = join(url, CONFIG)
    try:
        text = fs.cat_file(join(path, CONFIG))
    except FileNotFoundError:
        raise CheckpointError(
            f"{url} is not a model directory: {CONFIG} is missing (check the URL)"
        ) from None
    meta, config = _parse_config(text, where)
    recorded = meta.get("model_id")
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise CheckpointError(
            f"{where} records no model id, so its weights cannot be checked where they "
            "are loaded; copy a model directory written by latentbatch train"
        )
    return ModelInfo(
        location=url,
        model_id=recorded,
        config=config,
        meta=meta,
        storage_options=dict(options or {}),
    )


def read_info(location: ModelLocation, options: StorageOptions | None = None) -> ModelInfo:
    """Read ``config.json`` and the model id. A local directory's weights are hashed and
    must be the file its config was written for; a URL's id is the one its config
    records (checked against the weights wherever they are loaded)."""
    if is_remote(location):
        return _read_remote_info(str(location), options)
    directory = Path(location)
    config_path = directory / CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG} is missing")
    meta, config = _parse_config(config_path.read_text(), str(config_path))
    actual = model_id(directory)
    recorded = meta.get("model_id")
    if recorded is not None and recorded != actual:
        raise CheckpointError(
            f"{directory / WEIGHTS} (id {actual[:12]}) is not the file {CONFIG} was written for "
            f"(id {str(recorded)[:12]}); restore the weights or retrain"
        )
    return ModelInfo(location=str(directory), model_id=actual, config=config, meta=meta)


def model_cache() -> Path:
    """This machine's cache of models fetched from URLs: ``$LATENTBATCH_MODEL_CACHE``, or
    ``~/.cache/latentbatch/models``."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "latentbatch" / "models"


def _fetch(info: ModelInfo, target: Path) -> None:
    """Copy a URL's config and weights into ``target`` (renamed into place whole), after
    checking the weights' sha256 against the id the client expects."""
    fs, path = filesystem(info.location, info.storage_options)
    try:
        weights = fs.cat_file(join(path, WEIGHTS))
        config = fs.cat_file(join(path, CONFIG))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{info.location} is not a model directory: {exc}") from None
    actual = hashlib.sha256(weights).hexdigest()
    if actual != info.model_id:
        raise CheckpointError(
            f"the weights at {join(info.location, WEIGHTS)} have id {actual[:12]}, not the "
            f"expected {info.model_id[:12]} that its {CONFIG} records: they were altered "
            "after training; restore them or point --model at the model you meant"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent)
    )
    try:
        (staging / WEIGHTS).write_bytes(weights)
        (staging / CONFIG).write_bytes(config)
        try:
            staging.rename(target)
        except OSError:  # another process of this machine fetched it first
            if not (target / WEIGHTS).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def local_copy(info: ModelInfo) -> Path:
    """A local directory holding ``info``'s weights, checked against its id: the directory
    itself for a local model; for a URL the cached copy (fetched on first use, fetched
    again when the cached weights no longer match the id)."""
    if not info.is_remote:
        return Path(info.location)
    target = model_cache() / info.model_id
    if (target / WEIGHTS).is_file():
        if sha256_file(target / WEIGHTS) == info.model_id:
            return target
        shutil.rmtree(target, ignore_errors=True)
    _fetch(info, target)
    return target


@dataclass(frozen=True, kw_only=True)
class ModelListing:
    """The model directories found under a folder, and the ones that could not be read."""

    models: tuple[ModelInfo, ...]
    broken: tuple[tuple[str, str], ...]


def _model_folders(root: str, options: StorageOptions | None) -> list[str]:
    if not is_remote(root):
        return (
            [str(p.parent) for p in sorted(Path(root).rglob(CONFIG))] if Path(root).is_dir() else []
        )
    fs, path = filesystem(root, options)
    if not fs.isdir(path):
        return []
    found = sorted(p for p in fs.find(path) if p.rsplit("/", 1)[-1] == CONFIG)
    # each folder as the root was written plus its path below the root
    below = [p[len(path.rstrip("/")) :].strip("/").rpartition("/")[0] for p in found]
    return [join(root, folder) if folder else root for folder in below]


def find_models(root: ModelLocation, options: StorageOptions | None = None) -> ModelListing:
    """Every model directory (a folder with ``config.json``) under ``root`` (a folder or
    a URL prefix), sorted by path; unreadable ones are listed with the reason."""
    models: list[ModelInfo] = []
    broken: list[tuple[str, str]] = []
    for folder in _model_folders(str(root), options):
        try:
            models.append(read_info(folder, options))
        except LatentbatchError as exc:
            broken.append((folder, str(exc)))
    return ModelListing(models=tuple(models), broken=tuple(broken))


def summary(info: ModelInfo) -> dict[str, Any]:
    """The facts ``latentbatch models`` shows: path, id, preset, geometry, latent shape,
    data source, epochs and the last validation PSNR/SSIM; for the codec preset its lambda
    and the last validation rate its entropy model estimated."""
    history = info.meta.get("training", {}).get("history", [])
    final = history[-1] if history else {}
    return {
        "path": info.location,
        "model_id": info.model_id,
        "preset": info.config.preset,
        "image": f"{info.config.image_size}x{info.config.image_size}x{info.config.channels}",
        "latent": list(info.config.latent_shape),
        "source": info.meta.get("source", {}).get("spec"),
        "epochs": len(history),
        "val_psnr": final.get("val_psnr"),
        "val_ssim": final.get("val_ssim"),
        **(
            {
                "lambda": info.rate_lambda,
                "val_bpp": final.get("val_bpp"),
            }
            if info.config.quantized
            else {}
        ),
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
    """Load a model directory's model (or only its encoder or decoder), and its info; a
    URL's through the checked local copy (:func:`local_copy`)."""
    info = read_info(location, options)
    weights = local_copy(info) / WEIGHTS
    module = build_model(info.config, read_tensors(weights), part, str(weights))
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
