"""A store's canary: a few fixed rows decoded when the store was written, so that any
later decode can tell whether its decoder still gives the same pixels.

At the end of an encode, :data:`CANARY_ROWS` rows chosen by a generator seeded with the
store's uuid are decoded on a worker; their pixels go into the store's ``canary`` array
(uint8 ``[K, H, W, C]``, dims ``canary, image_y, image_x, image_channel``, apart from the
latents' ``y, x, channel`` so that xarray still opens the store) and the rows, the
pixels' sha256, the device and torch that made them, and the tolerance into the
``canary`` attribute.
Before a decode writes anything it decodes the same rows on its workers and compares:
the same sha256 is ``exact``; a difference within :data:`TOLERANCE` (what another device's
numerics give: CUDA float16 against CPU float32 differs by at most 3 levels, 0.05 on
average, measured on an H200) is ``within``; anything more stops that store's decode
with a :class:`CanaryError` saying what drifted and by how much (altered weights decoded
with ``--allow-model-mismatch``, another torch that computes differently, a broken
device). Stores without a canary (earlier releases) decode as before, reported ``none``;
``decode --skip-canary`` is for a decoder changed on purpose (reported ``skipped``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr

from latentbatch.errors import LatentbatchError
from latentbatch.storage.fs import named_write
from latentbatch.stores.store import LatentStore

CANARY_ROWS = 16
TOLERANCE = {"max_levels": 4, "mean_levels": 0.25}
ARRAY = "canary"


class CanaryError(LatentbatchError):
    """A decode's canary rows came out different from when the store was written."""


@dataclass(frozen=True, kw_only=True)
class CanaryResult:
    """How a decode's canary compared: ``exact``, ``within`` the tolerance, ``none`` (the
    store has no canary) or ``skipped`` (asked to); with the largest and the mean
    difference in levels."""

    status: Literal["exact", "within", "none", "skipped"]
    max_levels: int = 0
    mean_levels: float = 0.0

    def __str__(self) -> str:
        if self.status == "within":
            return f"within (max {self.max_levels}, mean {self.mean_levels:.3f} levels)"
        return self.status


def canary_rows(store: LatentStore) -> list[int]:
    """The canary's rows: up to :data:`CANARY_ROWS` committed rows, seeded by the uuid."""
    rng = np.random.default_rng(int(store.uuid[:16], 16))
    chosen = rng.choice(store.count, size=min(CANARY_ROWS, store.count), replace=False)
    return sorted(int(r) for r in chosen)


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def has_canary(store: LatentStore) -> bool:
    return isinstance(store.meta.get("canary"), dict) and ARRAY in store.group


def _torch_version() -> str:
    """The installed torch's version, read from its distribution (stores import no torch)."""
    return importlib.metadata.version("torch")


def record_canary(store: LatentStore, rows: list[int], pixels: np.ndarray, device: str) -> None:
    """Keep ``pixels`` (the decoded ``rows``) as the store's canary: the array, then the
    record that names it (a write that fails is said in a sentence, and leaves no
    record: the next run records it again)."""
    with named_write(store.url, f"the canary of {store.url}"):
        store.group.create_array(
            ARRAY,
            shape=pixels.shape,
            dtype="uint8",
            chunks=pixels.shape,
            dimension_names=("canary", "image_y", "image_x", "image_channel"),
            overwrite=True,
        )[...] = pixels
    store.write_meta(
        canary={
            "rows": rows,
            "sha256": digest(pixels),
            "device": device,
            "torch": _torch_version(),
            "tolerance": TOLERANCE,
        }
    )


def check_canary(
    store: LatentStore, pixels: np.ndarray, rows: Sequence[int] | None = None
) -> CanaryResult:
    """Compare a decode's pixels of the canary ``rows`` (all of them when not given; a
    decode leaves out the rows whose latents are not finite) with the store's; raise
    :class:`CanaryError` naming the store and the drift when beyond the tolerance, or
    when no row is left to compare."""
    meta: dict[str, Any] = store.meta["canary"]
    recorded = [int(r) for r in meta["rows"]]
    rows = recorded if rows is None else [int(r) for r in rows]
    if not rows:
        raise CanaryError(
            f"{store.url}: all {len(recorded)} canary rows hold NaN or Inf, so the decoder "
            "cannot be checked and nothing was decoded; re-encode those rows, or pass "
            "--skip-canary to decode without the check"
        )
    if rows == recorded and digest(pixels) == meta["sha256"]:
        return CanaryResult(status="exact")
    array = store.group[ARRAY]
    if not isinstance(array, zarr.Array):
        raise CanaryError(f"{store.url}/{ARRAY} is a group, not the canary array; it is damaged")
    position = {r: i for i, r in enumerate(recorded)}
    expected = np.asarray(array[...])[[position[r] for r in rows]]
    if expected.shape != pixels.shape:
        raise CanaryError(
            f"{store.url}: the canary decodes to images of shape {pixels.shape[1:]}, not "
            f"{expected.shape[1:]}; the decoder is not the one the store was written with"
        )
    if digest(pixels) == digest(expected):
        return CanaryResult(status="exact")
    difference = np.abs(expected.astype(np.int16) - pixels.astype(np.int16))
    largest, mean = int(difference.max()), float(difference.mean())
    tolerance = meta.get("tolerance", TOLERANCE)
    if largest > tolerance["max_levels"] or mean > tolerance["mean_levels"]:
        left_out = len(recorded) - len(rows)
        raise CanaryError(
            f"{store.url}: the canary drifted: its {len(pixels)} rows decode up to "
            f"{largest} levels (mean {mean:.3f}) away from the pixels recorded at encode "
            f"time on {meta.get('device')} with torch {meta.get('torch')}, beyond the "
            f"tolerance of {tolerance['max_levels']} (mean {tolerance['mean_levels']})"
            + (f" ({left_out} rows holding NaN or Inf left out)" if left_out else "")
            + "; nothing was decoded: check the model's weights and the workers' torch (or "
            "pass --skip-canary for a decoder changed on purpose)"
        )
    return CanaryResult(status="within", max_levels=largest, mean_levels=mean)
