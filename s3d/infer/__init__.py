"""Prediction: sliding windows on tensors (:func:`sliding_window_predict`) and NIfTI cases with a model
directory (:func:`predict_folder`, alias :func:`predict`).

- :mod:`~s3d.infer.sliding_window`: Gaussian-weighted overlapping tiles, mirroring, fp32 accumulation;
- :mod:`~s3d.infer.cases`: ``{case}_{XXXX}.nii.gz`` in, label maps (and probabilities) out.
"""

from s3d.infer.cases import CasePrediction, find_cases, load_model_dir, predict_case, predict_folder
from s3d.infer.sliding_window import (
    gaussian_importance_map,
    mirror_axes_combinations,
    sliding_window_predict,
    tile_starts,
)

#: ``s3d.predict``: the folder-level entry point (:func:`predict_folder`).
predict = predict_folder

__all__ = [
    "CasePrediction",
    "find_cases",
    "gaussian_importance_map",
    "load_model_dir",
    "mirror_axes_combinations",
    "predict",
    "predict_case",
    "predict_folder",
    "sliding_window_predict",
    "tile_starts",
]
