"""NIfTI input/output with nibabel, keeping the geometry (affine, spacing) with the array.

Arrays stay in nibabel's voxel order (i, j, k), which s3d calls (D, H, W); spacing is in mm
per voxel along those axes. No axis is reordered anywhere, so an array read here, processed
and written back with the same affine lines up with the input in any viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s3d._fs import atomic_path
from s3d._optional import optional_import
from s3d._triple import triple

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class ImageHeader:
    """Geometry of a NIfTI file, read without loading its voxels."""

    path: Path
    shape: tuple[int, ...]
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    dtype: np.dtype

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Field of view along each axis, mm (shape times spacing)."""
        return triple(float(n * s) for n, s in zip(self.shape[:3], self.spacing_mm))


def _nibabel(feature: str = "reading NIfTI"):
    """nibabel, imported when NIfTI is read or written (``import s3d`` works without it)."""
    return optional_import("nibabel", feature)


def _load(path: str | os.PathLike[str]):
    nib = _nibabel()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not str(path).endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: not a NIfTI file (expected one of {NIFTI_SUFFIXES})")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Shape, spacing (mm), affine and dtype of a NIfTI file without reading its voxels."""
    img = _load(path)
    zooms = img.header.get_zooms()
    spacing = tuple(float(z) for z in (list(zooms[:3]) + [1.0] * 3)[:3])
    return ImageHeader(Path(path), tuple(int(s) for s in img.shape), spacing,  # type: ignore[arg-type]
                       np.asarray(img.affine, dtype=np.float64), img.get_data_dtype())


def read_nifti(
    path: str | os.PathLike[str], dtype: np.dtype | type | None = np.float32
) -> tuple[np.ndarray, ImageHeader]:
    """Read voxels (as ``dtype``; ``None`` keeps the stored dtype, scaling applied) and geometry.

    Raises ``ValueError`` naming the file if it is corrupt."""
    img = _load(path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # truncated gzip, short file, ...
        raise ValueError(f"{path}: cannot read voxel data ({type(e).__name__}: {e})") from e
    zooms = img.header.get_zooms()
    spacing = tuple(float(z) for z in (list(zooms[:3]) + [1.0] * 3)[:3])
    header = ImageHeader(Path(path), tuple(data.shape), spacing,  # type: ignore[arg-type]
                         np.asarray(img.affine, dtype=np.float64), img.get_data_dtype())
    return data, header


def write_nifti(
    path: str | os.PathLike[str],
    data: np.ndarray,
    affine: np.ndarray,
    like: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``data`` (D, H, W) with ``affine`` to ``path`` atomically.

    Args:
        like: optional NIfTI file whose header (units, descriptions, qform/sform codes) is reused,
            e.g. the input image a prediction belongs to.
    """
    nib = _nibabel("writing NIfTI")
    header = None
    if like is not None:
        header = _load(like).header.copy()
        header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header=header)
    qcode = int(header["qform_code"]) if header is not None else 1
    scode = int(header["sform_code"]) if header is not None else 1
    img.set_qform(affine, code=qcode or 1)
    img.set_sform(affine, code=scode or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def case_id(path: str | os.PathLike[str]) -> str:
    """File name without its NIfTI suffix (``BraTS_001_0000.nii.gz`` -> ``BraTS_001_0000``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
