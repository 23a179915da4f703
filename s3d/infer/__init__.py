"""Prediction: sliding windows on tensors (:func:`sliding_window_predict`) and NIfTI cases with a model
directory (:func:`predict_folder`, alias :func:`predict`).

- :mod:`~s3d.infer.sliding_window`: :class:`SlidingWindowInferer` (patch, step, Gaussian, mirroring, tile
  batch, device, AMP; fp32 accumulation moving to the CPU when the device is full), shared by
  :func:`predict_folder`, :func:`predict_case` and fine-tuning's validation, and its function form
  :func:`sliding_window_predict`; :mod:`~s3d.infer.tiles`: the tile geometry;
- :mod:`~s3d.infer.inputs`: the cases of an input folder and the checks on their files;
- :mod:`~s3d.infer.cases`: one case, ``{case}_{XXXX}.nii.gz`` in, label map (and probabilities) out;
- :mod:`~s3d.infer.outputs`: a case's outputs written as a pair, temporaries swept;
- :mod:`~s3d.infer.folder`: a whole folder, failures reported in ``OUT/failures.json``.
"""

from s3d.infer.cases import (
    CasePrediction,
    PatchSizeError,
    check_patch_size,
    check_prediction_args,
    load_model_dir,
    predict_case,
    regions_to_labels,
)
from s3d.infer.folder import FAILURES_FILE, BatchPredictionError, PredictionNote, predict_folder
from s3d.infer.inputs import CaseError, CaseFailure, InputScan, check_case_files, find_cases, scan_input_folder
from s3d.infer.outputs import sweep_partial, write_case_outputs
from s3d.infer.sliding_window import SlidingWindowInferer, sliding_window_predict
from s3d.infer.tiles import gaussian_importance_map, mirror_axes_combinations, tile_starts

#: ``s3d.predict``: the folder-level entry point (:func:`predict_folder`).
predict = predict_folder

__all__ = [
    "FAILURES_FILE",
    "BatchPredictionError",
    "CaseError",
    "CaseFailure",
    "CasePrediction",
    "InputScan",
    "PatchSizeError",
    "PredictionNote",
    "SlidingWindowInferer",
    "check_case_files",
    "check_patch_size",
    "check_prediction_args",
    "find_cases",
    "gaussian_importance_map",
    "load_model_dir",
    "mirror_axes_combinations",
    "predict",
    "predict_case",
    "predict_folder",
    "regions_to_labels",
    "scan_input_folder",
    "sliding_window_predict",
    "sweep_partial",
    "tile_starts",
    "write_case_outputs",
]
