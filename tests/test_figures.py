from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentbatch.figures import image_grid, reconstruction_grid, save_training_curves


def test_grid_places_every_image() -> None:
    rows = [np.full((3, 4, 4, 1), v, np.uint8) for v in (10, 200)]
    grid = np.asarray(image_grid(rows, gap=1))
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert grid[1, 1] == 10 and grid[6, 1] == 200 and grid[0, 0] == 255


def test_reconstruction_grid_scales_small_images() -> None:
    images = np.zeros((8, 28, 28, 3), np.uint8)
    grid = reconstruction_grid(images, images)
    assert grid.mode == "RGB" and grid.width > 8 * 28 * 2


def test_grid_refuses_empty_rows() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([np.zeros((0, 4, 4, 1), np.uint8)])


def test_training_curves_png(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_psnr": 20 + e, "val_ssim": 0.8}
        for e in (1, 2, 3)
    ]
    save_training_curves(history, tmp_path / "curves.png")
    picture = Image.open(tmp_path / "curves.png")
    assert picture.format == "PNG" and picture.width == 900
    assert len(np.unique(np.asarray(picture.convert("L")))) > 10
