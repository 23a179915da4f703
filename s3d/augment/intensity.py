"""Intensity augmentation of images (B, C, D, H, W): brightness, contrast, gamma, Gaussian noise.

Every factor is per sample and channel, taken from an :class:`~s3d.augment.AugmentParams`; a factor
of 1 (noise sd 0) leaves the channel unchanged. Statistics (mean, min, max, std) are per sample and
channel over the patch.
"""

from __future__ import annotations

import torch

from s3d.augment.config import AugmentParams


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) factors as (B, C, 1, 1, 1) in ``x``'s precision (float64 stays float64, else float32)."""
    return v.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32).view(*v.shape, 1, 1, 1)


def intensity_transform(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Brightness, contrast, gamma and noise, in that order.

    - brightness: ``x * b``;
    - contrast: ``(x - mean) * c + mean``, clipped to the channel's previous [min, max];
    - gamma: rescale to [0, 1], raise to ``g``, rescale back, then restore the channel's mean and std;
    - noise: ``x + sd * N(0, 1)`` from a device generator seeded with ``params.noise_seed``.

    Example:
        >>> x = torch.randn(2, 1, 8, 8, 8)
        >>> torch.equal(intensity_transform(x, AugmentParams.identity(2)), x)
        True
    """
    dims = (2, 3, 4)
    if bool((params.brightness != 1).any()):
        x = x * _per_channel(params.brightness, x)
    c = _per_channel(params.contrast, x)
    if bool((params.contrast != 1).any()):
        mean = x.mean(dims, keepdim=True)
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        x = torch.where(c != 1, torch.minimum(torch.maximum((x - mean) * c + mean, lo), hi), x)
    g = _per_channel(params.gamma, x)
    if bool((params.gamma != 1).any()):
        mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
        lo = x.amin(dims, keepdim=True)
        rng = (x.amax(dims, keepdim=True) - lo).clamp_min(1e-7)
        xg = ((x - lo) / rng).clamp(0, 1) ** g * rng + lo
        xg_std = xg.std(dims, keepdim=True).clamp_min(1e-7)
        xg = (xg - xg.mean(dims, keepdim=True)) / xg_std * std + mean
        x = torch.where(g != 1, xg, x)
    if bool((params.noise_sd > 0).any()):
        gen = torch.Generator(device=x.device).manual_seed(params.noise_seed)
        sd = _per_channel(params.noise_sd[:, None], x)
        x = x + torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) * sd
    return x
