"""NIfTI in, NIfTI out: predict nnU-Net-style cases with a model directory.

:func:`predict_case` / :func:`predict_folder` (alias ``s3d.predict``) read nnU-Net-style NIfTI cases
(``{case}_{XXXX}.nii.gz``, one file per channel), preprocess them with the model directory's
``preprocessing.json``, predict (:func:`~s3d.infer.sliding_window_predict`), bring the result back to
the input's voxel grid and write a label map with the input's affine and header (optionally the class
probabilities as ``.npz``).

Axis convention: spatial axes (D, H, W) are nibabel's voxel axes (i, j, k), as in :mod:`s3d.data.io`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s3d.infer.sliding_window import Model, sliding_window_predict
from s3d.runtime.device import resolve_device
from s3d.runtime.progress import progress as progress_bar

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class CasePrediction:
    """Result of :func:`predict_case` in the input's voxel grid.

    Attributes:
        labels: (D, H, W) label values (the argmax class, which is the label value).
        probabilities: (K, D, H, W) float32 class probabilities.
        affine: the input's 4x4 voxel-to-world affine (mm).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray


def load_model_dir(model_dir: str | os.PathLike[str], device: torch.device | str = "cpu"):
    """Load a model directory: the network (``model.safetensors`` + ``config.json``) and its
    ``preprocessing.json``.

    Returns:
        ``(model in eval mode on device, PreprocessingSpec)``.

    Raises:
        FileNotFoundError / ValueError: a missing file or a network whose input channels or classes
            disagree with ``preprocessing.json`` (the message names the files).

    Example:
        >>> model, spec = load_model_dir("runs/Dataset001/model")
    """
    from s3d.data.nnunet import PreprocessingSpec
    from s3d.hub import load_pretrained

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    spec = PreprocessingSpec.load(model_dir / "preprocessing.json")
    model = load_pretrained(model_dir, in_channels=None, num_classes=None, device=device)
    cfg = model.config
    if cfg.in_channels != len(spec.channel_names) or cfg.num_classes != spec.num_classes:
        raise ValueError(
            f"{model_dir}: the network takes {cfg.in_channels} channel(s) and predicts {cfg.num_classes} "
            f"class(es) (config.json), but preprocessing.json lists {len(spec.channel_names)} channel(s) "
            f"{spec.channel_names} and labels {spec.labels} ({spec.num_classes} classes)")
    model.deep_supervision = False
    return model.eval(), spec


def find_cases(input_dir: str | os.PathLike[str], num_channels: int, file_ending: str = ".nii.gz"
               ) -> dict[str, list[Path]]:
    """Group ``{case}_{XXXX}{file_ending}`` files of ``input_dir`` into cases, channels in order.

    Raises:
        ValueError: listing every problem at once (a name without ``_XXXX``, a missing channel file,
            a channel index beyond ``num_channels``, no cases at all), each with its file name.

    Example:
        >>> find_cases("imagesTs", num_channels=2)
        {'brain_001': [PosixPath('imagesTs/brain_001_0000.nii.gz'),
                       PosixPath('imagesTs/brain_001_0001.nii.gz')]}
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found")
    problems: list[str] = []
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(input_dir.glob(f"*{file_ending}")):
        if p.name.startswith("."):
            continue
        m = _CHANNEL_RE.match(p.name[: -len(file_ending)])
        if m is None:
            problems.append(f"{p}: name must be {{case}}_XXXX{file_ending} (XXXX = channel index, e.g. 0000)")
            continue
        channel = int(m["channel"])
        if channel >= num_channels:
            problems.append(f"{p}: channel {channel}, but the model takes {num_channels} channel(s) "
                            f"(_0000 .. _{num_channels - 1:04d})")
            continue
        found.setdefault(m["case"], {})[channel] = p
    cases: dict[str, list[Path]] = {}
    for case, channels in sorted(found.items()):
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            problems.extend(f"{input_dir / f'{case}_{c:04d}{file_ending}'}: missing channel file "
                            f"of case {case!r}" for c in missing)
        else:
            cases[case] = [channels[c] for c in range(num_channels)]
    if not found and not problems:
        problems.append(f"{input_dir}: no {{case}}_XXXX{file_ending} files")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{input_dir}: {len(problems)} problem(s) with the input files:\n{lines}")
    return cases


def predict_case(
    image_paths: Sequence[str | os.PathLike[str]],
    model: Model,
    spec: Any,
    *,
    patch_size: Sequence[int] | None = None,
    output_path: str | os.PathLike[str] | None = None,
    probabilities_path: str | os.PathLike[str] | None = None,
    step: float = 0.5,
    mirror: bool | Sequence[int] = False,
    tile_batch: int = 4,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str = "auto",
    amp: str | torch.dtype | None = "off",
    progress: bool = False,
) -> CasePrediction:
    """Predict one case: preprocess, sliding window, back to the input grid, optionally write files.

    Steps: :func:`s3d.data.nnunet.preprocess_case` (crop to nonzero, z-score, resample to
    ``spec.target_spacing_mm``) -> :func:`sliding_window_predict` (softmax of the Gaussian-weighted
    logits) -> :func:`s3d.data.nnunet.restore_geometry` (probabilities resampled linearly to the
    input's voxel grid; background outside the crop) -> argmax.

    Args:
        image_paths: one NIfTI file per channel, in ``spec.channel_names`` order.
        model: the network (``model(x)`` -> logits (N, K, d, h, w)), in eval mode.
        spec: the :class:`~s3d.data.nnunet.PreprocessingSpec` the model was trained with.
        patch_size: tile size (voxels); default ``spec.patch_size``.
        output_path: write the label map here (NIfTI, the first channel's affine and header).
        probabilities_path: write ``probabilities`` (K, D, H, W) float32 and ``labels`` (the label
            values of the K classes) here as ``.npz``.
        step, mirror, tile_batch, device, accumulate_device, amp, progress: as
            :func:`sliding_window_predict`.

    Returns:
        :class:`CasePrediction` in the input's voxel grid.

    Raises:
        ValueError: an input 1 voxel thick along an axis, or no patch size; messages name the file.

    Example:
        >>> model, spec = load_model_dir("model")
        >>> pred = predict_case(["ct_001_0000.nii.gz"], model, spec, output_path="out/ct_001.nii.gz")
        >>> pred.labels.shape   # the input's (D, H, W)
    """
    from s3d.data.io import read_header, write_nifti
    from s3d.data.nnunet import preprocess_case, restore_geometry

    if not image_paths:
        raise ValueError("image_paths: need at least one channel file")
    header = read_header(image_paths[0])
    thin = [a for a, n in enumerate(header.shape[:3]) if n < 2]
    if len(header.shape) < 3 or thin:
        raise ValueError(f"{image_paths[0]}: shape {header.shape} is 1 voxel thick along axis "
                         f"{thin[0] if thin else len(header.shape)}: a 2D image, not a 3D volume; "
                         "3D prediction needs at least 2 voxels along every axis")
    patch = patch_size if patch_size is not None else spec.patch_size
    if patch is None:
        raise ValueError("no patch size: preprocessing.json has patch_size null; pass patch_size (voxels)")
    image, props = preprocess_case(image_paths, spec)
    try:
        probs = sliding_window_predict(
            model, torch.from_numpy(image), patch, step=step, mirror=mirror, tile_batch=tile_batch,
            device=device, accumulate_device=accumulate_device, amp=amp, output="probabilities",
            progress=progress)
    except ValueError as e:
        raise ValueError(f"{image_paths[0]}: after resampling to {spec.target_spacing_mm} mm: {e}") from e
    probabilities = restore_geometry(probs.cpu().numpy(), props)
    num_classes = probabilities.shape[0]
    label_dtype = np.uint8 if num_classes <= 256 else np.int16
    labels = np.argmax(probabilities, axis=0).astype(label_dtype)
    affine = np.asarray(header.affine, dtype=np.float64)
    if output_path is not None:
        write_nifti(output_path, labels, affine, like=image_paths[0])
    if probabilities_path is not None:
        from s3d._fs import atomic_path

        with atomic_path(probabilities_path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probabilities.astype(np.float32),
                                labels=np.arange(num_classes, dtype=np.int64))
    return CasePrediction(labels, probabilities, affine)


def predict_folder(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    step: float = 0.5,
    mirror: bool | Sequence[int] = False,
    tile_batch: int = 4,
    device: torch.device | str | None = "auto",
    accumulate_device: torch.device | str = "auto",
    amp: str | torch.dtype | None = "off",
    patch_size: Sequence[int] | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Predict every case of ``input_dir`` with the model in ``model_dir``; write label NIfTIs.

    Input: nnU-Net naming, ``{case}_{XXXX}{file_ending}`` with one file per channel (XXXX = 0000,
    0001, ...). Output: ``output_dir/{case}{file_ending}`` (labels, same shape, affine and header as
    the case's first channel file) and, with ``save_probabilities``, ``output_dir/{case}.npz``
    (``probabilities`` (K, D, H, W) float32). A model directory is :func:`s3d.hub.save_pretrained`
    output (``model.safetensors`` + ``config.json``) plus ``preprocessing.json``.

    Args:
        input_dir: folder of input NIfTI files.
        output_dir: created if missing; existing predictions are replaced (atomically).
        model_dir: see above.
        step, mirror, tile_batch, accumulate_device, amp: as :func:`sliding_window_predict`.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        patch_size: tile size (voxels); default ``preprocessing.json``'s ``patch_size``.
        save_probabilities: also write ``{case}.npz``.
        progress: a tqdm bar over cases (and one over each case's tiles).

    Returns:
        Paths of the label files written, in case order.

    Example:
        >>> s3d.predict("imagesTs", "predictions", "runs/Dataset001/model", mirror=True)
        [PosixPath('predictions/case_001.nii.gz'), ...]
    """
    dev = resolve_device(device)
    model, spec = load_model_dir(model_dir, device=dev)
    cases = find_cases(input_dir, len(spec.channel_names), spec.file_ending)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case, paths in progress_bar(cases.items(), desc="predict", unit="case", enabled=progress):
        out = output_dir / f"{case}{spec.file_ending}"
        predict_case(paths, model, spec, patch_size=patch_size, output_path=out,
                     probabilities_path=output_dir / f"{case}.npz" if save_probabilities else None,
                     step=step, mirror=mirror, tile_batch=tile_batch, device=dev,
                     accumulate_device=accumulate_device, amp=amp, progress=progress)
        written.append(out)
    return written
