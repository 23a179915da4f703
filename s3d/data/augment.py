"""Batched spatial augmentation on the training device: rotation, isotropic scaling, mirroring.

The paper's light augmentation (nnssl's defaults): with probability 0.2 per sample a rotation by
angles drawn from U(-30, 30) degrees about each of the three axes, with probability 0.2 per sample
an isotropic scaling by a factor from U(0.7, 1.4), and mirroring with probability 0.5 per axis.

All rotated or scaled samples of a batch go through ONE ``torch.nn.functional.grid_sample`` call
(trilinear, zero padding) on the batch's device, so DataLoader workers only cut crops. Samples
with neither rotation nor scaling are not resampled (bit-exact), and mirroring is an exact
``torch.flip``. Random parameters come from a CPU ``torch.Generator`` (cheap, reproducible on any
device).

Geometry: voxels are taken as isotropic (the pre-training data are resampled to 1 mm). An output
voxel ``p`` (index, D/H/W order) reads the input at ``M (p - c) + c`` with ``c`` the patch centre
and ``M = scale * R^T``: a rotation by +90 degrees about axis 0 equals ``torch.rot90(x, 1, dims=(3, 4))``
and a scale > 1 shows more of the image (content shrinks), as in batchgenerators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AffineParams:
    """Per-sample augmentation parameters of a batch of size B.

    Attributes:
        angles: (B, 3) radians, rotation about axes D, H, W (0 = none).
        scale: (B,) isotropic scale factor (1 = none).
        flip: (B, 3) bool, mirror along D, H, W.
    """

    angles: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor

    @classmethod
    def identity(cls, batch: int) -> AffineParams:
        """Parameters that leave every sample unchanged.

        Example:
            >>> AffineParams.identity(2).scale
            tensor([1., 1.], dtype=torch.float64)
        """
        return cls(torch.zeros(batch, 3, dtype=torch.float64), torch.ones(batch, dtype=torch.float64),
                   torch.zeros(batch, 3, dtype=torch.bool))


@dataclass
class AugmentConfig:
    """Probabilities and ranges (paper defaults)."""

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5

    def sample(self, batch: int, generator: torch.Generator | None = None) -> AffineParams:
        """Draw parameters for ``batch`` samples from ``generator`` (CPU).

        Example:
            >>> p = AugmentConfig().sample(4, torch.Generator().manual_seed(0)); p.flip.shape
            torch.Size([4, 3])
        """
        g = generator
        rot_on = torch.rand(batch, generator=g, dtype=torch.float64) < self.p_rotation
        angles = torch.rand(batch, 3, generator=g, dtype=torch.float64) * 2 - 1
        angles = angles * math.radians(self.rotation_deg)
        angles = angles * rot_on[:, None]
        scale_on = torch.rand(batch, generator=g, dtype=torch.float64) < self.p_scale
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand(batch, generator=g, dtype=torch.float64)
        scale = torch.where(scale_on, scale, torch.ones_like(scale))
        flip = torch.rand(batch, 3, generator=g, dtype=torch.float64) < self.p_mirror
        return AffineParams(angles, scale, flip)


def plane_rotation(angle: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """(B, 3, 3) float64 rotations by ``angle`` (B,) radians in the plane of axes ``i`` and ``j``.

    Axis ``i`` turns towards axis ``j``: ``R[i, i] = R[j, j] = cos``, ``R[i, j] = -sin``,
    ``R[j, i] = sin``; the third axis is fixed. Pre-training's and fine-tuning's augmentations both
    build their rotations from it.

    Example:
        >>> plane_rotation(torch.tensor([math.pi / 2]), 0, 1).round()[0]
        tensor([[0., -1., 0.], [1., 0., 0.], [0., 0., 1.]], dtype=torch.float64)
    """
    b = angle.shape[0]
    r = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    c, s = torch.cos(angle), torch.sin(angle)
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


def _axis_rotation(angle: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, 3, 3) rotation about ``axis`` by ``angle`` (B,), from the first to the second other axis."""
    i, j = [a for a in range(3) if a != axis]
    return plane_rotation(angle, i, j)


def mirror(t: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip each sample of ``t`` along the spatial axes its row of ``flip`` marks (exact, no resampling).

    Args:
        t: (B, ..., D, H, W) on any device: images (B, C, D, H, W) or label maps (B, D, H, W).
        flip: (B, 3) bool, mirror along D, H, W (any device).

    Returns:
        A new tensor like ``t``, or ``t`` itself when nothing is flipped.

    Example:
        >>> y = torch.arange(8).view(1, 2, 2, 2)
        >>> mirror(y, torch.tensor([[True, False, False]]))[0, 0]
        tensor([[4, 5], [6, 7]])
    """
    flips = flip.cpu()
    if not flips.any():
        return t
    out = t.clone()
    first = t.dim() - 3
    for pattern in {tuple(f.tolist()) for f in flips}:
        dims = [first + a for a in range(3) if pattern[a]]
        if not dims:
            continue
        sel = (flips == torch.tensor(pattern)).all(dim=1).nonzero().flatten().to(t.device)
        out[sel] = torch.flip(out[sel], dims=dims)
    return out


def sampling_matrices(params: AffineParams) -> torch.Tensor:
    """(B, 3, 3) float64 matrices ``M = scale * R^T`` mapping output offsets to input offsets (voxels).

    Entries within 1e-12 of 0 or +-1 are snapped, so multiples of 90 degrees sample exactly on the grid.

    Example:
        >>> sampling_matrices(AffineParams.identity(1))[0]
        tensor([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]], dtype=torch.float64)
    """
    rot = torch.eye(3, dtype=torch.float64).repeat(params.angles.shape[0], 1, 1)
    for axis in range(3):
        rot = rot @ _axis_rotation(params.angles[:, axis].double(), axis)
    m = rot.transpose(1, 2) * params.scale.double()[:, None, None]
    for v in (0.0, 1.0, -1.0):
        m = torch.where((m - v).abs() < 1e-12, torch.full_like(m, v), m)
    return m


def apply_affine(x: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """Rotate/scale (one ``grid_sample`` for all samples that need it) and mirror a batch.

    Args:
        x: (B, C, D, H, W) on any device, floating point.
        params: :class:`AffineParams` for B samples (on any device).

    Returns:
        (B, C, D, H, W), same dtype/device. Voxels sampled from outside the input are 0.

    Example:
        >>> x = torch.randn(2, 1, 8, 8, 8)
        >>> torch.equal(apply_affine(x, AffineParams.identity(2)), x)
        True
    """
    if x.dim() != 5:
        raise ValueError(f"x: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    b = x.shape[0]
    if params.angles.shape != (b, 3) or params.scale.shape != (b,) or params.flip.shape != (b, 3):
        got = [tuple(t.shape) for t in (params.angles, params.scale, params.flip)]
        raise ValueError(f"params: expected angles (B, 3), scale (B,), flip (B, 3) with B={b}, got {got}")
    m = sampling_matrices(params)
    moved = ((m - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2)) > 0).nonzero().flatten()
    out = x
    if moved.numel():
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        dev = x.device
        mm = m[moved].to(device=dev, dtype=dt)  # (b', 3, 3)
        size = x.shape[2:]
        # offsets from the patch centre along D, H, W, broadcastable to (b', D, H, W)
        offs = [(torch.arange(n, device=dev, dtype=dt) - (n - 1) / 2).view([1] + [n if a == k else 1
                                                                                for a in range(3)])
                for k, n in enumerate(size)]
        comps = []
        for i in range(3):  # input coordinate i = c_i + sum_j M_ij offset_j; with align_corners the
            # centre maps to 0, so the normalised coordinate is (sum_j M_ij offset_j) * 2 / (n_i - 1)
            g = sum(mm[:, i, j].view(-1, 1, 1, 1) * offs[j] for j in range(3))
            comps.append(g * (2.0 / max(size[i] - 1, 1)))
        grid = torch.stack(comps[::-1], dim=-1)  # grid_sample wants (x, y, z) = (W, H, D)
        idx = moved.to(dev)
        resampled = F.grid_sample(x[idx].to(dt), grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=True).to(x.dtype)
        out = x.clone()
        out[idx] = resampled
    out = mirror(out, params.flip)
    return out


class BatchAugment:
    """Callable augmentation: draw :class:`AffineParams` from a CPU generator and apply them.

    Example:
        >>> aug = BatchAugment()
        >>> y = aug(torch.randn(2, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return apply_affine(x, self.config.sample(x.shape[0], generator))
