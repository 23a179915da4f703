"""Spatial augmentation: rotation and isotropic scaling (one ``grid_sample``), mirroring (exact flips).

All rotated or scaled samples of a batch go through ONE ``torch.nn.functional.grid_sample`` call for
the images (trilinear, zero padding) on the batch's device, so data-loading workers only cut crops;
label maps are resampled at the same points (each label's one-hot map trilinearly and the largest
wins, as in nnU-Net, or nearest). Voxels are taken as isotropic in index space (nnU-Net does the same).

Convention: an output voxel ``p`` (index, D/H/W order) reads the input at ``M (p - c) + c`` with ``c``
the patch centre and ``M = scale * R^T`` (:func:`sampling_matrices`): a rotation by +90 degrees about
axis 0 equals ``torch.rot90(x, 1, dims=(3, 4))``; a scale > 1 shows more of the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from s3d.augment.params import AugmentParams


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
    first = t.dim() - 3
    dims = [[first - 1 + a for a in range(3) if f[a]] for f in flips.tolist()]  # per sample (dim 0 dropped)
    if all(d == dims[0] for d in dims):
        return torch.flip(t, [d + 1 for d in dims[0]])
    return torch.stack([torch.flip(t[i], d) if d else t[i] for i, d in enumerate(dims)])


def sampling_matrices(params: AugmentParams) -> torch.Tensor:
    """(B, 3, 3) float64 matrices ``M = scale * R^T`` mapping output offsets to input offsets (voxels).

    Entries within 1e-12 of 0 or +-1 are snapped, so multiples of 90 degrees sample exactly on the grid.

    Example:
        >>> sampling_matrices(AugmentParams.identity(1))[0]
        tensor([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]], dtype=torch.float64)
    """
    rot = torch.eye(3, dtype=torch.float64).repeat(params.angles.shape[0], 1, 1)
    for axis in range(3):
        rot = rot @ _axis_rotation(params.angles[:, axis].double(), axis)
    m = rot.transpose(1, 2) * params.scale.double()[:, None, None]
    for v in (0.0, 1.0, -1.0):
        m = torch.where((m - v).abs() < 1e-12, torch.full_like(m, v), m)
    return m


def _sampling_grid(m: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``grid_sample`` grid (b, D, H, W, 3) in (x, y, z) = (W, H, D) order (``align_corners=True``) that
    reads the input at ``M (p - c) + c`` for every output voxel ``p`` (``m``: (b, 3, 3) on the device)."""
    dev, dt = m.device, m.dtype
    # offsets from the patch centre along D, H, W, broadcastable to (b, D, H, W)
    offs = [(torch.arange(n, device=dev, dtype=dt) - (n - 1) / 2).view([1] + [n if a == k else 1 for a in range(3)])
            for k, n in enumerate(size)]
    comps = []
    for i in range(3):  # input coordinate i = c_i + sum_j M_ij offset_j; with align_corners the
        # centre maps to 0, so the normalised coordinate is (sum_j M_ij offset_j) * 2 / (n_i - 1)
        g = sum(m[:, i, j].view(-1, 1, 1, 1) * offs[j] for j in range(3))
        comps.append(g * (2.0 / max(size[i] - 1, 1)))
    return torch.stack(comps[::-1], dim=-1)


def _label_values(labels: torch.Tensor) -> torch.Tensor:
    """The sorted label values present in ``labels`` (a histogram when their range is small, else a sort)."""
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if hi - lo < 1 << 16:
        counts = torch.bincount((labels - lo).flatten(), minlength=hi - lo + 1)
        return counts.nonzero().flatten().to(labels.dtype) + lo
    return torch.unique(labels)


def _resample_labels_linear(labels: torch.Tensor, grid: torch.Tensor, dt: torch.dtype,
                            chunk: int = 8) -> torch.Tensor:
    """Label maps (b, D, H, W) resampled at ``grid`` as nnU-Net (batchgeneratorsv2 0.3.6) does.

    Every label's one-hot map and the outside of the patch (a label of its own, below all others, 1
    outside) are resampled trilinearly; the largest score wins, a tie goes to the nearest voxel's label
    when it is among the tied ones (else to the lowest label), and a voxel won by the outside is 0.
    ``chunk`` labels per ``grid_sample`` call bound the memory.
    """
    values = _label_values(labels).to(torch.int64)
    lo = int(values[0])
    work = labels.to(torch.int64) - (lo - 1)  # the outside is 0, labels 1 .. hi - lo + 1
    # candidate index of each shifted value (0: the outside), and the label each candidate stands for
    lut = torch.zeros(int(values[-1]) - lo + 2, dtype=torch.int64, device=labels.device)
    lut[values - (lo - 1)] = torch.arange(1, values.numel() + 1, device=labels.device)
    cand_label = torch.cat([torch.zeros(1, dtype=torch.int64, device=labels.device), values])
    near = lut[F.grid_sample(work[:, None].to(dt), grid, mode="nearest", padding_mode="zeros",
                             align_corners=True)[:, 0].round().to(torch.int64)]  # nearest voxel (outside: 0)
    best = win = near_score = None
    for start in range(0, values.numel(), chunk):
        shifted = values[start:start + chunk] - (lo - 1)
        maps = (work[:, None] == shifted.view(1, -1, 1, 1, 1)).to(dt)
        if start == 0:  # channel 0: ones, resampled to the share inside; the outside scores 1 - that
            maps = torch.cat([torch.ones_like(maps[:, :1]), maps], dim=1)
        scores = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        first = start + 1
        if start == 0:
            scores[:, 0] = 1 - scores[:, 0]
            first = 0
        top, arg = scores.max(dim=1)  # the first maximum: the lowest label of the chunk on ties
        arg += first
        in_chunk = (near >= first) & (near < first + scores.shape[1])
        mine = scores.gather(1, (near - first).clamp(0, scores.shape[1] - 1)[:, None])[:, 0]
        if best is None:
            best, win, near_score = top, arg, torch.where(in_chunk, mine, -math.inf)
            continue
        better = top > best  # strict: the earlier (lower) labels keep a tie
        best, win = torch.where(better, top, best), torch.where(better, arg, win)
        near_score = torch.where(in_chunk, mine, near_score)
    win = torch.where(near_score == best, near, win)
    return cand_label[win].to(labels.dtype)


def rotate_and_scale(x: torch.Tensor, params: AugmentParams, labels: torch.Tensor | None = None, *,
                     label_interpolation: str = "linear") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate/scale the samples that need it (one ``grid_sample``); images and labels alike.

    Args:
        x: images (B, C, D, H, W), floating point, any device.
        params: the batch's :class:`AugmentParams` (``angles``, ``scale``).
        labels: optional label maps (B, D, H, W), integer, same device: sampled at the same points.
        label_interpolation: ``"linear"``: each label's one-hot map trilinearly, then the label of the
            largest value (nnU-Net's default); ``"nearest"``: the nearest voxel's label.

    Returns:
        ``(x, labels)`` with the same shapes and dtypes. Image voxels sampled from outside the input
        interpolate with zeros. Label voxels are 0 where the outside of the patch outweighs every label
        (``"linear"``: nnU-Net pads the label map with -1 and later sets -1 to 0) or lies nearest
        (``"nearest"``).
    """
    m = sampling_matrices(params)
    moved = ((m - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2)) > 0).nonzero().flatten()
    if not moved.numel():
        return x, labels
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    grid = _sampling_grid(m[moved].to(device=dev, dtype=dt), tuple(x.shape[2:]))
    idx = moved.to(dev)
    x = x.clone()
    x[idx] = F.grid_sample(x[idx].to(dt), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True).to(x.dtype)
    if labels is not None:
        sub = labels[idx]
        if label_interpolation == "linear":
            moved_labels = _resample_labels_linear(sub, grid, dt)
        elif label_interpolation == "nearest":
            moved_labels = F.grid_sample(sub[:, None].to(dt), grid, mode="nearest", padding_mode="zeros",
                                         align_corners=True)[:, 0].round().to(labels.dtype)
        else:
            raise ValueError(f"label_interpolation: 'linear' or 'nearest', got {label_interpolation!r}")
        labels = labels.clone()
        labels[idx] = moved_labels
    return x, labels
