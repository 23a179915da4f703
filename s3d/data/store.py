"""Storage of preprocessed pre-training volumes: one uncompressed ``.npy`` per case, read by memory map.

Why this format (measured, see ``docs/pretraining.md``): a 160^3 crop of a memory-mapped ``.npy``
touches only the bytes of that crop (160 x 160 contiguous runs of 640 bytes per channel), so it
costs no decompression and no new dependency; blosc2 (nnU-Net's choice) saves disk space at the
price of decompressing whole chunks and an extra package. ``dtype="float16"`` halves the disk
space (z-scored values keep ~3 significant digits) when space matters more than precision.

Arrays are channel-first ``(C, D, H, W)``; crops are given by a start corner and a size in voxels.
A crop that reaches outside the volume is zero-padded (0 is the mean of a z-scored image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from s3d._fs import atomic_path

VOLUME_SUFFIX = ".npy"
STORE_DTYPES = ("float32", "float16")


def save_volume(path: str | os.PathLike[str], volume: np.ndarray, dtype: str = "float32") -> Path:
    """Write a (C, D, H, W) volume as an uncompressed ``.npy`` atomically.

    Args:
        path: destination, ending in ``.npy``.
        volume: (C, D, H, W) array.
        dtype: stored dtype, ``"float32"`` or ``"float16"``.

    Example:
        >>> save_volume("prep/case.npy", np.zeros((1, 8, 8, 8), np.float32))
        PosixPath('prep/case.npy')
    """
    path = Path(path)
    if path.suffix != VOLUME_SUFFIX:
        raise ValueError(f"{path}: volumes are stored as {VOLUME_SUFFIX}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {STORE_DTYPES}, got {dtype!r}")
    if volume.ndim != 4:
        raise ValueError(f"{path}: expected a (C, D, H, W) volume, got shape {volume.shape}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(volume, dtype=dtype))
    return path


def open_volume(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a stored volume read-only; nothing is read until it is indexed.

    Example:
        >>> vol = open_volume("prep/case.npy"); vol.shape
        (1, 8, 8, 8)
    """
    try:
        vol = np.load(str(path), mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot open stored volume ({type(e).__name__}: {e})") from e
    if vol.ndim != 4:
        raise ValueError(f"{path}: expected a (C, D, H, W) volume, got shape {vol.shape}")
    return vol


def read_crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Cut ``size`` voxels from corner ``start`` of a (C, D, H, W) volume; outside is zero-padded.

    Only the overlapping region is read from ``volume`` (a memory map stays lazy). ``start`` may be
    negative and ``start + size`` may exceed the volume: those voxels are 0.

    Returns:
        float32 array (C, *size).

    Example:
        >>> read_crop(np.ones((1, 4, 4, 4)), (-1, 0, 0), (2, 2, 2))[0, :, 0, 0]
        array([0., 1.], dtype=float32)
    """
    start = [int(s) for s in start]
    size = [int(s) for s in size]
    if len(start) != 3 or len(size) != 3:
        raise ValueError(f"start and size must have 3 entries (D, H, W), got {start}, {size}")
    out = np.zeros((volume.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for s, n, dim in zip(start, size, volume.shape[1:], strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def random_crop_start(
    shape: Sequence[int], size: Sequence[int], rng: np.random.Generator
) -> tuple[int, int, int]:
    """A uniformly random crop corner: inside the volume where it is larger than the crop, else
    a random placement of the volume inside the (padded) crop.

    For a dimension of ``n`` voxels and crop ``p``: ``start ~ U{0..n-p}`` if ``n >= p``, else
    ``start ~ U{n-p..0}`` (negative: the crop is padded on both sides by a random split).

    Example:
        >>> random_crop_start((200, 100, 160), (160, 160, 160), np.random.default_rng(0))
        (..., ..., 0)
    """
    out = []
    for n, p in zip(shape, size, strict=True):
        lo, hi = (0, n - p) if n >= p else (n - p, 0)
        out.append(int(rng.integers(lo, hi + 1)))
    return tuple(out)  # type: ignore[return-value]
