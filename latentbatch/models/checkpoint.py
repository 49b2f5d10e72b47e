"""Model directories: what ``config.json`` says, the model id, where weights are found.

::

    models/NAME/
      model.safetensors      weights (encoder.* and decoder.*); the model id is its sha256
      config.json            architecture, image geometry, normalisation, training record
      optimizer.safetensors  Adam state, only for resuming training
      reconstructions.png    originals above, reconstructions below
      curves.png             loss and validation PSNR/SSIM per epoch

Everything here is metadata and bytes: no torch, so listing, showing and checking models
is quick. Turning weights into modules is :mod:`latentbatch.models.weights`' job.

A model is a location: a local folder or any fsspec URL (``s3://bucket/models/NAME`` with
storage options). For a URL only ``config.json`` is read to learn the model (its recorded
id is the expected one); whoever loads the weights copies ``config.json`` and
``model.safetensors`` once into a local cache keyed by that id
(``$LATENTBATCH_MODEL_CACHE``, default ``~/.cache/latentbatch/models/ID``) and checks
their sha256 against it first, so weights altered after training are refused by id.

Model directories are named by one rule, :func:`model_dir_for`: ``ROOT/PRESET-SOURCE``.

A **diffusers autoencoder directory** is a model too: a ``config.json`` whose
``_class_name`` is ``AutoencoderKL`` or ``AutoencoderTiny`` (others are refused, naming
these), and the weights in ``diffusion_pytorch_model.safetensors`` (or its
``.fp16.safetensors`` variant; ``.bin`` and other pickles are refused). A Hugging Face
cache snapshot directory is one as it is. Its id is the sha256 of the weights file (for a
URL, of the bytes read once when the model is read); its architecture is built by
diffusers (:mod:`latentbatch.models.vae`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentbatch.config import ModelConfig, of_config
from latentbatch.errors import CheckpointError, ConfigError, LatentbatchError
from latentbatch.ids import short_id
from latentbatch.storage.fs import (
    TEMPORARY_SUFFIX,
    StorageOptions,
    filesystem,
    is_remote,
    join,
    sha256_file,
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
MODELS_ROOT = Path("models")
_MODEL_ID = re.compile(r"[0-9a-f]{64}")
DIFFUSERS_CLASSES = (
    "AutoencoderKL",
    "AutoencoderTiny",
    "AutoencoderDC",
    "AutoencoderKLFlux2",
    "AutoencoderKLQwenImage",
)
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
)
PICKLED_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
TINY_IMAGE_SIZE = 512
"""The image side of an ``AutoencoderTiny`` whose config records no ``sample_size``
(TAESD's does not)."""


def model_dir_for(preset: str, source: str, root: ModelLocation = MODELS_ROOT) -> Path:
    """The one naming rule of model directories: ``ROOT/PRESET-SOURCE``, a folder source's
    path flattened into the name (``folder:data/cats`` → ``compact-data-cats``) and a
    source's ``:`` argument joined by a dash (``synthetic:512`` → ``seed-synthetic-512``).
    ``latentbatch train``, the pipeline, the train flow and the deployments all use it."""
    name = source.removeprefix("folder:").rstrip("/").replace("/", "-").replace(":", "-")
    return Path(root) / f"{preset}-{name}"


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What ``config.json`` says about a model directory, plus its id and where it is."""

    location: str  # a local path, or a URL whose weights are checked where they are loaded
    model_id: str
    config: ModelConfig
    meta: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)
    weights: str = WEIGHTS  # the weights file's name in the directory

    @property
    def short_id(self) -> str:
        return short_id(self.model_id)

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


def model_id(directory: Path) -> str:
    """The model id: sha256 of ``model.safetensors``."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {WEIGHTS} is missing")
    return sha256_file(path)


def _diffusers_config(meta: dict[str, Any], where: str) -> ModelConfig:
    """The :class:`ModelConfig` of a diffusers autoencoder's ``config.json``."""
    name = meta["_class_name"]
    if name not in DIFFUSERS_CLASSES:
        raise CheckpointError(
            f"{where} describes a diffusers {name}; latentbatch decodes the "
            f"{', '.join(DIFFUSERS_CLASSES)} autoencoders"
        )
    channels = int(meta.get("in_channels", meta.get("input_channels", 3)))
    if int(meta.get("out_channels", channels)) != channels:
        raise CheckpointError(f"{where}: in_channels and out_channels differ; images go both ways")
    latent_channels = int(meta.get("latent_channels", 4))
    size = meta.get("sample_size", TINY_IMAGE_SIZE)
    if name in ("AutoencoderKL", "AutoencoderKLFlux2"):
        widths = meta.get("decoder_block_out_channels") or meta.get("block_out_channels", [64])
        size = meta.get("sample_size", 32)
        if name == "AutoencoderKLFlux2":  # stored 2x2-patchified: 4x the channels
            latent_channels *= 4
    elif name == "AutoencoderDC":
        widths = meta.get("decoder_block_out_channels", [128, 256, 512, 512, 1024, 1024])
    elif name == "AutoencoderKLQwenImage":
        widths = [int(meta.get("base_dim", 96)) * m for m in meta.get("dim_mult", [1, 2, 4, 4])]
        latent_channels = int(meta.get("z_dim", 16))
    else:
        widths = meta.get("decoder_block_out_channels", [64, 64, 64, 64])
        if int(meta.get("upsampling_scaling_factor", 2)) != 2:
            raise CheckpointError(
                f"{where}: upsampling_scaling_factor other than 2 is not supported"
            )
    size = size[0] if isinstance(size, list) else size
    kept = {k: v for k, v in meta.items() if k != "_name_or_path"}  # where it was saved
    return ModelConfig(
        preset=name,
        channels=channels,
        image_size=int(size),
        widths=tuple(int(w) for w in widths),
        latent_channels=latent_channels,
        diffusers=kept,
    )


def _parse_config(text: str | bytes, where: str) -> tuple[dict[str, Any], ModelConfig]:
    try:
        meta = json.loads(text)
        if isinstance(meta, dict) and "_class_name" in meta:
            return meta, _diffusers_config(meta, where)
        config = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{where} is not a valid model config: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} has format {meta.get('format')!r}; this latentbatch reads {FORMAT}"
        )
    return meta, config


def weights_name(meta: dict[str, Any], names: list[str], where: str) -> str:
    """The weights file of a model directory holding the files ``names``: latentbatch's
    ``model.safetensors``, or a diffusers autoencoder's safetensors (pickles refused)."""
    if "_class_name" not in meta:
        if WEIGHTS not in names:
            raise CheckpointError(f"{where} is not a model directory: {WEIGHTS} is missing")
        return WEIGHTS
    found = next((n for n in DIFFUSERS_WEIGHTS if n in names), None)
    if found is not None:
        return found
    pickled = next((n for n in PICKLED_WEIGHTS if n in names), None)
    if pickled is not None:
        raise CheckpointError(
            f"{where} holds its weights as {pickled}, a pickle; latentbatch loads safetensors "
            f"only and never unpickles: save the model with safe_serialization (the default "
            f"of save_pretrained) to get {DIFFUSERS_WEIGHTS[0]}"
        )
    raise CheckpointError(
        f"{where} is a diffusers {meta['_class_name']} directory without "
        f"{' or '.join(DIFFUSERS_WEIGHTS)}"
    )


def _read_remote_info(url: str, options: StorageOptions | None) -> tuple[ModelInfo, bytes]:
    """A URL's info, and for a diffusers directory (whose config records no id) the
    weights' bytes read to learn it (empty otherwise)."""
    fs, path = filesystem(url, options)
    where = join(url, CONFIG)
    try:
        text = fs.cat_file(join(path, CONFIG))
    except FileNotFoundError:
        raise CheckpointError(
            f"{url} is not a model directory: {CONFIG} is missing (check the URL)"
        ) from None
    meta, config = _parse_config(text, where)
    data = b""
    if config.diffusers is not None:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        name = weights_name(meta, names, url)
        data = fs.cat_file(join(path, name))
        recorded: Any = hashlib.sha256(data).hexdigest()
    else:
        name = WEIGHTS
        recorded = meta.get("model_id")
    if not isinstance(recorded, str) or not _MODEL_ID.fullmatch(recorded):
        raise CheckpointError(
            f"{where} records no model id (64 hex digits), so its weights cannot be checked "
            "where they are loaded; copy a model directory written by latentbatch train"
        )
    info = ModelInfo(
        location=url,
        model_id=recorded,
        config=config,
        meta=meta,
        storage_options=dict(options or {}),
        weights=name,
    )
    return info, data


def _local_config(directory: Path) -> tuple[dict[str, Any], ModelConfig, str]:
    config_path = directory / CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG} is missing")
    meta, config = _parse_config(config_path.read_text(), str(config_path))
    names = [p.name for p in directory.iterdir() if p.is_file()]
    return meta, config, weights_name(meta, names, str(directory))


def _local_info(
    directory: Path, meta: dict[str, Any], config: ModelConfig, name: str, actual: str
) -> ModelInfo:
    recorded = meta.get("model_id")
    if recorded is not None and recorded != actual:
        raise CheckpointError(
            f"{directory / name} (id {short_id(actual)}) is not the file {CONFIG} was written for "
            f"(id {short_id(str(recorded))}); restore the weights or retrain"
        )
    return ModelInfo(
        location=str(directory), model_id=actual, config=config, meta=meta, weights=name
    )


def read_info(location: ModelLocation, options: StorageOptions | None = None) -> ModelInfo:
    """Read ``config.json`` and the model id. A local directory's weights are hashed and
    must be the file its config was written for; a URL's id is the one its config
    records (checked against the weights wherever they are loaded), or a diffusers
    directory's the sha256 of its weights, read once here."""
    if is_remote(location):
        return _read_remote_info(str(location), options)[0]
    directory = Path(location)
    meta, config, name = _local_config(directory)
    return _local_info(directory, meta, config, name, sha256_file(directory / name))


def read_model(
    location: ModelLocation, options: StorageOptions | None = None
) -> tuple[ModelInfo, bytes]:
    """:func:`read_info` and the weights' bytes, read once and checked against the id
    (what loading a model needs: :func:`latentbatch.models.weights.load_model`)."""
    if is_remote(location):
        info, data = _read_remote_info(str(location), options)
        return info, data or weights_bytes(info)
    directory = Path(location)
    meta, config, name = _local_config(directory)
    data = (directory / name).read_bytes()
    return _local_info(directory, meta, config, name, hashlib.sha256(data).hexdigest()), data


@dataclass(frozen=True, kw_only=True)
class ModelBytes:
    """What a command hands its workers: the model's info and, for a local directory, its
    weights' bytes, read once (and hashed as they were read). A URL's are None: each
    worker's host fetches them into its model cache, and the client never reads them."""

    info: ModelInfo
    weights: bytes | None


def read_once(location: ModelLocation, options: StorageOptions | None = None) -> ModelBytes:
    """:class:`ModelBytes` of ``location``: one read of a local model's weights."""
    if is_remote(location):
        return ModelBytes(info=read_info(location, options), weights=None)
    info, data = read_model(location, options)
    return ModelBytes(info=info, weights=data)


def weights_bytes(info: ModelInfo) -> bytes:
    """The bytes of ``info``'s weights, checked against its id: from its directory, or for
    a URL from this host's cached copy (:func:`local_copy`, fetched on first use)."""
    local = not info.is_remote
    path = (Path(info.location) if local else model_cache() / info.model_id) / info.weights
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() == info.model_id:
        return data
    if local:
        raise CheckpointError(
            f"{path} is no longer the weights of model {info.short_id} (changed or removed "
            "since its config was read); run again"
        )
    return (local_copy(info) / info.weights).read_bytes()


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
        weights = fs.cat_file(join(path, info.weights))
        config = fs.cat_file(join(path, CONFIG))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{info.location} is not a model directory: {exc}") from None
    actual = hashlib.sha256(weights).hexdigest()
    if actual != info.model_id:
        raise CheckpointError(
            f"the weights at {join(info.location, info.weights)} have id {short_id(actual)}, "
            f"not the expected {short_id(info.model_id)} that its {CONFIG} records: they were "
            "altered after training; restore them or point --model at the model you meant"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent)
    )
    try:
        (staging / info.weights).write_bytes(weights)
        (staging / CONFIG).write_bytes(config)
        try:
            staging.rename(target)
        except OSError:  # another process of this machine fetched it first
            if not (target / info.weights).is_file():
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
    if (target / info.weights).is_file():
        if sha256_file(target / info.weights) == info.model_id:
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
    if info.config.diffusers is not None:
        return _diffusers_summary(info)
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


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors (name → ``dtype``, ``shape``, offsets), from its header
    alone: no tensor is read, and no torch is needed."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header: dict[str, Any] = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def parameter_count(path: Path) -> int:
    """Values in a safetensors file, from its header alone."""
    total = 0
    for entry in safetensors_header(path).values():
        count = 1
        for side in entry["shape"]:
            count *= int(side)
        total += count
    return total


def _convention_line(config: ModelConfig) -> str:
    """The model's convention in one line (FLUX.2's statistics are its weights')."""
    assert config.diffusers is not None
    found = of_config(config.diffusers)
    if found.source == "weights":
        return "z = unpatchify(x * std + mean), std and mean its BatchNorm's (in the weights)"
    return found.describe()


def _default_precision(config: ModelConfig) -> str:
    """What ``--precision auto`` decodes in: fp32 on CPU; on a GPU by ``force_upcast``."""
    if config.force_upcast is False:
        return "auto: fp16 on a GPU (force_upcast false), fp32 on CPU"
    return "auto: bf16 on a GPU that has it, else fp32 (force_upcast); fp32 on CPU"


def _diffusers_summary(info: ModelInfo) -> dict[str, Any]:
    """What ``models show`` says of a diffusers autoencoder: its class, latent channels,
    downsampling factor, scaling and shift factors and parameter count."""
    config = info.config
    weights = None if info.is_remote else Path(info.location) / info.weights
    return {
        "path": info.location,
        "model_id": info.model_id,
        "preset": config.preset,
        "class": config.preset,
        "weights": info.weights,
        "image": f"{config.image_size}x{config.image_size}x{config.channels}",
        "latent": list(config.latent_shape),
        "latent_channels": config.latent_channels,
        "downsampling": config.downsampling,
        "family": config.family,
        "convention": _convention_line(config),
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "precision": _default_precision(config),
        "decode_memory_512": f"{config.decode_bytes(512, 512) / 2**30:.2f} GiB per 512x512 image "
        "(float32)",
        "parameters": parameter_count(weights) if weights is not None else None,
        "source": None,
        "epochs": None,  # not trained here
        "val_psnr": None,
        "val_ssim": None,
    }
