"""Fine-tuning batches: random (foreground-oversampled) patches of cached cases and their augmentation.

Every random draw comes from one CPU ``torch.Generator`` in a fixed order, so a run (and its
resume) is reproducible from the generator's state on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from s3d.data.augment import mirror, plane_rotation


@dataclass
class CachedCase:
    """A preprocessed case in memory (or memory-mapped): data (C, D, H, W), seg (D, H, W), locations."""

    name: str
    data: np.ndarray
    seg: np.ndarray
    locs: np.ndarray


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(0, max(1, high), (1,), generator=gen))


def sample_patches(
    cases: Sequence[CachedCase], batch_size: int, patch_size: Sequence[int], gen: torch.Generator,
    foreground_fraction: float = 0.33,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random patches; the last ``round(B * foreground_fraction)`` are centred on foreground.

    Foreground patches (nnU-Net's oversampling) pick a label present in the case, then one of its
    voxels, and centre the patch there. Cases smaller than the patch are zero-padded.

    Returns:
        x (B, C, *patch_size) float32, y (B, *patch_size) int64 (CPU).

    Example:
        >>> x, y = sample_patches(cases, 2, (32, 32, 32), torch.Generator().manual_seed(0))
    """
    ps = tuple(int(p) for p in patch_size)
    n_fg = round(batch_size * foreground_fraction)
    xs, ys = [], []
    for i in range(batch_size):
        case = cases[_randint(gen, len(cases))]
        shape = case.seg.shape
        hi = [max(0, s - p) for s, p in zip(shape, ps, strict=True)]
        force_fg = i >= batch_size - n_fg and len(case.locs) > 0
        if force_fg:
            labels = np.unique(case.locs[:, 0])
            lab = labels[_randint(gen, len(labels))]
            rows = np.flatnonzero(case.locs[:, 0] == lab)
            centre = case.locs[rows[_randint(gen, len(rows))], 1:]
            lo = [min(max(0, int(c) - p // 2), h) for c, p, h in zip(centre, ps, hi, strict=True)]
        else:
            lo = [_randint(gen, h + 1) for h in hi]
        sl = tuple(slice(a, a + p) for a, p in zip(lo, ps, strict=True))
        x = np.asarray(case.data[(slice(None), *sl)], dtype=np.float32)
        y = np.asarray(case.seg[sl], dtype=np.int64)
        pad = [(0, p - s) for p, s in zip(ps, y.shape, strict=True)]
        if any(b for _, b in pad):
            x = np.pad(x, [(0, 0), *pad])
            y = np.pad(y, pad)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def voxel_space_theta(m: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Express (B, 3, 3) rotations/zooms ``m`` of voxel space in ``affine_grid``'s normalised coordinates.

    ``affine_grid`` (``align_corners=False``) maps each axis to [-1, 1] regardless of its length, so a
    rotation applied there directly shears a non-cubic patch. Conjugating with the half-extents
    (x, y, z) = (W, H, D) / 2 keeps the transform rigid in voxels: entry (i, j) is m_ij * h_j / h_i.
    ``size`` is the patch's (D, H, W) in voxels.
    """
    half = torch.tensor([size[2], size[1], size[0]], dtype=m.dtype, device=m.device) / 2
    return m * half[None, None, :] / half[None, :, None]


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles (rad) about the three axes of ``affine_grid``'s (x, y, z) -> (B, 3, 3) ``Rz Ry Rx``."""
    rx = plane_rotation(angles[:, 0], 1, 2)
    ry = plane_rotation(angles[:, 1], 2, 0)
    rz = plane_rotation(angles[:, 2], 0, 1)
    return rz @ ry @ rx


@dataclass
class AugmentConfig:
    """nnU-Net-like augmentation probabilities and ranges (per sample).

    Attributes:
        p_rotation, rotation_deg: rotate about each axis by U(-deg, deg).
        p_scale, scale: isotropic zoom factor U(lo, hi) (>1 zooms in).
        p_mirror: flip each axis independently.
        p_brightness, brightness: multiply each channel by U(lo, hi).
        p_contrast, contrast: scale around the channel mean by U(lo, hi), clipped to the old range.
        p_gamma, gamma: gamma U(lo, hi) on the [0, 1]-rescaled channel, mean and std kept.
        p_noise, noise_var: additive Gaussian noise with variance U(0, noise_var).
    """

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_var: float = 0.1


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                  cfg: AugmentConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch on its device: rotation/scaling (one ``grid_sample``), mirroring, intensity.

    Random draws come from ``gen`` (CPU) so a run is reproducible from the generator's state on any
    device; noise uses a device generator seeded from ``gen``.

    Args:
        x: images (B, C, D, H, W) float; y: labels (B, D, H, W) int64; same device.

    Returns:
        (x, y) augmented, same shapes and dtypes.

    Example:
        >>> xa, ya = augment_batch(x, y, torch.Generator().manual_seed(0))
    """
    cfg = cfg or AugmentConfig()
    b, c = x.shape[:2]
    dev = x.device
    # spatial: rotation + scaling as one affine per sample (identity where not drawn)
    rot = (_rand(gen, b) < cfg.p_rotation).double()[:, None] * (_rand(gen, b, 3) * 2 - 1) * math.radians(
        cfg.rotation_deg)
    do_scale = _rand(gen, b) < cfg.p_scale
    zoom = torch.where(do_scale, cfg.scale[0] + _rand(gen, b) * (cfg.scale[1] - cfg.scale[0]),
                       torch.ones(b, dtype=torch.float64))
    spatial = (rot.abs().sum(1) > 0) | do_scale
    if bool(spatial.any()):
        theta = torch.zeros(b, 3, 4, dtype=torch.float64)
        theta[:, :, :3] = voxel_space_theta(_rotation_matrices(rot) / zoom[:, None, None], x.shape[2:])
        theta = theta.to(dev, torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        xs = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        ys = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
        keep = spatial.to(dev)
        x = torch.where(keep.view(b, 1, 1, 1, 1), xs.to(x.dtype), x)
        y = torch.where(keep.view(b, 1, 1, 1), ys[:, 0].round().long(), y)
    # mirroring
    flips = _rand(gen, b, 3) < cfg.p_mirror
    x, y = mirror(x, flips), mirror(y, flips)
    # intensity, per sample and channel
    def draw(p: float, lo: float, hi: float) -> torch.Tensor:
        on = _rand(gen, b, c) < p
        v = lo + _rand(gen, b, c) * (hi - lo)
        return torch.where(on, v, torch.ones_like(v)).to(dev, torch.float32).view(b, c, 1, 1, 1)

    x = x * draw(cfg.p_brightness, *cfg.brightness)
    cf = draw(cfg.p_contrast, *cfg.contrast)
    if bool((cf != 1).any()):
        mean = x.mean((2, 3, 4), keepdim=True)
        lo, hi = x.amin((2, 3, 4), keepdim=True), x.amax((2, 3, 4), keepdim=True)
        x = torch.where(cf != 1, torch.minimum(torch.maximum((x - mean) * cf + mean, lo), hi), x)
    g = draw(cfg.p_gamma, *cfg.gamma)
    if bool((g != 1).any()):
        mean, std = x.mean((2, 3, 4), keepdim=True), x.std((2, 3, 4), keepdim=True)
        lo = x.amin((2, 3, 4), keepdim=True)
        rng = (x.amax((2, 3, 4), keepdim=True) - lo).clamp_min(1e-7)
        xg = ((x - lo) / rng).clamp(0, 1) ** g * rng + lo
        xg_std = xg.std((2, 3, 4), keepdim=True).clamp_min(1e-7)
        xg = (xg - xg.mean((2, 3, 4), keepdim=True)) / xg_std * std + mean
        x = torch.where(g != 1, xg, x)
    noise_on = _rand(gen, b) < cfg.p_noise
    var = _rand(gen, b) * cfg.noise_var
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    if bool(noise_on.any()):
        dgen = torch.Generator(device=dev).manual_seed(seed)
        sd = (var.sqrt() * noise_on).to(dev, torch.float32).view(b, 1, 1, 1, 1)
        x = x + torch.randn(x.shape, generator=dgen, device=dev, dtype=x.dtype) * sd
    return x, y


__all__ = ["AugmentConfig", "CachedCase", "augment_batch", "sample_patches"]
