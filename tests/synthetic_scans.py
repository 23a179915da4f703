"""A small BIDS-like archive of synthetic T1 volumes for the pre-training tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def write_t1_archive(root: Path, shapes: Sequence[tuple[int, int, int]], seed: int = 0) -> Path:
    """Write ``root/sub-XX/anat/sub-XX_T1w.nii.gz``, one per shape: gamma noise inside a 2-voxel zero border."""
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(shapes):
        d = np.zeros(shape, np.float32)
        d[2:-2, 2:-2, 2:-2] = rng.gamma(2.0, 50.0, [n - 4 for n in shape])
        p = root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz"
        p.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(d, np.eye(4)), str(p))
    return root


#: the five small volumes most pre-training tests prepare (voxels, 1 mm)
SMALL_SHAPES = ((44, 40, 42), (36, 38, 40), (30, 48, 40), (40, 40, 40), (34, 36, 38))


def prepare_t1_archive(raw: Path, out: Path, shapes: Sequence[tuple[int, int, int]] = SMALL_SHAPES) -> Path:
    """Write :func:`write_t1_archive` into ``raw`` and prepare it into ``out`` (no file-size filter, 20 mm
    minimum field of view, in this process); return ``out``."""
    from s3d.data.scan import ScanFilters, prepare

    write_t1_archive(raw, shapes)
    prepare(raw, out, ScanFilters(min_file_bytes=0, min_fov_mm=20.0), workers=0, progress=False)
    return out
