from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentbatch.config import DEFAULT_LAMBDA, TrainConfig, preset_config
from latentbatch.errors import CheckpointError, ConfigError
from latentbatch.models import checkpoint
from latentbatch.train import learning_rate, split, train
from tests.helpers import tiny_model_config, train_tiny, train_tiny_codec


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


def test_codec_trains_for_rate_and_distortion_and_resumes_exactly(tmp_path: Path) -> None:
    whole = train_tiny_codec(tmp_path / "whole", epochs=5)
    first, last = whole.history[0], whole.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_loss"] < first["val_loss"] and last["val_bpp"] > 0
    info = checkpoint.read_info(whole.model_dir)
    assert info.meta["training"]["config"]["rate_lambda"] == DEFAULT_LAMBDA
    described = info.quantization
    assert described is not None and described["prior"] == "logistic"
    assert len(described["loc"]) == len(described["scale"]) == 4
    train_tiny_codec(tmp_path / "parts", epochs=1)
    resumed = train_tiny_codec(tmp_path / "parts", epochs=5)
    assert resumed.model_id == whole.model_id  # the quantisation noise is seeded per epoch


def test_a_larger_lambda_buys_psnr_with_bits(tmp_path: Path) -> None:
    cheap = train_tiny_codec(tmp_path / "cheap", epochs=4, rate_lambda=0.001).final
    dear = train_tiny_codec(tmp_path / "dear", epochs=4, rate_lambda=0.1).final
    assert dear["val_bpp"] > cheap["val_bpp"] and dear["val_psnr"] > cheap["val_psnr"]


def test_codec_learning_rate_drops_tenfold_for_the_last_fifth() -> None:
    codec = TrainConfig.for_preset("codec", epochs=10)
    rates = [learning_rate(preset_config("codec"), codec, e) for e in range(10)]
    assert rates == [2e-3] * 8 + [2e-4] * 2
    seed = TrainConfig(epochs=10)
    assert {learning_rate(preset_config("seed"), seed, e) for e in range(10)} == {1e-3}


def test_training_refuses_a_lambda_for_a_preset_without_a_rate(tmp_path: Path) -> None:
    config = TrainConfig("synthetic:40", epochs=1, rate_lambda=0.01)
    with pytest.raises(ConfigError, match="no rate to trade"):
        train(preset_config("seed"), config, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
