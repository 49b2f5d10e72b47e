from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentbatch import checkpoint
from latentbatch.config import TrainConfig, preset_config
from latentbatch.errors import CheckpointError, ConfigError
from latentbatch.train import split, train
from tests.helpers import tiny_model_config, train_tiny


def test_split_is_seeded_and_disjoint() -> None:
    train_rows, val_rows = split(5000, 0.1, seed=0)
    assert (len(train_rows), len(val_rows)) == (4500, 500)
    assert set(train_rows.tolist()).isdisjoint(val_rows.tolist())
    assert torch.equal(split(5000, 0.1, 0)[1], val_rows)
    assert not torch.equal(split(5000, 0.1, 1)[1], val_rows)
    with pytest.raises(ConfigError):
        split(1, 0.1, 0)


def test_loss_falls_within_a_short_run(tmp_path: Path) -> None:
    result = train(
        preset_config("seed"),
        TrainConfig("mnist5k", epochs=2, limit=600, batch_size=32),
        tmp_path / "m",
        progress=False,
    )
    first, last = result.history
    assert last["train_loss"] < first["train_loss"]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_psnr"] > first["val_psnr"]


def test_same_seed_gives_the_same_model_id_and_another_seed_does_not(tmp_path: Path) -> None:
    a = train_tiny(tmp_path / "a", seed=1)
    b = train_tiny(tmp_path / "b", seed=1)
    c = train_tiny(tmp_path / "c", seed=2)
    assert a.model_id == b.model_id != c.model_id
    assert a.history[-1]["val_loss"] == b.history[-1]["val_loss"]


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = train_tiny(tmp_path / "whole", epochs=3)
    train_tiny(tmp_path / "parts", epochs=1)
    resumed = train_tiny(tmp_path / "parts", epochs=3)
    assert not resumed.reused
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.model_id == whole.model_id


def test_finished_run_is_reused(tmp_path: Path) -> None:
    first = train_tiny(tmp_path / "m", epochs=1)
    (tmp_path / "m" / checkpoint.CURVES).unlink()
    again = train_tiny(tmp_path / "m", epochs=1)
    assert again.reused and again.model_id == first.model_id
    assert again.curves.is_file()


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    train_tiny(tmp_path / "m", epochs=1)
    with pytest.raises(CheckpointError, match="trained with other settings"):
        train_tiny(tmp_path / "m", epochs=2, seed=9)
    with pytest.raises(CheckpointError, match="already holds a model"):
        train_tiny(tmp_path / "m", epochs=2, resume=False)


def test_model_directory_holds_weights_config_and_pictures(tiny_model: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"model.safetensors", "config.json", "reconstructions.png", "curves.png"} <= names
    meta = json.loads((tiny_model / "config.json").read_text())
    assert meta["image"] == {"height": 16, "width": 16, "mode": "L"}
    assert meta["normalisation"]["pixels"].startswith("uint8 / 255")
    assert meta["source"]["spec"] == "synthetic:96"
    assert meta["training"]["split"] == {"train": 72, "validation": 24}
    assert {"torch", "numpy", "python", "latentbatch"} <= set(meta["versions"])
    assert len(meta["training"]["history"]) == 2
    assert {"train_loss", "val_loss", "val_psnr", "val_ssim", "seconds"} <= set(
        meta["training"]["history"][0]
    )
    grid = Image.open(tiny_model / "reconstructions.png")
    assert grid.height < grid.width  # two rows of eight
    curves = Image.open(tiny_model / "curves.png")
    assert curves.size[0] > 400


def test_mse_loss_option(tmp_path: Path) -> None:
    config = TrainConfig("synthetic:40", epochs=1, loss="mse", batch_size=8)
    result = train(tiny_model_config(3, 8), config, tmp_path / "m", progress=False)
    assert result.history[0]["val_loss"] < 0.5


@pytest.mark.slow
def test_seed_model_reaches_22_db_on_mnist5k_in_10_epochs_deterministically(tmp_path: Path) -> None:
    runs = [
        train(
            preset_config("seed"), TrainConfig("mnist5k", 10, seed=0), tmp_path / n, progress=False
        )
        for n in ("a", "b")
    ]
    meta = json.loads((runs[0].model_dir / "config.json").read_text())
    assert meta["training"]["split"] == {"train": 4500, "validation": 500}
    assert runs[0].final["val_psnr"] >= 22.0
    assert runs[0].model_id == runs[1].model_id
