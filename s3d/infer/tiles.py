"""The geometry of sliding-window prediction: the Gaussian importance map, tile positions, mirror flips."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from s3d._triple import to_3tuple


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Separable Gaussian weights over a patch, 1 at the centre and > 0 everywhere.

    ``w[z, y, x] = exp(-sum_a (i_a - c_a)^2 / (2 sigma_a^2))`` with centre ``c_a = (n_a - 1) / 2``
    (so the map is exactly mirror-symmetric) and ``sigma_a = sigma_scale * n_a`` voxels. Values that
    underflow to 0 (only for very small ``sigma_scale``) are raised to the smallest positive value, so
    every voxel of a tile keeps a nonzero weight.

    Args:
        patch_size: (D, H, W) in voxels.
        sigma_scale: sigma as a fraction of the patch size (nnU-Net: 1/8).

    Returns:
        Tensor (D, H, W).

    Example:
        >>> w = gaussian_importance_map((32, 32, 32))
        >>> w.shape, float(w.max())
        (torch.Size([32, 32, 32]), 1.0)
    """
    patch_size = to_3tuple(patch_size, "patch_size")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    w = torch.ones((), dtype=torch.float64)
    for n in patch_size:
        i = torch.arange(n, dtype=torch.float64)
        g = torch.exp(-((i - (n - 1) / 2) ** 2) / (2 * (sigma_scale * n) ** 2))
        w = w.unsqueeze(-1) * g
    w = (w / w.max()).to(dtype)
    if (w <= 0).any():
        w = w.clamp_min(torch.finfo(dtype).tiny if not w[w > 0].numel() else float(w[w > 0].min()))
    return w.to(device)


def tile_starts(image_size: int, patch_size: int, step: float) -> list[int]:
    """Start offsets (voxels) of tiles of ``patch_size`` covering ``image_size`` along one axis.

    The number of tiles is the smallest that keeps the distance between starts at most
    ``step * patch_size``; tiles are spread evenly from 0 to ``image_size - patch_size`` and placed
    mirror-symmetrically (``start[i] + start[-1 - i] == image_size - patch_size``).

    Example:
        >>> tile_starts(48, 32, 0.5)
        [0, 16]
    """
    if image_size < patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch {patch_size}; pad it first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1] (a fraction of the patch), got {step}")
    n = math.ceil((image_size - patch_size) / (step * patch_size)) + 1
    if n == 1:
        return [0]
    spacing = (image_size - patch_size) / (n - 1)
    first = [int(round(spacing * i)) for i in range((n + 1) // 2)]
    return first + [image_size - patch_size - s for s in reversed(first[: n // 2])]


def mirror_axes_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (spatial axes 0..2), the empty one (no flip) first.

    Example:
        >>> mirror_axes_combinations((0, 1))
        [(), (0,), (1,), (0, 1)]
    """
    axes = tuple(sorted(set(int(a) for a in axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be spatial axes 0, 1, 2 (D, H, W), got {axes}")
    return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]
