"""Reconstruction quality: PSNR, SSIM and MS-SSIM on images in [0, 1], ``(N, C, H, W)``."""

from __future__ import annotations

import torch
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim
from torch.nn.functional import interpolate

MS_SSIM_SIDE = 161  # pytorch-msssim's 4 halvings with its 11-pixel window need > 160 px


def psnr_per_image(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Each image's PSNR in dB (peak 1.0; capped at 100 dB), float32 ``(N,)``."""
    mse = (reference.float() - test.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR in dB (peak 1.0; capped at 100 dB)."""
    return float(psnr_per_image(reference, test).mean())


def ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, or the largest odd size that fits small images)."""
    side = min(reference.shape[-2:])
    window = min(11, side if side % 2 else side - 1)
    value = _ssim(
        reference.float(), test.float(), data_range=1.0, win_size=window, size_average=True
    )
    return float(value)


def ms_ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean MS-SSIM (pytorch-msssim: 5 scales, Gaussian window 11). Its four halvings
    need a side over 160 pixels, so smaller images are first enlarged by the smallest
    integer factor that gets there, nearest-neighbour (each pixel becomes a k×k block;
    no new values)."""
    side = min(reference.shape[-2:])
    factor = -(-MS_SSIM_SIDE // side)
    if factor > 1:
        reference = interpolate(reference.float(), scale_factor=factor, mode="nearest")
        test = interpolate(test.float(), scale_factor=factor, mode="nearest")
    value = _ms_ssim(reference.float(), test.float(), data_range=1.0, size_average=True)
    return float(value)
