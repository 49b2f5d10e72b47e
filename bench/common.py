"""What the benchmark scripts share: a store of seeded random latents, and the best wall
time of fresh processes. Imported by the scripts beside it (``python bench/X.py`` puts
this folder first on the path)."""

from __future__ import annotations

import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from latentbatch.config import preset_config
from latentbatch.models.autoencoder import Autoencoder
from latentbatch.models.checkpoint import read_info
from latentbatch.models.weights import save_model
from latentbatch.stores.store import Layout, create_store, open_store, shard_ranges


def random_model(folder: Path, preset: str) -> Path:
    """A random-init (seed 0) model of ``preset`` at ``folder``, built once and reused."""
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        save_model(folder, Autoencoder(preset_config(preset)), {})
    return folder


def small_kl(folder: Path, sample_size: int) -> Path:
    """A small random-init (seed 0) diffusers AutoencoderKL of SD's layout (4 latent
    channels, 8x down-sampling, SD's scaling factor) at ``folder``, built once."""
    if (folder / "config.json").exists():
        return folder
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=0.18215,
    ).save_pretrained(str(folder))
    return folder


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss) does not carry the parent's
    high-water mark over fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_chars() -> int:
    """Bytes this process has read so far (``/proc``'s ``rchar``: files and sockets)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar"):
            return int(line.split()[1])
    raise OSError("/proc/self/io has no rchar line")


def random_store(path: Path, count: int, layout: Layout, labels: bool = False) -> Path:
    """A store at ``path`` of ``count`` seeded random latents of the `compact` preset's
    shape (a random-init model beside it, ``compact-random``), built once and reused; with
    ``labels`` row ``i`` has label ``i mod 10``."""
    if path.exists() and open_store(str(path)).count == count:
        return path
    info = read_info(random_model(path.parent / "compact-random", "compact"))
    store = create_store(
        str(path), model_id=info.model_id, config=info.config, capacity=count, layout=layout
    )
    rng = np.random.default_rng(0)
    for a, b in shard_ranges(0, count, store.shard_rows):
        latents = rng.standard_normal((b - a, *store.latent_shape), dtype=np.float32)
        values = np.arange(a, b) % 10 if labels else np.full(b - a, -1)
        store.write_rows(a, latents, [f"r{i:08d}" for i in range(a, b)], values)
    store.write_meta(count=count, labels=labels)
    return path


def best_seconds(command: list[str], passes: int) -> tuple[float, list[float]]:
    """The best wall time of ``passes`` fresh runs of ``command`` (each must succeed), and
    every pass's."""
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return min(times), times
