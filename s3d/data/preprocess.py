"""Preprocessing shared by pre-training and fine-tuning: crop to nonzero, z-score, resampling.

Arrays are channel-first ``(C, D, H, W)`` (images) or ``(D, H, W)`` (label maps); spacing is
mm per voxel along (D, H, W). Resampling follows nnU-Net's defaults (checked against nnunetv2 in
``tests/test_nnunet_parity.py``): third-order splines for images, clipped to the input's range;
label maps by per-label linear interpolation, the label with the largest interpolated indicator
winning; for strongly anisotropic spacing (max/min > 3, one thick axis) images and labels are
resampled slice by slice in-plane, then with nearest neighbour along the thick axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from s3d._triple import triple

ANISOTROPY_THRESHOLD = 3.0


def _scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('resampling needs scipy: pip install "s3d[scipy]"') from e
    return ndimage


def nonzero_bbox(image: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box (slices over D, H, W) of voxels that are nonzero in any channel of (C, D, H, W)."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W), got shape {image.shape}")
    nz = np.any(image != 0, axis=0)
    if not nz.any():
        return triple(slice(0, n) for n in image.shape[1:])
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nz.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return triple(out)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """(D, H, W) bool: voxels nonzero in any channel of (C, D, H, W), holes filled (nnU-Net's nonzero mask).

    Example:
        >>> nonzero_mask(np.pad(np.ones((1, 3, 3, 3)), ((0, 0), (1, 1), (1, 1), (1, 1)))).sum()
        27
    """
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W), got shape {image.shape}")
    return _scipy_ndimage().binary_fill_holes(np.any(image != 0, axis=0))


def crop_to_nonzero(
    image: np.ndarray, seg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, slice, slice]]:
    """Crop (C, D, H, W) ``image`` (and (D, H, W) ``seg``) to the nonzero bounding box of ``image``.

    Returns:
        (cropped image, cropped seg or None, bbox slices in the original voxel grid).
    """
    bbox = nonzero_bbox(image)
    return image[(slice(None), *bbox)], (None if seg is None else seg[bbox]), bbox


def zscore(image: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-8,
           constant: str = "error") -> np.ndarray:
    """Normalise each channel of (C, D, H, W) to zero mean, unit std.

    Args:
        mask: optional (D, H, W) bool; statistics over it only, voxels outside it set to 0 (nnU-Net's
            ``use_mask_for_norm``, with :func:`nonzero_mask`).
        constant: what to do with a constant channel, see below.

    A channel is constant when all its values (over ``mask``) are equal, or its std is below ``eps``.
    ``constant="error"`` raises for it; ``constant="zero"`` sets it to 0 (the z-scored mean; it carries
    no information), as prediction does (``docs/prediction.md``).

    Raises:
        ValueError: a channel contains NaN/inf, or is constant with ``constant="error"``; the message
            names it.
    """
    if constant not in ("error", "zero"):
        raise ValueError(f"constant must be 'error' or 'zero', got {constant!r}")
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        ch = image[c].astype(np.float32, copy=False)
        if not np.isfinite(ch).all():
            raise ValueError(f"channel {c} contains NaN or inf")
        vals = ch[mask] if mask is not None else ch
        # exact test first: float32 rounding gives a constant channel a std of ~1e-7 * value, and
        # dividing by that would turn rounding noise into +-1
        const = vals.size == 0 or bool(vals.max() == vals.min())
        mean, std = (0.0, 0.0) if const else (float(vals.mean()), float(vals.std()))
        if const or std < eps:
            if constant == "error":
                value = f"value {float(vals.min()):.6g}" if vals.size else "no voxels"
                raise ValueError(f"channel {c} is constant ({value}); cannot z-score")
            out[c] = 0.0
            continue
        out[c] = (ch - mean) / std
        if mask is not None:
            out[c][~mask] = 0.0
    return out


def shape_for_spacing(
    shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float]
) -> tuple[int, int, int]:
    """Voxel shape after resampling ``shape`` from ``spacing_mm`` to ``target_spacing_mm``."""
    return triple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing_mm, target_spacing_mm))


def anisotropic_axis(
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float] | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """The thick axis to resample separately, or None (nnU-Net's separate-z rule).

    The source spacing decides first, then the target spacing: the first of the two whose max/min
    exceeds ``threshold`` gives the axis of its largest spacing, and None when two axes share that
    largest spacing (e.g. (4, 4, 1) mm).

    Example:
        >>> anisotropic_axis((0.5, 0.5, 4.0)), anisotropic_axis((4.0, 4.0, 1.0)), anisotropic_axis((1, 1, 1), (1, 1, 5))
        (2, None, 2)
    """
    for sp in (spacing_mm, target_spacing_mm):
        if sp is None:
            continue
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            thick = np.flatnonzero(sp == sp.max())
            return int(thick[0]) if len(thick) == 1 else None
    return None


def _zoom(volume: np.ndarray, new_shape: Sequence[int], order: int, separate_axis: int | None) -> np.ndarray:
    """``volume`` (D, H, W) to ``new_shape``: ``order`` splines on voxel centres, clipped to the input range.

    With ``separate_axis``: each slice along it in-plane (clipped to that slice's range), then nearest
    neighbour along it.
    """
    ndimage = _scipy_ndimage()
    new_shape = tuple(int(n) for n in new_shape)
    if separate_axis is None or order == 0:
        out = ndimage.zoom(volume, [n / o for n, o in zip(new_shape, volume.shape)], order=order,
                           mode="nearest", grid_mode=True)
        if order > 0:
            np.clip(out, volume.min(), volume.max(), out=out)
        return out
    slices = np.moveaxis(volume, separate_axis, 0)
    inplane = [n for a, n in enumerate(new_shape) if a != separate_axis]
    factors = [n / o for n, o in zip(inplane, slices.shape[1:])]
    tmp = np.empty((slices.shape[0], *inplane), dtype=volume.dtype)
    for i, sl in enumerate(slices):
        tmp[i] = ndimage.zoom(sl, factors, order=order, mode="nearest", grid_mode=True)
        np.clip(tmp[i], sl.min(), sl.max(), out=tmp[i])
    tmp = np.moveaxis(tmp, 0, separate_axis)
    if tmp.shape[separate_axis] == new_shape[separate_axis]:
        return tmp
    return ndimage.zoom(tmp, [n / o for n, o in zip(new_shape, tmp.shape)], order=0, mode="nearest", grid_mode=True)


def resample_image(
    image: np.ndarray,
    new_shape: Sequence[int],
    order: int = 3,
    separate_axis: int | None = None,
) -> np.ndarray:
    """Resample every channel of (C, D, H, W) ``image`` to ``new_shape`` (D', H', W').

    Args:
        order: spline order (3 for images as nnU-Net, 1 linear, 0 nearest); the output is clipped to
            the input's range (per slice along ``separate_axis``), as skimage's ``resize`` in nnU-Net.
        separate_axis: thick axis for anisotropic data (see :func:`anisotropic_axis`): slices along it
            are resampled in-plane with ``order``, then nearest neighbour along it.

    Example:
        >>> resample_image(np.zeros((1, 10, 10, 4), np.float32), (20, 20, 16), separate_axis=2).shape
        (1, 20, 20, 16)
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(image.shape[1:]) == new_shape:
        return image.astype(np.float32, copy=False)
    return np.stack([_zoom(ch.astype(np.float32, copy=False), new_shape, order, separate_axis)
                     for ch in image]).astype(np.float32, copy=False)


def resample_seg(seg: np.ndarray, new_shape: Sequence[int], separate_axis: int | None = None) -> np.ndarray:
    """Resample a (D, H, W) label map: each label's indicator linearly (float64), the largest wins.

    Every label competes, background included. Exact ties (e.g. a voxel centred between two labels)
    go to the nearest-neighbour label when it is one of the tied, else to the smallest tied label:
    batchgenerators' ``resize_segmentation`` (>= 0.25.4, ``seg_tiebreak="nearest"``), which nnU-Net uses.

    Example:
        >>> resample_seg(np.array([[[0, 1, 1, 2]]]), (1, 1, 8))[0, 0].tolist()
        [0, 0, 1, 1, 1, 1, 2, 2]
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(seg.shape) == new_shape:
        return seg.copy()
    labels = np.unique(seg)
    nearest = _zoom(seg, new_shape, 0, None)
    if len(labels) == 1:
        return nearest
    out = np.full(new_shape, labels[0], dtype=seg.dtype)
    best = np.full(new_shape, -1.0)
    nearest_score = np.zeros(new_shape)
    for v in labels:  # ascending, and a strict '>': the smallest label keeps a tie
        score = _zoom((seg == v).astype(np.float64), new_shape, 1, separate_axis)
        win = score > best
        out[win] = v
        best[win] = score[win]
        is_nn = nearest == v
        nearest_score[is_nn] = score[is_nn]
    nn_tied = (nearest_score == best) & (nearest_score > 0)
    out[nn_tied] = nearest[nn_tied]
    return out
