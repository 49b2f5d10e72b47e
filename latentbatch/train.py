"""Seeded, resumable training of an autoencoder into a model directory.

Determinism: the split, the initial weights, every epoch's batch order and the codec
preset's quantisation noise derive from ``TrainConfig.seed`` alone (epoch ``e`` seeds its
own generators), so a run resumed from its last completed epoch ends with exactly the
weights of an uninterrupted run, and two runs with the same seed on the same machine give
the same model id.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from latentbatch.config import ModelConfig, TrainConfig, preset_config
from latentbatch.errors import CheckpointError, ConfigError
from latentbatch.figures import reconstruction_grid, save_picture, save_training_curves
from latentbatch.models import checkpoint
from latentbatch.models.autoencoder import Autoencoder, to_uint8, to_unit
from latentbatch.models.quality import psnr, ssim
from latentbatch.models.weights import read_tensors, save_model, write_tensors
from latentbatch.sources.images import Geometry, native_geometry, open_source

EpochCallback = Callable[[dict[str, float]], None]
_EVAL_BATCH = 512


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a training run left behind."""

    model_dir: Path
    model_id: str
    history: tuple[dict[str, float], ...]
    reused: bool

    @property
    def reconstructions(self) -> Path:
        return self.model_dir / checkpoint.RECONSTRUCTIONS

    @property
    def curves(self) -> Path:
        return self.model_dir / checkpoint.CURVES

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``latentbatch train --json``)."""
        return {
            "model_dir": str(self.model_dir),
            "model_id": self.model_id,
            "reused": self.reused,
            "history": list(self.history),
            "reconstructions": str(self.reconstructions),
            "curves": str(self.curves),
        }


def model_config_for(
    preset: str,
    source: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    latent_channels: int | None = None,
) -> ModelConfig:
    """The ``preset`` architecture at the source's native geometry, or at the given one."""
    native = native_geometry(source)
    config = preset_config(preset, channels or native.channels, image_size or native.size)
    if latent_channels is None:
        return config
    return dataclasses.replace(config, latent_channels=latent_channels)


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation row indices; validation gets ``round(n * val_fraction)`` rows."""
    n_val = round(n * val_fraction)
    if n_val < 1 or n - n_val < 1:
        raise ConfigError(f"{n} images cannot be split {1 - val_fraction:.0%}/{val_fraction:.0%}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def _loss_fn(name: str) -> nn.Module:
    return nn.BCELoss() if name == "bce" else nn.MSELoss()


def learning_rate(model_config: ModelConfig, train_config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (from 0): constant, except that the ``codec``
    preset drops it tenfold for the last fifth of its epochs, where the rate-distortion
    trade-off settles."""
    if model_config.quantized and epoch >= train_config.epochs - train_config.epochs // 5:
        return train_config.learning_rate / 10
    return train_config.learning_rate


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": v for i, entry in state.items() for k, v in entry.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )


def rate_distortion_loss(
    model: Autoencoder, images: torch.Tensor, rate_lambda: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``codec`` preset's objective on a batch: bits per pixel + lambda · 255² · MSE;
    returns the objective, the bits per pixel and the reconstructions."""
    reconstructions, bits = model.rate_distortion(images)
    bpp = bits.mean() / (images.shape[-2] * images.shape[-1])
    loss = bpp + rate_lambda * 255**2 * nn.functional.mse_loss(reconstructions, images)
    return loss, bpp, reconstructions


@torch.inference_mode()
def evaluate(
    model: Autoencoder, images: torch.Tensor, loss_name: str, rate_lambda: float | None = None
) -> dict[str, float]:
    """Loss, PSNR and SSIM of ``model`` on images ``(N, C, H, W)`` in [0, 1]; for the
    ``codec`` preset the rate–distortion loss and ``val_bpp``, the bits per pixel its
    entropy model gives the rounded latents."""
    model.eval()
    chunks = [images[i : i + _EVAL_BATCH] for i in range(0, len(images), _EVAL_BATCH)]
    if model.prior is None or rate_lambda is None:
        outputs = torch.cat([model(chunk) for chunk in chunks])
        return {
            "val_loss": float(_loss_fn(loss_name)(outputs, images)),
            "val_psnr": psnr(images, outputs),
            "val_ssim": ssim(images, outputs),
        }
    parts = [rate_distortion_loss(model, chunk, rate_lambda) for chunk in chunks]
    weights = [len(chunk) / len(images) for chunk in chunks]
    outputs = torch.cat([reconstructions for _, _, reconstructions in parts])
    return {
        "val_loss": sum(float(loss) * w for (loss, _, _), w in zip(parts, weights, strict=True)),
        "val_psnr": psnr(images, outputs),
        "val_ssim": ssim(images, outputs),
        "val_bpp": sum(float(bpp) * w for (_, bpp, _), w in zip(parts, weights, strict=True)),
    }


def _versions() -> dict[str, str]:
    return {
        "latentbatch": importlib.metadata.version("latentbatch"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _resume_state(
    out: Path, model_config: ModelConfig, train_config: TrainConfig
) -> tuple[list[dict[str, float]], float] | None:
    """History and elapsed seconds of a compatible earlier run in ``out``, if any."""
    if not (out / checkpoint.CONFIG).is_file():
        return None
    info = checkpoint.read_info(out)
    recorded = info.meta.get("training", {}).get("config", {})
    ours = {k: v for k, v in train_config.to_dict().items() if k != "epochs"}
    theirs = {k: v for k, v in TrainConfig.from_dict(recorded).to_dict().items() if k != "epochs"}
    if info.config != model_config or ours != theirs:
        raise CheckpointError(
            f"{out} holds a model trained with other settings ({info.config.preset}, "
            f"{recorded.get('source')}, seed {recorded.get('seed')}); pick another --out "
            "or delete it to start over"
        )
    training = info.meta["training"]
    return list(training["history"]), float(training.get("seconds", 0.0))


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train into model directory ``out``; continue an earlier run there when ``resume``.

    With ``resume`` and a compatible run in ``out`` that already has ``epochs`` epochs,
    nothing is trained and the existing model is returned (``reused=True``).
    """
    train_config.check_preset(model_config)
    out = Path(out)
    history: list[dict[str, float]] = []
    elapsed = 0.0
    if resume:
        earlier = _resume_state(out, model_config, train_config)
        if earlier is not None:
            history, elapsed = earlier
    elif (out / checkpoint.WEIGHTS).exists():
        raise CheckpointError(f"{out} already holds a model; resume it or choose another --out")

    geometry = Geometry.of(model_config)
    source = open_source(train_config.source, geometry, train_config.limit, train_config.seed)
    images = to_unit(torch.from_numpy(source.read(0, len(source))))
    train_rows, val_rows = split(len(images), train_config.val_fraction, train_config.seed)
    val_images = images[val_rows]

    torch.manual_seed(train_config.seed)
    model = Autoencoder(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    if history:
        model.load_state_dict(read_tensors(out / checkpoint.WEIGHTS))
        _load_optimizer(optimizer, read_tensors(out / checkpoint.OPTIMIZER))
    if len(history) >= train_config.epochs:
        if (
            not (out / checkpoint.RECONSTRUCTIONS).is_file()
            or not (out / checkpoint.CURVES).is_file()
        ):
            _save_pictures(out, model, val_images, history)
        return TrainResult(
            model_dir=out, model_id=checkpoint.model_id(out), history=tuple(history), reused=True
        )

    loss_fn = _loss_fn(train_config.loss)
    rate_lambda = train_config.rate_lambda
    batches = -(-len(train_rows) // train_config.batch_size)
    meta: dict[str, Any] = {
        "source": {"spec": source.spec, "description": source.description, "count": len(source)},
        "versions": _versions(),
    }
    training: dict[str, Any] = {
        "config": train_config.to_dict(),
        "optimizer": "adam",
        "split": {"train": len(train_rows), "validation": len(val_rows)},
    }
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("training", total=(train_config.epochs - len(history)) * batches)
        for epoch in range(len(history), train_config.epochs):
            started = time.perf_counter()
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(model_config, train_config, epoch)
            epoch_seed = train_config.seed * 1_000_003 + epoch + 1
            shuffle = torch.Generator().manual_seed(epoch_seed)
            torch.manual_seed(epoch_seed)  # the codec's quantisation noise, resumable
            order = train_rows[torch.randperm(len(train_rows), generator=shuffle)]
            total = 0.0
            for b in range(batches):
                batch = images[
                    order[b * train_config.batch_size : (b + 1) * train_config.batch_size]
                ]
                optimizer.zero_grad(set_to_none=True)
                loss: torch.Tensor = (
                    rate_distortion_loss(model, batch, rate_lambda)[0]
                    if rate_lambda is not None
                    else loss_fn(model(batch), batch)
                )
                torch.autograd.backward(loss)
                optimizer.step()
                total += loss.item() * len(batch)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{train_config.epochs}")
            metrics = {"epoch": epoch + 1, "train_loss": total / len(train_rows)}
            metrics |= evaluate(model, val_images, train_config.loss, rate_lambda)
            metrics["seconds"] = time.perf_counter() - started
            elapsed += metrics["seconds"]
            history.append(metrics)
            if progress:
                bar.console.print(
                    f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, val loss "
                    f"{metrics['val_loss']:.4f}, PSNR {metrics['val_psnr']:.2f} dB, "
                    f"SSIM {metrics['val_ssim']:.3f}"
                    + (f", {metrics['val_bpp']:.3f} bpp" if "val_bpp" in metrics else "")
                )
            training["history"], training["epochs_done"], training["seconds"] = (
                history,
                epoch + 1,
                elapsed,
            )
            write_tensors(out / checkpoint.OPTIMIZER, _optimizer_tensors(optimizer))
            save_model(out, model, {**meta, "training": training})
            if on_epoch is not None:
                on_epoch(metrics)

    _save_pictures(out, model, val_images, history)
    return TrainResult(
        model_dir=out, model_id=checkpoint.model_id(out), history=tuple(history), reused=False
    )


@torch.inference_mode()
def _save_pictures(
    out: Path, model: Autoencoder, val_images: torch.Tensor, history: list[dict[str, float]]
) -> None:
    model.eval()
    sample = val_images[:8]
    grid = reconstruction_grid(to_uint8(sample).numpy(), to_uint8(model(sample)).numpy())
    save_picture(grid, out / checkpoint.RECONSTRUCTIONS)
    save_training_curves(history, out / checkpoint.CURVES)
