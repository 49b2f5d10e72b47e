"""The device kernel: latents → images and images → latents on one device, in batches.

Both the Dask tasks (:mod:`latentbatch.decode`, :mod:`latentbatch.encode`, the canary's
:mod:`latentbatch.engine.canary_task`) and the in-process decodes run their tensors through
here: batches channels-last, in the decode's precision (:func:`chosen_precision`: fp32
on CPU unless asked; on CUDA what the model's config allows); CUDA batches pipelined
three deep (pinned asynchronous copies on a copy stream, the previous batch's images
handed on while the next decodes). A batch whose reduced-precision output holds NaN or
Inf is decoded again in fp32 and counted (:class:`Upcasts`). Latents holding NaN or Inf
are refused here too, named by row and id, before anything is decoded.
"""

from __future__ import annotations

import copy
import platform
import threading
import weakref
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any, Literal, cast

import numpy as np
import torch

from latentbatch.config import memory_budget
from latentbatch.errors import ConfigError, LatentbatchError
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


Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "fp16")
Chosen = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> Precision:
    """``precision`` when it is one the decoder and encoder run in, else a sentence."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def chosen_precision(
    asked: Precision, device: str, *, force_upcast: bool | None, bf16: bool
) -> Chosen:
    """The precision a decoder runs in: ``asked`` unless ``auto``. ``auto`` is fp32 off
    CUDA; on CUDA it honours the model's ``force_upcast`` (diffusers upcasts exactly the
    VAEs whose float16 activations overflow): fp16 only for a model whose config declares
    ``force_upcast: false`` (TAESD, the fp16-fix VAEs), else bf16 where the device has it
    (``bf16``), else fp32. latentbatch's own presets declare nothing (None)."""
    if check_precision(asked) != "auto":
        return cast(Chosen, asked)
    if device != "cuda":
        return "fp32"
    if force_upcast is False:
        return "fp16"
    return "bf16" if bf16 else "fp32"


def encode_precision(asked: Precision, device: str, *, force_upcast: bool | None) -> Chosen:
    """The precision an encoder runs in: ``asked`` unless ``auto``, which is fp32 off
    CUDA and on CUDA fp16 autocast, but fp32 for a model whose config says
    ``force_upcast`` (its float16 activations overflow)."""
    if check_precision(asked) != "auto":
        return cast(Chosen, asked)
    return "fp16" if device == "cuda" and force_upcast is not True else "fp32"


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (a CUDA device of compute capability 8
    or more); CPUs emulate it."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


class Upcasts:
    """Batches a decode ran, and those whose reduced-precision output held NaN or Inf
    and were decoded again in fp32."""

    def __init__(self) -> None:
        self.batches = 0
        self.fp32_again = 0


_CAST: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()
_CAST_LOCK = threading.Lock()


def _half_copy(decoder: torch.nn.Module) -> torch.nn.Module:
    """A float16 copy of ``decoder``, made once (CPU autocast has no float16: fp16 on a
    CPU runs by casting; the shared decoder itself is never changed)."""
    with _CAST_LOCK:
        if decoder not in _CAST:
            _CAST[decoder] = copy.deepcopy(decoder).to(torch.float16)
        return _CAST[decoder]


def _run(decoder: torch.nn.Module, batch: torch.Tensor, precision: Chosen) -> torch.Tensor:
    """``decoder(batch)`` in ``precision``: autocast on CUDA (and bf16 on CPU), a float16
    copy for fp16 on CPU; the output as float32."""
    if precision == "fp32":
        return cast(torch.Tensor, decoder(batch)).float()
    if batch.device.type == "cpu" and precision == "fp16":
        return cast(torch.Tensor, _half_copy(decoder)(batch.half())).float()
    with torch.autocast(batch.device.type, dtype=_DTYPES[precision]):
        return cast(torch.Tensor, decoder(batch)).float()


def _decoded(
    decoder: torch.nn.Module, batch: torch.Tensor, precision: Chosen, upcasts: Upcasts | None
) -> torch.Tensor:
    """A batch's decoder output in ``precision``, decoded again in fp32 when it holds
    NaN or Inf (counted in ``upcasts``)."""
    out = _run(decoder, batch, precision)
    if upcasts is not None:
        upcasts.batches += 1
    if precision != "fp32" and not bool(torch.isfinite(out).all()):
        out = _run(decoder, batch, "fp32")
        if upcasts is not None:
            upcasts.fp32_again += 1
    return out


ROUNDING = "clamp to [0, 1], x 255, round half to even (torch.round), uint8"
"""How decoded pixels become bytes: diffusers' rule (its image processor rounds), which
DiT's and REPA's sample scripts do not share (they truncate or floor ``127.5x + 128``)."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


DTYPE_NAMES = {
    ("cuda", "fp16"): "float16 (autocast)",
    ("cuda", "bf16"): "bfloat16 (autocast)",
    ("cpu", "fp16"): "float16 (a cast copy)",
    ("cpu", "bf16"): "bfloat16 (autocast)",
}


def environment(device: torch.device, precision: Chosen = "fp32") -> dict[str, Any]:
    """What shapes a decode's pixels on ``device`` beyond its inputs: the decoder's dtype
    and autocast (``precision``), TF32 and cuDNN settings, the rounding rule, the
    libraries' versions and the device's name (a manifest records it; ``verify`` ignores
    it)."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    return {
        "device": f"{device.type}: {name}",
        "decoder_dtype": DTYPE_NAMES.get((device.type, precision), "float32"),
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
    decoder: torch.nn.Module,
    latents: np.ndarray,
    device: torch.device,
    batch_size: int,
    precision: Chosen = "fp32",
) -> int:
    """The largest pixel difference (levels) between ``latents`` decoded one at a time and
    in batches of ``batch_size`` (in ``precision``): 0 when the decode is batch-invariant
    there."""
    alone = decode_latents(decoder, latents, device, 1, precision=precision)
    batched = decode_latents(decoder, latents, device, max(1, batch_size), precision=precision)
    return int(np.abs(alone.astype(np.int16) - batched.astype(np.int16)).max(initial=0))


class NonFiniteLatentsError(LatentbatchError):
    """Latents hold NaN or Inf."""


def decode_latents(
    decoder: torch.nn.Module,
    latents: np.ndarray,
    device: torch.device,
    batch_size: int = DECODE_BATCH,
    on_batch: Callable[[np.ndarray], None] | None = None,
    *,
    precision: Chosen = "fp32",
    upcasts: Upcasts | None = None,
) -> np.ndarray:
    """Latents ``(n, C, h, w)`` → ``uint8 (n, H, W, C)`` images, quantised by rounding,
    in batches of ``batch_size`` (see :func:`decode_batches`)."""
    starts = range(0, len(latents), batch_size)
    batches = (latents[i : i + batch_size] for i in starts)
    return decode_batches(decoder, batches, device, on_batch, precision=precision, upcasts=upcasts)


def decode_batches(
    decoder: torch.nn.Module,
    batches: Iterable[np.ndarray],
    device: torch.device,
    on_batch: Callable[[np.ndarray], None] | None = None,
    *,
    precision: Chosen = "fp32",
    upcasts: Upcasts | None = None,
) -> np.ndarray:
    """Batches of latents ``(b, C, h, w)`` → all their ``uint8 (n, H, W, C)`` images.

    Batches are decoded in ``precision`` (:func:`chosen_precision`; a batch whose output
    holds NaN or Inf in bf16 or fp16 is decoded again in fp32, counted in ``upcasts``;
    on CUDA pipelined, :func:`_decode_on_cuda`), channels-last: load the decoder with
    :func:`latentbatch.models.weights.load_model`, which makes it channels-last (it is never
    changed here: worker threads share it). ``on_batch`` sees each batch's images as soon
    as they exist. ``batches`` may be read ahead (:func:`latentbatch.decode.read_ahead`).
    On CPU the result is bit-identical whatever the thread count or batch size (tested).
    """
    if device.type == "cuda":
        return _decode_on_cuda(decoder, batches, device, on_batch, precision, upcasts)
    out = []
    with torch.inference_mode():
        for latents in batches:
            batch = torch.from_numpy(np.ascontiguousarray(latents))
            batch = batch.float().contiguous(memory_format=torch.channels_last)
            pixels = to_uint8(_decoded(decoder, batch, precision, upcasts)).numpy()
            if on_batch is not None:
                on_batch(pixels)
            out.append(pixels)
    return np.concatenate(out)


def _decode_on_cuda(
    decoder: torch.nn.Module,
    batches: Iterable[np.ndarray],
    device: torch.device,
    on_batch: Callable[[np.ndarray], None] | None,
    precision: Chosen,
    upcasts: Upcasts | None,
) -> np.ndarray:
    """The CUDA path of :func:`decode_batches`, three stages deep::

        copy stream   H2D batch i+1 (pinned, async)
        compute       decode batch i, D2H its images into pinned memory (async)
        this thread   hand batch i-1's images to ``on_batch`` (the encoders)

    The host never waits for the GPU except for the images it hands on next, and, in
    bf16 or fp16, for each batch's one finiteness check.
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
            images = to_uint8(_decoded(decoder, batch, precision, upcasts))
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
    *,
    precision: Chosen = "fp32",
) -> np.ndarray:
    """``uint8 (n, H, W, C)`` → float32 latents ``(n, C', h, w)``, in batches, the
    encoder run in ``precision`` (:func:`encode_precision`)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = to_unit(torch.from_numpy(np.array(images[i : i + batch_size]))).to(device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(_run(encoder, batch, precision).cpu().numpy())
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
