"""Scan a folder (or a file list / CSV) of MRIs, filter it as the paper does, preprocess it once.

Two steps, both resumable and both recorded in ``manifest.json``:

1. :func:`scan` (:mod:`~s3d.data.scan.headers`) reads headers only (no voxels) and applies the
   filters of :class:`ScanFilters` (paper defaults: field of view >= 50 mm and spacing <= 6.5 mm on
   every axis, file >= 200 kB, T1/T2/FLAIR-like modalities, 4D images rejected or split).
   Unreadable files are reported, never raised; every rejected file records its ``rule``
   (:data:`RULES`).
2. :func:`prepare` (:mod:`~s3d.data.scan.prepared`) preprocesses every accepted image in worker
   processes: crop to nonzero, z-score (NaN/inf or constant images are rejected with the reason),
   resample to 1 mm isotropic (third-order; nnU-Net's separate-axis rule for anisotropic images),
   and stores the result with :func:`s3d.data.store.save_volume`. Finished cases
   (``cases/<id>.b2nd`` + ``cases/<id>.json``) are skipped on a re-run; every file is written atomically.
   ``shard=(i, n)`` prepares one of n disjoint slices; the shard manifests merge into one
   (:mod:`~s3d.data.scan.manifest`). :func:`format_report` counts what was used, per rule and dataset.

Example:
    >>> manifest = prepare("raw_mri/", "prep/", workers=8)
    >>> [e["rule"] for e in manifest["entries"] if e["status"] != "ok"]
    ['fov', 'unreadable', ...]
"""

from s3d.data.scan.headers import (
    DEFAULT_MODALITIES,
    KNOWN_MODALITIES,
    RULES,
    ScanEntry,
    ScanFilters,
    check_header,
    filters_from_dict,
    header_rule,
    list_source,
    scan,
)
from s3d.data.scan.manifest import (
    CASES_DIR,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    merge_shards,
    parse_shard,
    read_manifest,
    shard_of,
    training_cases,
)
from s3d.data.scan.prepared import prepare, preprocess_image
from s3d.data.scan.report import format_report, manifest_report

__all__ = [
    "CASES_DIR",
    "DEFAULT_MODALITIES",
    "KNOWN_MODALITIES",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "RULES",
    "ScanEntry",
    "ScanFilters",
    "check_header",
    "filters_from_dict",
    "format_report",
    "header_rule",
    "list_source",
    "manifest_report",
    "merge_shards",
    "parse_shard",
    "prepare",
    "preprocess_image",
    "read_manifest",
    "scan",
    "shard_of",
    "training_cases",
]
