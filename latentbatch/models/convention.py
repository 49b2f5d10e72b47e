"""Whether stored latents fit their autoencoder's latent convention.

A store holds latents as the diffusion model sees them: normalised to about unit
standard deviation by the autoencoder family's convention
(:class:`latentbatch.config.Convention`, which a store records as
``latent.convention``), with the formula its family's diffusers pipeline undoes before
``vae.decode``:

- ``scale-shift``: ``z = x / scale + shift``, the scale and shift a number or a vector
  of one value per channel (SD 1.x/2.x, SD3 and FLUX.1's ``scaling_factor`` and
  ``shift_factor``, Sana's DC-AE, TAESD's 1 and 0, REPA/LightningDiT's per-channel
  vectors);
- ``mean-std``: ``z = x * std / scale + mean``, per channel (an ``AutoencoderKL`` whose
  config holds ``latents_mean`` and ``latents_std``, as SDXL's pipeline reads them;
  Qwen-Image's with a scale of 1; FLUX.2's BatchNorm statistics, held in its weights,
  with ``packing`` ``2x2``: the stored latents are 2×2-patchified, ``(4C, h/2, w/2)``).

:func:`scale_warning` checks the latents an encode or an import wrote and, when their
spread is far from 1, says what the likely cause is and what to do (for an import: its
``--latents`` or ``--convention`` flags). No torch.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

SCALE_TOLERANCE = 2.0
"""How far (times) scaled latents' std may lie from 1 before a store warns."""


class StoredLatents(Protocol):
    """What :func:`scale_warning` reads of a latent store."""

    @property
    def url(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def shard_rows(self) -> int: ...
    @property
    def convention(self) -> dict[str, Any] | None: ...
    def read_latents(self, start: int, stop: int) -> np.ndarray: ...


def scale_warning(
    store: StoredLatents, made_by: Literal["import", "encode"] = "import"
) -> str | None:
    """For a diffusers autoencoder's latents, a sentence when the first shard's median
    per-channel std is more than :data:`SCALE_TOLERANCE` times off 1, naming the likely
    cause (for what ``made_by`` wrote: an ``import`` or an ``encode``); None otherwise
    (and for latentbatch's presets)."""
    convention = store.convention
    if convention is None or store.count == 0:
        return None
    stop = min(store.count, store.shard_rows)
    latents = store.read_latents(0, stop).astype(np.float64)
    std = float(np.median(latents.std(axis=(0, 2, 3))))
    if 1 / SCALE_TOLERANCE <= std <= SCALE_TOLERANCE:
        return None
    from latentbatch.config import Convention

    held = Convention.from_dict(convention)
    scaled = f"{held.scale[0]:g}" if len(held.scale) == 1 else "its per-channel scale"
    if made_by == "encode":
        return (
            f"{store.url}: the latents' standard deviation is {std:.3g} per channel "
            f"(median, first {stop} rows), far from the 1 that the scaling factor "
            f"{scaled} of the model's config.json should give: it does not fit this "
            "model (a retrained or random one?); decodes are right, but a diffusion "
            "model trained on the model's own convention would see garbage"
        )
    if std > SCALE_TOLERANCE:
        cause = (
            "they look unscaled (raw latents declared scaled?); if so, import them "
            "again with --latents raw"
        )
    else:
        cause = (
            "they look scaled twice (scaled latents declared raw?); if so, import them "
            "again with --latents scaled"
        )
    return (
        f"{store.url}: the latents' standard deviation is {std:.3g} per channel (median, "
        f"first {stop} rows), far from the 1 of latents scaled by {scaled}: {cause}; "
        "decoded, they would be garbage"
    )
