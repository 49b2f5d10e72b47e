"""Reconstruction quality: PSNR and SSIM on images in [0, 1], shaped ``(N, C, H, W)``."""

from __future__ import annotations

import torch
from pytorch_msssim import ssim as _ssim


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR in dB (peak 1.0; capped at 100 dB)."""
    mse = (reference.float() - test.float()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, or the largest odd size that fits small images)."""
    side = min(reference.shape[-2:])
    window = min(11, side if side % 2 else side - 1)
    value = _ssim(
        reference.float(), test.float(), data_range=1.0, win_size=window, size_average=True
    )
    return float(value)
