"""nnU-Net v2 raw datasets in: ``dataset.json``, validation, preprocessing with its inverse, a disk cache.

Three steps, one module each:

- :mod:`~s3d.data.nnunet.dataset`: read ``dataset.json`` and check a dataset, listing every problem
  with its file (:func:`read_dataset_json`, :func:`validate_dataset`).
- :mod:`~s3d.data.nnunet.preprocessing`: :class:`PreprocessingSpec` (saved as ``preprocessing.json``
  next to a model) and one case forward (:func:`preprocess_case`: crop to nonzero, z-score, resample
  to 1 mm isotropic) and back (:func:`restore_geometry`).
- :mod:`~s3d.data.nnunet.cache`: every case preprocessed once into ``DATASET/.s3d_cache/<spec-hash>/``
  (:func:`preprocess_dataset`, :func:`load_cached_case`).

Example:
    >>> ds = validate_dataset("Dataset001_Brain")
    >>> cache = preprocess_dataset(ds, PreprocessingSpec.from_dataset(ds))
"""

from s3d.data.nnunet.cache import (
    CACHE_DIR_ENV,
    CACHE_DIR_NAME,
    MAX_LOCATIONS_PER_LABEL,
    cache_dir_for,
    cache_root,
    cached_cases,
    load_cached_case,
    preprocess_dataset,
)
from s3d.data.nnunet.dataset import AFFINE_ATOL_MM, DatasetError, NnUNetDataset, read_dataset_json, validate_dataset
from s3d.data.nnunet.preprocessing import (
    PreprocessingSpec,
    preprocess_case,
    preprocess_training_case,
    restore_geometry,
)

__all__ = [
    "AFFINE_ATOL_MM",
    "CACHE_DIR_ENV",
    "CACHE_DIR_NAME",
    "MAX_LOCATIONS_PER_LABEL",
    "DatasetError",
    "NnUNetDataset",
    "PreprocessingSpec",
    "cache_dir_for",
    "cache_root",
    "cached_cases",
    "load_cached_case",
    "preprocess_case",
    "preprocess_dataset",
    "preprocess_training_case",
    "read_dataset_json",
    "restore_geometry",
    "validate_dataset",
]
