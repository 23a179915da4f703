"""Scan a folder (or a file list / CSV) of MRIs, filter it as the paper does, preprocess it once.

Two steps, both resumable and both recorded in ``manifest.json``:

1. :func:`scan` (:mod:`~s3d.data.scan.headers`) reads headers only (no voxels) and applies the
   filters of :class:`ScanFilters` (paper defaults: field of view >= 50 mm and spacing <= 6.5 mm on
   every axis, file >= 200 kB, T1/T2/FLAIR-like modalities, 4D images rejected or split).
   Unreadable files are reported, never raised.
2. :func:`prepare` (:mod:`~s3d.data.scan.prepared`) preprocesses every accepted image in worker
   processes: crop to nonzero, z-score (NaN/inf or constant images are rejected with the reason),
   resample to 1 mm isotropic (third-order; nnU-Net's separate-axis rule for anisotropic images),
   and stores the result with :func:`s3d.data.store.save_volume`. Finished cases
   (``cases/<id>.npy`` + ``cases/<id>.json``) are skipped on a re-run; every file is written atomically.

Example:
    >>> manifest = prepare("raw_mri/", "prep/", workers=8)
    >>> [e["reason"] for e in manifest["entries"] if e["status"] != "ok"]
    ['field of view 40.0 mm < 50.0 mm on axis 2', ...]
"""

from s3d.data.scan.headers import (
    DEFAULT_MODALITIES,
    KNOWN_MODALITIES,
    ScanEntry,
    ScanFilters,
    check_header,
    filters_from_dict,
    scan,
)
from s3d.data.scan.prepared import (
    CASES_DIR,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    prepare,
    preprocess_image,
    read_manifest,
    training_cases,
)

__all__ = [
    "CASES_DIR",
    "DEFAULT_MODALITIES",
    "KNOWN_MODALITIES",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ScanEntry",
    "ScanFilters",
    "check_header",
    "filters_from_dict",
    "prepare",
    "preprocess_image",
    "read_manifest",
    "scan",
    "training_cases",
]
