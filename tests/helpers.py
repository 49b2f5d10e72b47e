"""Tiny, seeded test data and models, built in one place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentbatch.config import ModelConfig, TrainConfig
from latentbatch.models import checkpoint, weights
from latentbatch.models.autoencoder import Autoencoder
from latentbatch.stores.store import Layout, create_store
from latentbatch.train import TrainResult, train


def random_image(seed: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Image.Image:
    """A seeded noise image."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def write_image(path: Path, seed: int, **kwargs: object) -> Path:
    """Write a seeded image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, **kwargs).save(path)  # type: ignore[arg-type]
    return path


def tiny_model_config(channels: int = 1, image_size: int = 16) -> ModelConfig:
    return ModelConfig("compact", channels, image_size, (4, 8), 2)


def train_tiny(out: Path, epochs: int = 2, seed: int = 0, **overrides: object) -> TrainResult:
    """Train a very small model on synthetic shapes; a few seconds on a CPU."""
    train_config = TrainConfig(
        source="synthetic:96", epochs=epochs, seed=seed, batch_size=16, val_fraction=0.25
    )
    return train(tiny_model_config(), train_config, out, progress=False, **overrides)  # type: ignore[arg-type]


def train_tiny_codec(out: Path, epochs: int = 3, **given: object) -> TrainResult:
    """Train a very small ``codec`` model (int8 latents 4x4x4 of 16x16 grey images) on
    synthetic shapes; a few seconds on a CPU."""
    config = ModelConfig("codec", 1, 16, (8,), 4)
    train_config = TrainConfig.for_preset(
        "codec", "synthetic:96", epochs=epochs, batch_size=16, val_fraction=0.25, **given
    )
    return train(config, train_config, out, progress=False)


def sha256s(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included), by relative path."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def mtimes(folder: Path, pattern: str = "shard-*") -> dict[str, int]:
    """Modification times (ns) of the shards in ``folder``."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def altered_model(tiny_model: Path, out: Path, change: float = 0.1) -> Path:
    """``tiny_model`` with one weight changed a little (the last decoder layer's bias),
    saved as a model directory of its own (so it has another id)."""
    info = checkpoint.read_info(tiny_model)
    tensors = weights.read_tensors(tiny_model / checkpoint.WEIGHTS)
    tensors["decoder.6.bias"] = tensors["decoder.6.bias"] + change
    model = Autoencoder(info.config)
    model.load_state_dict(tensors)
    weights.save_model(out, model, {k: v for k, v in info.meta.items() if k != "model_id"})
    return out


def save_kl_vae(folder: Path, sample_size: int = 32) -> Path:
    """A seeded random-init diffusers AutoencoderKL of SD's block layout (4 levels: 8x
    down-sampling, 4 latent channels, SD's scaling factor) at small widths, saved by
    diffusers (``config.json`` + ``diffusion_pytorch_model.safetensors``): the bench
    scripts' own (``bench/common.py``)."""
    from bench.common import small_kl

    return small_kl(folder, sample_size)


def save_overflowing_kl_vae(folder: Path) -> Path:
    """:func:`save_kl_vae`'s model with its decoder's first convolution scaled by 10^6:
    finite in float32 (the group norms that follow undo the scale), but its activations
    overflow float16 (as the original SDXL VAE's do), so a float16 decode is NaN."""
    from diffusers import AutoencoderKL

    save_kl_vae(folder)
    vae = AutoencoderKL.from_pretrained(str(folder), low_cpu_mem_usage=False)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e6)
        vae.decoder.conv_in.bias.mul_(1e6)
    vae.save_pretrained(str(folder))
    return folder


def save_tiny_vae(folder: Path, sample_size: int = 32) -> Path:
    """A seeded random-init diffusers AutoencoderTiny (TAESD's layout at small widths),
    its config given a ``sample_size`` (TAESD's records none)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    vae.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sample_size": sample_size}))
    return folder


def diffusers_decode(model_dir: Path, latents: np.ndarray, raw: bool = False) -> np.ndarray:
    """What diffusers itself decodes, uint8 ``(n, H, W, C)``: ``vae.decode(z / scaling +
    shift)`` of stored (scaled) latents, or ``vae.decode(z)`` of ``raw`` ones."""
    import diffusers

    config = json.loads((model_dir / "config.json").read_text())
    vae = getattr(diffusers, config["_class_name"]).from_pretrained(str(model_dir)).eval()
    scaling, shift = config.get("scaling_factor", 1.0), config.get("shift_factor") or 0.0
    z = torch.from_numpy(np.asarray(latents, np.float32))
    with torch.no_grad():
        sample = vae.decode(z if raw else z / scaling + shift).sample
    pixels = ((sample + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def sd_sized_store(path: Path, rows: int = 300) -> tuple[str, np.ndarray]:
    """A store of ``rows`` 4x64x64 latents (SD's at 512 px: 16,384 values), three labels,
    their variance in 6 planted directions; and those directions ``(16384, 6)``."""
    rng = np.random.default_rng(3)
    planted, _ = np.linalg.qr(rng.standard_normal((16_384, 6)))
    labels = np.arange(rows) % 3
    flat = (rng.standard_normal((rows, 6)) * np.arange(6, 0, -1) * 4) @ planted.T
    flat += 0.05 * rng.standard_normal((rows, 16_384)) + labels[:, None] * planted[:, 0] * 3
    config = ModelConfig("compact", 1, 256, (4, 4), 4)
    assert config.latent_shape == (4, 64, 64)
    store = create_store(
        str(path),
        model_id="0" * 64,
        config=config,
        capacity=rows,
        layout=Layout(128, 64, "float32"),
    )
    for a in range(0, rows, 128):
        b = min(a + 128, rows)
        latents = flat[a:b].reshape(b - a, 4, 64, 64).astype(np.float32)
        store.write_rows(a, latents, [f"r{i}" for i in range(a, b)], labels[a:b])
    store.write_meta(count=rows, labels=True)
    return str(path), planted


FAMILY_MODELS = ("sd", "sdxl", "sd3", "flux1", "flux2", "dc-ae", "qwen", "repa")


def save_family_vae(folder: Path, family: str) -> Path:
    """A small seeded random-init diffusers autoencoder of ``family`` (one of
    :data:`FAMILY_MODELS`), saved by diffusers: its class, and the convention values
    its config (or, for FLUX.2, its BatchNorm) holds, as the family's are set."""
    import diffusers

    torch.manual_seed(2)
    kl = {
        "block_out_channels": (8, 8, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 1,
        "norm_num_groups": 4, "sample_size": 32,
    }  # fmt: skip
    if family in ("sd", "repa"):
        vae = diffusers.AutoencoderKL(**kl, latent_channels=4, scaling_factor=0.18215)
    elif family == "sdxl":
        vae = diffusers.AutoencoderKL(
            **kl, latent_channels=4, scaling_factor=0.13025,
            latents_mean=(0.3, -0.5, 0.8, 0.1), latents_std=(1.7, 0.6, 2.2, 1.1),
        )  # fmt: skip
    elif family in ("sd3", "flux1"):
        vae = diffusers.AutoencoderKL(**kl, latent_channels=4, scaling_factor=1.5305,
                                      shift_factor=0.0609)  # fmt: skip
    elif family == "flux2":
        vae = diffusers.AutoencoderKLFlux2(**kl, latent_channels=4, mid_block_add_attention=False)
        with torch.no_grad():  # statistics a trained model would hold, not 0 and 1
            vae.bn.running_mean.copy_(torch.linspace(-0.8, 0.8, 16))
            vae.bn.running_var.copy_(torch.linspace(0.3, 3.0, 16))
    elif family == "dc-ae":
        vae = diffusers.AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=8,
            encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
            encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
            scaling_factor=0.41407,
        )  # fmt: skip
    elif family == "qwen":
        vae = diffusers.AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, False], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.5, 2.0, 1.0],
        )  # fmt: skip
    else:
        raise ValueError(f"no family {family}")
    vae.save_pretrained(str(folder))
    return folder


def train_family_vae(folder: Path, steps: int = 500, seed: int = 0) -> Path:
    """Train the diffusers autoencoder saved in ``folder`` (by :func:`save_family_vae`) for
    ``steps`` Adam steps of reconstruction on 32x32 patches of the photos source, and save
    it back: weights whose activations are shaped by images, as a real model's are, which
    random init's are not (bf16 is within 2 levels of fp32 for the one and 6 to 10 levels
    off for the other, ``tests/test_families.py``). A few seconds per family on 2 cores."""
    import diffusers

    from latentbatch.models.vae import FIVE_D
    from latentbatch.sources.images import Geometry, photos

    name = json.loads((folder / "config.json").read_text())["_class_name"]
    vae = getattr(diffusers, name).from_pretrained(str(folder), low_cpu_mem_usage=False)
    frames = name in FIVE_D
    source = photos(Geometry(32, 3))
    patches = torch.from_numpy(source.read(0, len(source))).permute(0, 3, 1, 2)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(steps):
        x = patches[torch.randint(len(patches), (16,))].float() / 127.5 - 1
        encoded = vae.encode(x[:, :, None] if frames else x)
        dist = getattr(encoded, "latent_dist", None)
        z = dist.sample() if dist is not None else encoded.latent
        y = vae.decode(z).sample
        loss = ((y[:, :, 0] if frames else y) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().save_pretrained(str(folder))
    return folder
