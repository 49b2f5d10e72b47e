"""The device kernel: latents → images and images → latents on one device, in batches.

Both the Dask tasks (:mod:`latentbatch.decode`, :mod:`latentbatch.encode`, the canary's
:mod:`latentbatch.engine.canary_task`) and the in-process decodes run their tensors through
here: CPU batches in float32, channels-last; CUDA batches pipelined three deep (pinned
asynchronous copies on a copy stream, float16 autocast, the previous batch's images
handed on while the next decodes). Latents holding NaN or Inf are refused here too,
named by row and id, before anything is decoded.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

import numpy as np
import torch

from latentbatch.config import memory_budget
from latentbatch.errors import LatentbatchError
from latentbatch.models.autoencoder import to_uint8, to_unit

DECODE_BATCH = 256
ENCODE_BATCH = 256
CUDA_DECODE_BATCH = 4096


def batch_for(device: torch.device, image_bytes: int = 0) -> int:
    """Latents per decoder call when none is asked for: small on CPU (cache-friendly),
    large on a GPU (to fill it), and no more than fit the memory budget when one image
    takes ``image_bytes`` (:meth:`latentbatch.config.ModelConfig.decode_bytes`); at least
    one (a larger image is decoded in tiles: :func:`latentbatch.config.tiled`)."""
    cap = CUDA_DECODE_BATCH if device.type == "cuda" else DECODE_BATCH
    if image_bytes <= 0:
        return cap
    return max(1, min(cap, memory_budget() // image_bytes))


ROUNDING = "clamp to [0, 1], x 255, round half to even (torch.round), uint8"
"""How decoded pixels become bytes: diffusers' rule (its image processor rounds), which
DiT's and REPA's sample scripts do not share (they truncate or floor ``127.5x + 128``)."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """What shapes a decode's pixels on ``device`` beyond its inputs: the decoder's dtype
    and autocast, TF32 and cuDNN settings, the rounding rule, the libraries' versions
    and the device's name (a manifest records it; ``verify`` ignores it)."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    return {
        "device": f"{device.type}: {name}",
        "decoder_dtype": "float16 (autocast)" if cuda else "float32",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn": {
            "version": torch.backends.cudnn.version() if cuda else None,  # type: ignore[no-untyped-call]
            "benchmark": bool(torch.backends.cudnn.benchmark),
            "deterministic": bool(torch.backends.cudnn.deterministic),
        },
        "rounding": ROUNDING,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": _version("diffusers"),
            "numpy": np.__version__,
            "latentbatch": _version("latentbatch"),
        },
    }


def batch_difference(
    decoder: torch.nn.Module, latents: np.ndarray, device: torch.device, batch_size: int
) -> int:
    """The largest pixel difference (levels) between ``latents`` decoded one at a time and
    in batches of ``batch_size``: 0 when the decode is batch-invariant there."""
    alone = decode_latents(decoder, latents, device, 1)
    batched = decode_latents(decoder, latents, device, max(1, batch_size))
    return int(np.abs(alone.astype(np.int16) - batched.astype(np.int16)).max(initial=0))


class NonFiniteLatentsError(LatentbatchError):
    """Latents hold NaN or Inf."""


def decode_latents(
    decoder: torch.nn.Module,
    latents: np.ndarray,
    device: torch.device,
    batch_size: int = DECODE_BATCH,
    on_batch: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Latents ``(n, C, h, w)`` → ``uint8 (n, H, W, C)`` images, quantised by rounding,
    in batches of ``batch_size`` (see :func:`decode_batches`)."""
    starts = range(0, len(latents), batch_size)
    return decode_batches(decoder, (latents[i : i + batch_size] for i in starts), device, on_batch)


def decode_batches(
    decoder: torch.nn.Module,
    batches: Iterable[np.ndarray],
    device: torch.device,
    on_batch: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Batches of latents ``(b, C, h, w)`` → all their ``uint8 (n, H, W, C)`` images.

    Batches are decoded in float32 on CPU (autocast to float16 on CUDA,
    :func:`_decode_on_cuda`), channels-last: load the decoder with
    :func:`latentbatch.models.weights.load_model`, which makes it channels-last (it is never
    changed here: worker threads share it). ``on_batch`` sees each batch's images as soon
    as they exist. ``batches`` may be read ahead (:func:`latentbatch.decode.read_ahead`).
    On CPU the result is bit-identical whatever the thread count or batch size (tested).
    """
    if device.type == "cuda":
        return _decode_on_cuda(decoder, batches, device, on_batch)
    out = []
    with torch.inference_mode():
        for latents in batches:
            batch = torch.from_numpy(np.ascontiguousarray(latents))
            batch = batch.float().contiguous(memory_format=torch.channels_last)
            pixels = to_uint8(decoder(batch)).numpy()
            if on_batch is not None:
                on_batch(pixels)
            out.append(pixels)
    return np.concatenate(out)


def _decode_on_cuda(
    decoder: torch.nn.Module,
    batches: Iterable[np.ndarray],
    device: torch.device,
    on_batch: Callable[[np.ndarray], None] | None,
) -> np.ndarray:
    """The CUDA path of :func:`decode_batches`, three stages deep::

        copy stream   H2D batch i+1 (pinned, async)
        compute       decode batch i, D2H its images into pinned memory (async)
        this thread   hand batch i-1's images to ``on_batch`` (the encoders)

    The host never waits for the GPU except for the images it hands on next.
    """
    copies = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    compute = torch.cuda.current_stream(device)
    out: list[np.ndarray] = []

    def upload(latents: np.ndarray) -> tuple[torch.Tensor, torch.cuda.Event]:
        pinned = torch.from_numpy(np.ascontiguousarray(latents)).pin_memory()
        with torch.cuda.stream(copies):
            batch = pinned.to(device, non_blocking=True)
            return batch, copies.record_event()

    def hand_on(images: torch.Tensor, ready: torch.cuda.Event) -> None:
        ready.synchronize()
        pixels = images.numpy()
        if on_batch is not None:
            on_batch(pixels)
        out.append(pixels)

    queue = iter(batches)
    first = next(queue, None)
    upcoming = upload(first) if first is not None else None
    previous: tuple[torch.Tensor, torch.cuda.Event] | None = None
    with torch.inference_mode():
        while upcoming is not None:
            batch, uploaded = upcoming
            compute.wait_event(uploaded)
            batch.record_stream(compute)  # allocated on the copy stream, used here
            following = next(queue, None)
            upcoming = upload(following) if following is not None else None
            batch = batch.float().contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                images = to_uint8(decoder(batch))
            host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(images, non_blocking=True)
            done = compute.record_event()
            if previous is not None:
                hand_on(*previous)
            previous = (host, done)
        if previous is not None:
            hand_on(*previous)
    return np.concatenate(out)


def encode_images(
    encoder: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = ENCODE_BATCH,
) -> np.ndarray:
    """``uint8 (n, H, W, C)`` → float32 latents ``(n, C', h, w)``, in batches."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = to_unit(torch.from_numpy(np.array(images[i : i + batch_size]))).to(device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                latents = encoder(batch)
            out.append(latents.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def finite_rows(rows: np.ndarray) -> np.ndarray:
    """Whether each row of a 2-D float array is all finite. For float16 (the stores'
    dtype) on its bits: NaN and Inf are the values whose exponent bits are all ones, and
    numpy's float16 ``isfinite`` costs ten times as much."""
    if rows.dtype == np.float16:
        exponent = np.uint16(0x7C00)
        return np.asarray(((rows.view(np.uint16) & exponent) != exponent).all(axis=1))
    return np.asarray(np.isfinite(rows).all(axis=1))


def refuse_nonfinite(latents: np.ndarray, rows: list[int], ids: list[str], where: str) -> None:
    """Refuse latents holding NaN or Inf, naming their rows and ids."""
    bad = np.flatnonzero(~finite_rows(latents.reshape(len(latents), -1)))
    if len(bad):
        shown = ", ".join(f"{rows[i]} ({ids[i]})" for i in bad[:5])
        raise NonFiniteLatentsError(
            f"{len(bad)} latents in {where} hold NaN or Inf: rows {shown}"
            f"{' ...' if len(bad) > 5 else ''}; re-encode those images"
        )
