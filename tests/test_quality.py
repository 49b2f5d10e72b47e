from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import interpolate

from latentbatch.models.quality import ms_ssim, psnr, ssim


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


def test_ms_ssim_works_on_small_images_by_enlarging_them() -> None:
    generator = torch.Generator().manual_seed(1)
    for side, channels in ((8, 1), (28, 1), (64, 3), (170, 1)):
        a = torch.rand(2, channels, side, side, generator=generator)
        assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
        noisy = (a + 0.05 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
        worse = (a + 0.2 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
        assert 1.0 > ms_ssim(a, noisy) > ms_ssim(a, worse)
    # enlarging nearest-neighbour by an integer factor keeps PSNR: no new pixel values
    a = torch.rand(1, 1, 28, 28, generator=generator)
    enlarged = a.repeat_interleave(6, -1).repeat_interleave(6, -2)
    assert interpolate(a, scale_factor=6, mode="nearest").equal(enlarged)
