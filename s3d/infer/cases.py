"""NIfTI in, NIfTI out: predict one nnU-Net-style case with a model directory.

:func:`predict_case` (and :func:`~s3d.infer.folder.predict_folder`, alias ``s3d.predict``, for a
folder) reads one case's NIfTI files (``{case}_{XXXX}.nii.gz``, one file per channel), preprocesses
them with the model directory's ``preprocessing.json``, predicts
(:class:`~s3d.infer.SlidingWindowInferer`), brings the result back to the input's voxel grid and
writes a label map with the input's affine and header (optionally the probabilities as ``.npz``).

Axis convention: spatial axes (D, H, W) are nibabel's voxel axes (i, j, k), as in :mod:`s3d.data.io`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s3d._triple import triple
from s3d.infer.inputs import CaseError, check_case_files
from s3d.infer.sliding_window import Model, SlidingWindowInferer


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


def load_model_dir(model_dir: str | os.PathLike[str],
                   device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any]:
    """Load a model directory: the network (``model.safetensors`` + ``config.json``) and its
    ``preprocessing.json``.

    The folder is checked as a whole before it is used: ``config.json`` must describe the tensors of
    ``model.safetensors`` (no fresh head or stem is ever built for prediction), the weights must be
    finite, ``preprocessing.json`` must be valid (nnU-Net's label rules, a known ``file_ending``) and
    name as many channels and outputs as the network has.

    Returns:
        ``(model in eval mode on device, PreprocessingSpec)``.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError / s3d.hub.CheckpointError: a missing or
            unreadable file, weights that do not fit ``config.json``, or a network whose input channels
            or outputs disagree with ``preprocessing.json`` (the message names the files).

    Example:
        >>> model, spec = load_model_dir("runs/Dataset001/model")
    """
    from s3d.data.nnunet import PreprocessingSpec
    from s3d.hub import load_pretrained

    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise NotADirectoryError(f"{model_dir}: a file, not a model directory; pass the folder that holds "
                                 f"model.safetensors, config.json and preprocessing.json ({model_dir.parent}?)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found (expected model.safetensors, "
                                "config.json and preprocessing.json)")
    try:
        spec = PreprocessingSpec.load(model_dir / "preprocessing.json")
    except OSError as e:  # unreadable (permissions, a folder...)
        raise OSError(f"{model_dir / 'preprocessing.json'}: cannot read ({e.strerror or e})") from None
    # strict: every tensor from the file, the config checked against the weights (s3d.hub), no adaptation
    model = load_pretrained(model_dir, in_channels=None, num_classes=None, device=device, strict=True)
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


def check_prediction_args(
    *,
    step: float = 0.5,
    mirror: bool | Sequence[int] = True,
    tile_batch: int = 4,
    amp: str | torch.dtype | None = "off",
    device: torch.device | str | None = "auto",
    accumulate_device: torch.device | str = "auto",
    accumulate_limit_bytes: int | None = None,
    patch_size: Sequence[int] | None = None,
) -> None:
    """Check the arguments of a prediction before any case is read (see :func:`~s3d.infer.predict_folder`).

    Raises:
        s3d._paths.UsageError: naming the argument, the value and what it may be.

    Example:
        >>> check_prediction_args(step=0)
        Traceback (most recent call last):
        s3d._paths.UsageError: step (--step) must be in (0, 1] (a fraction of the patch), got 0
    """
    import math
    import numbers

    from s3d._paths import UsageError
    from s3d.infer.sliding_window import mirror_axes_combinations
    from s3d.runtime.device import resolve_amp, resolve_device

    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not (math.isfinite(step) and 0 < step <= 1):
        raise UsageError(f"step (--step) must be in (0, 1] (a fraction of the patch), got {step!r}")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, numbers.Integral) or tile_batch < 1:
        raise UsageError(f"tile_batch (--tile-batch) must be a whole number >= 1, got {tile_batch!r}")
    if accumulate_limit_bytes is not None and (not isinstance(accumulate_limit_bytes, numbers.Integral)
                                               or accumulate_limit_bytes < 0):
        raise UsageError(f"accumulate_limit_bytes must be >= 0 or None, got {accumulate_limit_bytes!r}")
    if patch_size is not None:
        try:
            sizes = [int(v) for v in patch_size]
        except (TypeError, ValueError):
            sizes = []
        if len(sizes) != 3 or min(sizes) < 1:
            raise UsageError(f"patch_size (--patch-size) {patch_size!r}: expected three sizes >= 1 (D, H, W voxels)")
    if mirror is not True and mirror is not False:
        try:
            mirror_axes_combinations(tuple(mirror))
        except (TypeError, ValueError) as e:
            raise UsageError(f"mirror: {e}") from None
    try:
        dev = resolve_device(device)
        if accumulate_device != "auto":
            resolve_device(accumulate_device)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # bf16 on the CPU: said again when it is used
            resolve_amp(amp, dev)
    except ValueError as e:
        raise UsageError(str(e)) from None


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
    inferer: SlidingWindowInferer | None = None,
    patch_size: Sequence[int] | None = None,
    output_path: str | os.PathLike[str] | None = None,
    probabilities_path: str | os.PathLike[str] | None = None,
    **options: Any,
) -> CasePrediction:
    """Predict one case: check, preprocess, sliding window, back to the input grid, optionally write files.

    Steps: :func:`~s3d.infer.inputs.check_case_files` (headers) ->
    :func:`s3d.data.nnunet.preprocess_case` (crop to nonzero, z-score; a constant channel becomes 0,
    with a note; resample to ``spec.target_spacing_mm``) -> the :class:`SlidingWindowInferer` (mirrored
    over all three axes by default) -> softmax, or sigmoid for a region model ->
    :func:`s3d.data.nnunet.restore_geometry` (probabilities resampled linearly to the input's voxel
    grid; background outside the crop) -> argmax, or :func:`regions_to_labels`.

    Args:
        image_paths: one NIfTI file per channel, in ``spec.channel_names`` order.
        model: the network (``model(x)`` -> logits (N, K, d, h, w)), in eval mode.
        spec: the :class:`~s3d.data.nnunet.PreprocessingSpec` the model was trained with.
        inferer: how to predict (its ``output`` is ignored: the logits are used); ``None``: a
            :class:`SlidingWindowInferer` of ``patch_size`` and ``options``.
        patch_size: tile size (voxels) when no ``inferer`` is given; default ``spec.patch_size``.
        output_path: write the label map here (NIfTI, the first channel's affine and header).
        probabilities_path: write ``probabilities`` (K, D, H, W) float32 and ``labels`` (the label
            values of the K channels) here as ``.npz``; written as a pair with ``output_path``.
        **options: :class:`SlidingWindowInferer` settings when no ``inferer`` is given (``step``, ``mirror``,
            ``tile_batch``, ``device``, ``accumulate_device``, ``accumulate_limit_bytes``, ``amp``,
            ``progress``); ``mirror`` defaults to ``True`` here (all three axes, as nnU-Net).

    Returns:
        :class:`CasePrediction` in the input's voxel grid.

    Raises:
        CaseError / ValueError: an input file that cannot be used (the message names it), or no patch size.
        TypeError: both an ``inferer`` and ``patch_size`` or ``options``.

    Example:
        >>> model, spec = load_model_dir("model")
        >>> pred = predict_case(["ct_001_0000.nii.gz"], model, spec, output_path="out/ct_001.nii.gz")
        >>> pred.labels.shape   # the input's (D, H, W)
    """
    from s3d.data.nnunet import preprocess_case, restore_geometry
    from s3d.infer.outputs import write_case_outputs

    if not image_paths:
        raise ValueError("image_paths: need at least one channel file")
    if inferer is not None and (patch_size is not None or options):
        raise TypeError(f"predict_case: give an inferer or its settings, not both (got inferer and "
                        f"{sorted([*options, *(['patch_size'] if patch_size is not None else [])])})")
    headers = check_case_files(image_paths)
    if inferer is None:
        patch = check_patch_size(patch_size if patch_size is not None else spec.patch_size, model)
        inferer = SlidingWindowInferer(patch, **{"mirror": True, **options})
    else:
        check_patch_size(inferer.patch_size, model, "inferer.patch_size")
    image, props = preprocess_case(image_paths, spec, constant_channels="zero")
    notes = [f"channel {c} ({spec.channel_names[c]}, {Path(image_paths[c]).name}) is constant inside the "
             "nonzero crop: set to 0 (the z-scored mean) instead of z-scored" for c in props["constant_channels"]]
    if inferer.output != "logits":
        inferer = dataclasses.replace(inferer, output="logits")
    try:
        logits = inferer(torch.from_numpy(image), model)
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


