"""NIfTI in, NIfTI out: predict one nnU-Net-style case with a model directory.

:func:`predict_case` (and :func:`~s3d.infer.folder.predict_folder`, alias ``s3d.predict``, for a
folder) reads one case's NIfTI files (``{case}_{XXXX}.nii.gz``, one file per channel), preprocesses
them with the model directory's ``preprocessing.json``, predicts
(:func:`~s3d.infer.sliding_window_predict`), brings the result back to the input's voxel grid and
writes a label map with the input's affine and header (optionally the probabilities as ``.npz``).

Axis convention: spatial axes (D, H, W) are nibabel's voxel axes (i, j, k), as in :mod:`s3d.data.io`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s3d._triple import triple
from s3d.infer.inputs import CaseError, check_case_files
from s3d.infer.sliding_window import Model, sliding_window_predict


@dataclass
class CasePrediction:
    """Result of :func:`predict_case` in the input's voxel grid.

    Attributes:
        labels: (D, H, W) label values (the argmax class, which is the label value; with regions the
            label that ``regions_class_order`` paints last).
        probabilities: (K, D, H, W) float32 class probabilities (softmax), or (R, D, H, W) region
            probabilities (sigmoid) for a region model.
        affine: the input's 4x4 voxel-to-world affine (mm).
        notes: what was done under a documented policy, e.g. a constant channel set to 0.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    notes: list[str] = field(default_factory=list)


class PatchSizeError(ValueError):
    """A patch size the network cannot take; the message names where it came from and sizes that work."""


def load_model_dir(model_dir: str | os.PathLike[str], device: torch.device | str = "cpu"):
    """Load a model directory: the network (``model.safetensors`` + ``config.json``) and its
    ``preprocessing.json``.

    Returns:
        ``(model in eval mode on device, PreprocessingSpec)``.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable file, or a network whose input channels or
            outputs disagree with ``preprocessing.json`` (the message names the files).

    Example:
        >>> model, spec = load_model_dir("runs/Dataset001/model")
    """
    from s3d.data.nnunet import PreprocessingSpec
    from s3d.hub import load_pretrained

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found (expected model.safetensors, "
                                "config.json and preprocessing.json)")
    try:
        spec = PreprocessingSpec.load(model_dir / "preprocessing.json")
    except OSError as e:  # unreadable (permissions, a folder...)
        raise OSError(f"{model_dir / 'preprocessing.json'}: cannot read ({e.strerror or e})") from None
    model = load_pretrained(model_dir, in_channels=None, num_classes=None, device=device)
    cfg = model.config
    if cfg.in_channels != len(spec.channel_names) or cfg.num_classes != spec.num_classes:
        outputs = (f"{len(spec.regions)} region(s) {spec.regions}" if spec.has_regions
                   else f"labels {spec.labels} ({spec.num_classes} classes)")
        raise ValueError(
            f"{model_dir}: the network takes {cfg.in_channels} channel(s) and predicts {cfg.num_classes} "
            f"output(s) (config.json), but preprocessing.json lists {len(spec.channel_names)} channel(s) "
            f"{spec.channel_names} and {outputs}")
    model.deep_supervision = False
    return model.eval(), spec


def check_patch_size(patch_size: Sequence[int] | None, model: Model, source: str = "patch_size"
                     ) -> tuple[int, int, int]:
    """The tile size (D, H, W) voxels if the network can take it, else :class:`PatchSizeError`.

    Args:
        patch_size: three sizes in voxels (``None``: an error saying where to set one).
        model: a ResEnc U-Net takes multiples of its ``config.total_stride``, a Primus exactly its
            ``config.input_shape``; any other callable is checked only for positive sizes.
        source: what the user calls the size in the message (``"--patch-size"``, ``"patch_size"``).

    Example:
        >>> check_patch_size((48, 32, 32), s3d.build_resenc_unet("tiny"))
        Traceback (most recent call last):
        PatchSizeError: patch_size (48, 32, 32): ... (axis 0: 48 -> 32 or 64)
    """
    from s3d.nn.config import ResEncUNetConfig
    from s3d.nn.family import patch_problem
    from s3d.nn.primus import PrimusConfig

    if patch_size is None:
        raise PatchSizeError(f"{source}: none given and preprocessing.json has patch_size null; "
                             "pass one (D, H, W voxels)")
    sizes = tuple(int(v) for v in patch_size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise PatchSizeError(f"{source} {tuple(patch_size)}: expected three sizes >= 1 (D, H, W voxels)")
    config = getattr(model, "config", None)
    if isinstance(config, ResEncUNetConfig | PrimusConfig):
        problem = patch_problem(config, sizes)
        if problem:
            raise PatchSizeError(f"{source} {sizes}: not a tile size the network takes: {problem}")
    return triple(sizes)


def regions_to_labels(probabilities: np.ndarray, regions_class_order: Sequence[int]) -> np.ndarray:
    """Label map of region probabilities, nnU-Net's rule: start at 0, then for each region ``i`` in
    order, label ``regions_class_order[i]`` wherever its probability is above 0.5 (later regions win).

    Args:
        probabilities: (R, D, H, W) sigmoid outputs, one per region.
        regions_class_order: R label values.

    Example:
        >>> regions_to_labels(np.array([[[[0.9, 0.9]]], [[[0.2, 0.7]]]]), [1, 2])[0, 0]
        array([1, 2], dtype=uint8)
    """
    order = [int(c) for c in regions_class_order]
    if probabilities.shape[0] != len(order):
        raise ValueError(f"probabilities: {probabilities.shape[0]} region channel(s), but regions_class_order "
                         f"has {len(order)} label(s) {order}")
    labels = np.zeros(probabilities.shape[1:], dtype=np.uint8 if max(order, default=0) < 256 else np.uint16)
    for i, c in enumerate(order):
        labels[probabilities[i] > 0.5] = c
    return labels


def predict_case(
    image_paths: Sequence[str | os.PathLike[str]],
    model: Model,
    spec: Any,
    *,
    patch_size: Sequence[int] | None = None,
    output_path: str | os.PathLike[str] | None = None,
    probabilities_path: str | os.PathLike[str] | None = None,
    step: float = 0.5,
    mirror: bool | Sequence[int] = True,
    tile_batch: int = 4,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str = "auto",
    accumulate_limit_bytes: int | None = None,
    amp: str | torch.dtype | None = "off",
    progress: bool = False,
) -> CasePrediction:
    """Predict one case: check, preprocess, sliding window, back to the input grid, optionally write files.

    Steps: :func:`~s3d.infer.inputs.check_case_files` (headers) ->
    :func:`s3d.data.nnunet.preprocess_case` (crop to nonzero, z-score; a constant channel becomes 0,
    with a note; resample to ``spec.target_spacing_mm``) -> :func:`sliding_window_predict` (mirrored
    over all three axes by default) -> softmax, or sigmoid for a region model ->
    :func:`s3d.data.nnunet.restore_geometry` (probabilities resampled linearly to the input's voxel
    grid; background outside the crop) -> argmax, or :func:`regions_to_labels`.

    Args:
        image_paths: one NIfTI file per channel, in ``spec.channel_names`` order.
        model: the network (``model(x)`` -> logits (N, K, d, h, w)), in eval mode.
        spec: the :class:`~s3d.data.nnunet.PreprocessingSpec` the model was trained with.
        patch_size: tile size (voxels); default ``spec.patch_size``.
        output_path: write the label map here (NIfTI, the first channel's affine and header).
        probabilities_path: write ``probabilities`` (K, D, H, W) float32 and ``labels`` (the label
            values of the K channels) here as ``.npz``; written as a pair with ``output_path``.
        mirror: mirroring test-time augmentation: ``True`` (all three axes, as nnU-Net), ``False``, or axes.
        step: as in :func:`sliding_window_predict`.
        tile_batch: as in :func:`sliding_window_predict`.
        device: as in :func:`sliding_window_predict`.
        accumulate_device: as in :func:`sliding_window_predict`.
        accumulate_limit_bytes: as in :func:`sliding_window_predict`.
        amp: as in :func:`sliding_window_predict`.
        progress: as in :func:`sliding_window_predict`.

    Returns:
        :class:`CasePrediction` in the input's voxel grid.

    Raises:
        CaseError / ValueError: an input file that cannot be used (the message names it), or no patch size.

    Example:
        >>> model, spec = load_model_dir("model")
        >>> pred = predict_case(["ct_001_0000.nii.gz"], model, spec, output_path="out/ct_001.nii.gz")
        >>> pred.labels.shape   # the input's (D, H, W)
    """
    from s3d.data.nnunet import preprocess_case, restore_geometry
    from s3d.infer.outputs import write_case_outputs

    if not image_paths:
        raise ValueError("image_paths: need at least one channel file")
    headers = check_case_files(image_paths)
    patch = check_patch_size(patch_size if patch_size is not None else spec.patch_size, model)
    image, props = preprocess_case(image_paths, spec, constant_channels="zero")
    notes = [f"channel {c} ({spec.channel_names[c]}, {Path(image_paths[c]).name}) is constant inside the "
             "nonzero crop: set to 0 (the z-scored mean) instead of z-scored" for c in props["constant_channels"]]
    try:
        logits = sliding_window_predict(
            model, torch.from_numpy(image), patch, step=step, mirror=mirror, tile_batch=tile_batch,
            device=device, accumulate_device=accumulate_device, accumulate_limit_bytes=accumulate_limit_bytes,
            amp=amp, output="logits", progress=progress)
    except ValueError as e:
        raise CaseError(image_paths[0], f"after resampling to {spec.target_spacing_mm} mm: {e}") from e
    regions = spec.has_regions
    probs = torch.sigmoid(logits) if regions else torch.softmax(logits, dim=0)
    probabilities = restore_geometry(probs.cpu().numpy(), props)
    if regions:  # restore_geometry fills outside the crop with class-0 probability 1; regions are 0 there
        outside = np.ones(probabilities.shape[1:], dtype=bool)
        outside[tuple(slice(a, b) for a, b in props["bbox"])] = False
        probabilities[0][outside] = 0.0
        labels = regions_to_labels(probabilities, spec.regions_class_order)
        label_values = np.asarray(spec.regions_class_order, dtype=np.int64)
    else:
        num_classes = probabilities.shape[0]
        labels = np.argmax(probabilities, axis=0).astype(np.uint8 if num_classes <= 256 else np.int16)
        label_values = np.arange(num_classes, dtype=np.int64)
    affine = np.asarray(headers[0].affine, dtype=np.float64)
    arrays = {"probabilities": probabilities.astype(np.float32, copy=False), "labels": label_values,
              "regions": np.asarray(regions)}
    if output_path is not None:
        write_case_outputs(output_path, labels, affine, like=image_paths[0], probabilities_path=probabilities_path,
                           probabilities=arrays if probabilities_path is not None else None)
    elif probabilities_path is not None:
        from s3d._fs import atomic_path

        with atomic_path(probabilities_path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return CasePrediction(labels, probabilities, affine, notes)


