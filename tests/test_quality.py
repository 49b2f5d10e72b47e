from __future__ import annotations

import math

import pytest
import torch

from latentbatch.quality import psnr, ssim


def test_psnr_matches_the_formula() -> None:
    a = torch.zeros(2, 1, 8, 8)
    b = a + 0.1
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-5)
    assert psnr(a, a) == pytest.approx(100.0)


def test_ssim_is_one_for_identical_images_and_lower_otherwise() -> None:
    a = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert ssim(a, a.flip(-1)) < 0.5
    small = torch.rand(1, 1, 8, 8)
    assert ssim(small, small) == pytest.approx(1.0, abs=1e-5)
