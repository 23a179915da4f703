"""Intensity augmentation of images (B, C, D, H, W), in nnU-Net's order (:func:`intensity_transform`).

Every factor is per sample and channel, taken from an :class:`~s3d.augment.AugmentParams`; a factor
of 1 (noise sd 0, blur sigma 0) leaves the channel bitwise unchanged. Statistics (mean, min, max,
std) are per sample and channel over the patch; only the channels a transform changes are computed.
"""

from __future__ import annotations

import torch

from s3d.augment.params import AugmentParams
from s3d.augment.resolution import gaussian_blur, simulate_low_resolution

_EPS = 1e-7  # floor of a channel's range and std before dividing by them (nnU-Net's)


def _selected(factor: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (sample, channel) pairs whose ``factor`` (B, C) is not 1: (b, c) indices on ``x``'s device and
    the factors (N, 1, 1, 1) in ``x``'s precision (float64 stays float64, else float32)."""
    sel = (factor != 1).nonzero()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = factor[sel[:, 0], sel[:, 1]].to(x.device, dt).view(-1, 1, 1, 1)
    return sel[:, 0].to(x.device), sel[:, 1].to(x.device), f


def _mean_std(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std (N, 1, 1, 1) of each volume of ``v`` (N, D, H, W), two passes (faster on CPU
    than ``std(dim=...)``)."""
    dims = (1, 2, 3)
    mean = v.mean(dims, keepdim=True)
    n = v[0].numel()
    var = (v - mean).square_().sum(dims, keepdim=True) / max(n - 1, 1)
    return mean, var.sqrt_()


def add_noise(x: torch.Tensor, sd: torch.Tensor, seed: int) -> torch.Tensor:
    """``x + sd * N(0, 1)`` for the samples with ``sd`` (B,) > 0, every channel its own field.

    The field comes from a generator on ``x``'s device seeded with ``seed``, drawn for the noisy
    samples only, in batch order.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4, 4)
        >>> bool((add_noise(x, torch.tensor([0.0, 0.1]), 0)[0] == 0).all())
        True
    """
    idx = (sd > 0).nonzero().flatten()
    if not idx.numel():
        return x
    gen = torch.Generator(device=x.device).manual_seed(seed)
    dev_idx = idx.to(x.device)
    field = torch.randn((idx.numel(), *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
    out = x.clone()
    out[dev_idx] = x[dev_idx] + field * sd[idx].to(x.device, x.dtype).view(-1, 1, 1, 1, 1)
    return out


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor`` per sample and channel (``factor`` (B, C)).

    Example:
        >>> adjust_brightness(torch.ones(1, 1, 2, 2, 2), torch.tensor([[1.5]])).max().item()
        1.5
    """
    b, c, f = _selected(factor, x)
    if not b.numel():
        return x
    out = x.clone()
    out[b, c] = x[b, c] * f
    return out


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(x - mean) * factor + mean`` per channel, clipped to the channel's previous [min, max].

    Example:
        >>> x = torch.arange(8.0).view(1, 1, 2, 2, 2)
        >>> adjust_contrast(x, torch.tensor([[2.0]])).flatten().tolist()[:3]
        [0.0, 0.0, 0.5]
    """
    b, c, f = _selected(factor, x)
    if not b.numel():
        return x
    v = x[b, c]
    dims = (1, 2, 3)
    mean = v.mean(dims, keepdim=True)
    lo, hi = v.amin(dims, keepdim=True), v.amax(dims, keepdim=True)
    out = x.clone()
    out[b, c] = torch.minimum(torch.maximum((v - mean) * f + mean, lo), hi)
    return out


def adjust_gamma(x: torch.Tensor, gamma: torch.Tensor, *, invert: bool = False) -> torch.Tensor:
    """Gamma on the [0, 1]-rescaled channel, then the channel's mean and std restored.

    With ``u = (x - min) / (max - min)`` the channel becomes ``min + (max - min) * u ** gamma``, or with
    ``invert`` ``min + (max - min) * (1 - (1 - u) ** gamma)`` (nnU-Net negates the channel, applies the
    gamma and negates back); then ``(y - mean(y)) * std(x) / std(y) + mean(x)`` (std unbiased, range and
    std floored at 1e-7).

    Args:
        x: images (B, C, D, H, W).
        gamma: (B, C) exponents > 0; 1 leaves the channel unchanged.
        invert: apply the gamma to the inverted channel.

    Example:
        >>> x = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> y = adjust_gamma(x, torch.tensor([[0.7]]))
        >>> abs(float(y.mean() - x.mean())) < 1e-6
        True
    """
    b, c, g = _selected(gamma, x)
    if not b.numel():
        return x
    v = -x[b, c] if invert else x[b, c]
    mean, std = _mean_std(v)
    lo = v.amin((1, 2, 3), keepdim=True)
    rng = v.amax((1, 2, 3), keepdim=True) - lo
    y = (v - lo).div_(rng.clamp_min(_EPS)).pow_(g).mul_(rng).add_(lo)
    y_mean, y_std = _mean_std(y)
    y = y.sub_(y_mean).mul_(std / y_std.clamp_min(_EPS)).add_(mean)
    out = x.clone()
    out[b, c] = -y if invert else y
    return out


def intensity_transform(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, in that order (nnU-Net's).

    Example:
        >>> x = torch.randn(2, 1, 8, 8, 8)
        >>> torch.equal(intensity_transform(x, AugmentParams.identity(2)), x)
        True
    """
    x = add_noise(x, params.noise_sd, params.noise_seed)
    x = gaussian_blur(x, params.blur_sigma)
    x = adjust_brightness(x, params.brightness)
    x = adjust_contrast(x, params.contrast)
    x = simulate_low_resolution(x, params.lowres_scale)
    x = adjust_gamma(x, params.gamma_inverted, invert=True)
    return adjust_gamma(x, params.gamma)
