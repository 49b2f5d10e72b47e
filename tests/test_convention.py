"""A diffusers model's latent convention (models/convention.py): stored latents far from
unit spread warn, naming the likely cause and the flag that fixes an import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentbatch.config import preset_config
from latentbatch.models.checkpoint import read_info
from latentbatch.models.convention import scale_warning
from latentbatch.stores.store import LatentStore, Layout, create_store


def _store(path: Path, model: Path | None, spread: float) -> LatentStore:
    config = read_info(model).config if model is not None else preset_config("seed")
    store = create_store(
        str(path), model_id="0" * 64, config=config, capacity=32, layout=Layout(16, 8)
    )
    latents = spread * np.random.default_rng(0).standard_normal((16, *store.latent_shape))
    store.write_rows(0, latents.astype(np.float32), [f"r{i}" for i in range(16)], np.full(16, -1))
    store.write_meta(count=16)
    return store


@pytest.mark.parametrize(
    ("spread", "said"),
    [
        (1.0, None),
        (5.5, "they look unscaled (raw latents declared scaled?); if so, import them again "
              "with --latents raw"),
        (0.1, "they look scaled twice (scaled latents declared raw?); if so, import them "
              "again with --latents scaled"),
    ],
)  # fmt: skip
def test_an_imports_spread_names_its_likely_cause(
    tmp_path: Path, kl_vae: Path, spread: float, said: str | None
) -> None:
    store = _store(tmp_path / "s.zarr", kl_vae, spread)
    assert store.convention is not None and store.convention["scaling_factor"] == 0.18215
    warning = scale_warning(store)
    assert warning == said if said is None else said in str(warning)


def test_an_encodes_spread_blames_the_model_and_presets_are_not_checked(
    tmp_path: Path, kl_vae: Path
) -> None:
    warning = scale_warning(_store(tmp_path / "e.zarr", kl_vae, 5.5), "encode")
    assert warning is not None and "it does not fit this model" in warning
    preset = _store(tmp_path / "p.zarr", None, 5.5)
    assert preset.convention is None and scale_warning(preset) is None


def test_per_channel_conventions_are_checked_and_round_trip(tmp_path: Path) -> None:
    """A store of a per-channel convention (an SDXL-style mean and std) is checked by the
    same spread rule; a convention undone and redone gives the latents back, FLUX.2's
    2x2 packing included."""
    from latentbatch.config import Convention
    from tests.helpers import save_family_vae

    model = save_family_vae(tmp_path / "sdxl", "sdxl")
    store = _store(tmp_path / "x.zarr", model, 5.5)
    assert store.convention is not None and store.convention["formula"] == "mean-std"
    warning = scale_warning(store)
    assert warning is not None and "latents scaled by 0.13025" in warning
    x = np.random.default_rng(1).standard_normal((3, 8, 4, 4))
    packed = Convention(formula="mean-std", scale=(1.0,), shift=tuple(range(8)),
                        std=tuple(float(i + 1) for i in range(8)), packing="2x2")  # fmt: skip
    assert packed.to_vae(x).shape == (3, 2, 8, 8)
    np.testing.assert_allclose(packed.from_vae(packed.to_vae(x)), x)
    assert Convention.from_dict(packed.to_dict()) == packed
    vectors = Convention(formula="scale-shift", scale=(0.5, 2.0), shift=(1.0, -1.0))
    np.testing.assert_allclose(vectors.to_vae(x[:, :2]), x[:, :2] / [[[[0.5]], [[2.0]]]]
                               + [[[[1.0]], [[-1.0]]]])  # fmt: skip
