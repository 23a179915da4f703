"""Preprocessing shared by pre-training and fine-tuning: crop to nonzero, z-score, resampling.

Arrays are channel-first ``(C, D, H, W)`` (images) or ``(D, H, W)`` (label maps); spacing is
mm per voxel along (D, H, W). Resampling follows nnU-Net: third-order splines for images,
per-label linear interpolation for label maps, and, for strongly anisotropic images
(max/min spacing > 3), in-plane resampling first and nearest-neighbour along the thick axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
        return tuple(slice(0, n) for n in image.shape[1:])  # type: ignore[return-value]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nz.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)  # type: ignore[return-value]


def crop_to_nonzero(
    image: np.ndarray, seg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, slice, slice]]:
    """Crop (C, D, H, W) ``image`` (and (D, H, W) ``seg``) to the nonzero bounding box of ``image``.

    Returns:
        (cropped image, cropped seg or None, bbox slices in the original voxel grid).
    """
    bbox = nonzero_bbox(image)
    return image[(slice(None), *bbox)], (None if seg is None else seg[bbox]), bbox


def zscore(image: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
    """Normalise each channel of (C, D, H, W) to zero mean, unit std (over ``mask`` if given).

    Raises:
        ValueError: a channel contains NaN/inf or is constant (std < eps); the message names it.
    """
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        ch = image[c].astype(np.float32, copy=False)
        if not np.isfinite(ch).all():
            raise ValueError(f"channel {c} contains NaN or inf")
        vals = ch[mask] if mask is not None else ch
        mean, std = float(vals.mean()), float(vals.std())
        if std < eps:
            raise ValueError(f"channel {c} is constant (std={std:.3g}); cannot z-score")
        out[c] = (ch - mean) / std
    return out


def shape_for_spacing(
    shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float]
) -> tuple[int, int, int]:
    """Voxel shape after resampling ``shape`` from ``spacing_mm`` to ``target_spacing_mm``."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing_mm, target_spacing_mm))  # type: ignore[return-value]


def anisotropic_axis(spacing_mm: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The thick axis when max/min spacing exceeds ``threshold`` (nnU-Net's separate-z rule), else None."""
    sp = np.asarray(spacing_mm, dtype=float)
    if sp.max() / sp.min() > threshold:
        return int(np.argmax(sp))
    return None


def _zoom(volume: np.ndarray, new_shape: Sequence[int], order: int, separate_axis: int | None) -> np.ndarray:
    ndimage = _scipy_ndimage()
    factors = [n / o for n, o in zip(new_shape, volume.shape)]
    if separate_axis is None or order == 0:
        return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    # in-plane with `order`, then nearest along the thick axis
    inplane = [f if a != separate_axis else 1.0 for a, f in enumerate(factors)]
    tmp = ndimage.zoom(volume, inplane, order=order, mode="nearest", grid_mode=True)
    along = [1.0 if a != separate_axis else factors[a] for a in range(3)]
    return ndimage.zoom(tmp, along, order=0, mode="nearest", grid_mode=True)


def resample_image(
    image: np.ndarray,
    new_shape: Sequence[int],
    order: int = 3,
    separate_axis: int | None = None,
) -> np.ndarray:
    """Resample every channel of (C, D, H, W) ``image`` to ``new_shape`` (D', H', W').

    Args:
        order: spline order (3 for images as nnU-Net, 1 linear, 0 nearest).
        separate_axis: thick axis for anisotropic data (see :func:`anisotropic_axis`); resampled
            with nearest neighbour after the in-plane ``order``-spline pass.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(image.shape[1:]) == new_shape:
        return image.astype(np.float32, copy=False)
    return np.stack([_zoom(ch.astype(np.float32, copy=False), new_shape, order, separate_axis)
                     for ch in image]).astype(np.float32, copy=False)


def resample_seg(seg: np.ndarray, new_shape: Sequence[int], separate_axis: int | None = None) -> np.ndarray:
    """Resample a (D, H, W) label map: each label's mask linearly, the label with the largest value wins.

    Background (0) wins where no label reaches 0.5, as in nnU-Net's ``resize_segmentation``.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(seg.shape) == new_shape:
        return seg.copy()
    labels = [int(v) for v in np.unique(seg) if v != 0]
    out = np.zeros(new_shape, dtype=seg.dtype)
    best = np.full(new_shape, 0.5, dtype=np.float32)
    for v in labels:
        p = _zoom((seg == v).astype(np.float32), new_shape, 1, separate_axis)
        win = p >= best
        out[win] = v
        best[win] = p[win]
    return out
