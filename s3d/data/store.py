"""Storage of preprocessed pre-training volumes: one file per case, random-access 3D crops.

Two formats, chosen by the file's suffix (``--store b2nd|npy`` at preparation):

- ``.b2nd`` (**default**): a blosc2 NDArray, LZ4 level 5 with byte shuffle, chunks of
  :data:`B2ND_CHUNKS` = 80^3 voxels (half the 160^3 pre-training patch, so the crop grid and the chunk
  grid line up) split into blocks of :data:`B2ND_BLOCKS` = 16^3. A crop decompresses only the blocks
  it touches: at most 11^3 blocks (176^3 voxels) for a 160^3 crop. About 3.2x smaller than ``.npy``
  on the synthetic heads of ``benchmarks/dataloader.py``; a crop costs ~7-20 ms of one core.
- ``.npy``: uncompressed, memory-mapped; a crop copies only its own bytes (~2 ms), no decompression,
  but 3.2x the disk space.

Numbers and the reasons for the default: ``docs/pretraining.md`` ("Storage format"). Both formats are
lossless: a crop of a float32 ``.b2nd`` is bitwise the crop of the same ``.npy``. ``dtype="float16"``
halves either one (z-scored values keep ~3 significant digits).

Arrays are channel-first ``(C, D, H, W)``; crops are given by a start corner and a size in voxels.
A crop that reaches outside the volume is zero-padded (0 is the mean of a z-scored image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3d._fs import atomic_path
from s3d._triple import triple

#: store name -> file suffix
STORE_SUFFIXES = {"b2nd": ".b2nd", "npy": ".npy"}
STORES = tuple(STORE_SUFFIXES)
DEFAULT_STORE = "b2nd"
VOLUME_SUFFIX = STORE_SUFFIXES["npy"]
STORE_DTYPES = ("float32", "float16")
#: blosc2 layout of ``.b2nd`` volumes (voxels per spatial axis; 1 channel per chunk/block)
B2ND_CHUNKS = (80, 80, 80)
B2ND_BLOCKS = (16, 16, 16)
B2ND_CLEVEL = 5


def store_suffix(store: str) -> str:
    """The file suffix of a store name (``"b2nd"`` -> ``".b2nd"``, ``"npy"`` -> ``".npy"``).

    Example:
        >>> store_suffix("b2nd")
        '.b2nd'
    """
    if store not in STORE_SUFFIXES:
        raise ValueError(f"store: expected one of {', '.join(STORES)}, got {store!r}")
    return STORE_SUFFIXES[store]


def _store_of(path: Path) -> str:
    for name, suffix in STORE_SUFFIXES.items():
        if path.name.endswith(suffix):
            return name
    raise ValueError(f"{path}: volumes are stored as {' or '.join(STORE_SUFFIXES.values())}")


def require_blosc2() -> Any:
    """The blosc2 module, imported when the ``.b2nd`` store is used (``import s3d`` works without it); a
    missing package is one line naming it and ``--store npy``."""
    from s3d._optional import optional_import

    return optional_import("blosc2", "the .b2nd store", hint=" (or prepare with --store npy)")


def b2nd_layout(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) of a (C, D, H, W) volume in the ``.b2nd`` store: 1 channel, the
    :data:`B2ND_CHUNKS` / :data:`B2ND_BLOCKS` grid clipped to the volume.

    Example:
        >>> b2nd_layout((1, 180, 220, 40))
        ((1, 80, 80, 40), (1, 16, 16, 16))
    """
    spatial = [int(n) for n in shape[1:]]
    chunks = tuple(min(c, n) for c, n in zip(B2ND_CHUNKS, spatial, strict=True))
    blocks = tuple(min(b, c) for b, c in zip(B2ND_BLOCKS, chunks, strict=True))
    return (1, *chunks), (1, *blocks)


def save_volume(path: str | os.PathLike[str], volume: np.ndarray, dtype: str = "float32") -> Path:
    """Write a (C, D, H, W) volume atomically; the suffix (``.b2nd`` or ``.npy``) picks the store.

    Args:
        path: destination, ending in ``.b2nd`` (compressed, chunked) or ``.npy`` (uncompressed).
        volume: (C, D, H, W) array.
        dtype: stored dtype, ``"float32"`` or ``"float16"``.

    Example:
        >>> save_volume("prep/case.b2nd", np.zeros((1, 8, 8, 8), np.float32))
        PosixPath('prep/case.b2nd')
    """
    path = Path(path)
    store = _store_of(path)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {STORE_DTYPES}, got {dtype!r}")
    if volume.ndim != 4:
        raise ValueError(f"{path}: expected a (C, D, H, W) volume, got shape {volume.shape}")
    data = np.ascontiguousarray(volume, dtype=dtype)
    with atomic_path(path) as tmp:
        if store == "npy":
            with open(tmp, "wb") as f:
                np.save(f, data)
        else:
            blosc2 = require_blosc2()
            chunks, blocks = b2nd_layout(data.shape)
            cparams = {"codec": blosc2.Codec.LZ4, "clevel": B2ND_CLEVEL, "filters": [blosc2.Filter.SHUFFLE],
                       "nthreads": 1}
            tmp.unlink()  # blosc2 refuses to overwrite unless told; start from no file
            blosc2.asarray(data, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)
    return path


def open_volume(path: str | os.PathLike[str]) -> Any:
    """Open a stored volume read-only without reading its voxels (``np.memmap`` or ``blosc2.NDArray``).

    Both support ``volume.shape``, ``volume.dtype`` and basic slicing to a NumPy array; blosc2
    decompresses with one thread (one DataLoader worker = one core).

    Example:
        >>> vol = open_volume("prep/case.b2nd"); vol.shape
        (1, 8, 8, 8)
    """
    path = Path(path)
    store = _store_of(path)
    try:
        if store == "npy":
            vol = np.load(str(path), mmap_mode="r")
        else:
            blosc2 = require_blosc2()
            kwargs = {"mmap_mode": "r"} if os.name != "nt" else {}
            vol = blosc2.open(str(path), mode="r", dparams={"nthreads": 1}, **kwargs)
            if not hasattr(vol, "shape") or not hasattr(vol, "dtype"):
                raise ValueError("not a blosc2 NDArray")
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot open stored volume ({type(e).__name__}: {e})") from e
    if len(vol.shape) != 4:
        raise ValueError(f"{path}: expected a (C, D, H, W) volume, got shape {tuple(vol.shape)}")
    return vol


def read_crop(volume: Any, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Cut ``size`` voxels from corner ``start`` of a (C, D, H, W) volume; outside is zero-padded.

    Only the overlapping region is read from ``volume`` (a memory map stays lazy; a ``.b2nd`` volume
    decompresses only the blocks it touches). ``start`` may be negative and ``start + size`` may
    exceed the volume: those voxels are 0.

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
    src, dst, inside = [], [], True
    for s, n, dim in zip(start, size, volume.shape[1:], strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return np.zeros((volume.shape[0], *size), dtype=np.float32)
        inside = inside and lo == s and hi == s + n
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    region = volume[(slice(None), *src)]
    if inside:  # one copy out of a memory map; a float32 blosc2 slice is already a fresh array
        if isinstance(region, np.memmap) or not region.flags.owndata:
            return np.array(region, dtype=np.float32, order="C")
        return np.ascontiguousarray(region, dtype=np.float32)
    out = np.zeros((volume.shape[0], *size), dtype=np.float32)
    out[(slice(None), *dst)] = region
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
    return triple(out)
