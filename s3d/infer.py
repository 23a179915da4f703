"""Sliding-window prediction with Gaussian importance weighting, and NIfTI-in / NIfTI-out prediction.

Two layers:

* :func:`sliding_window_predict` works on tensors: any ``model(x) -> logits`` (an ``nn.Module`` or a
  function) over an image (C, D, H, W) or (B, C, D, H, W) larger or smaller than the patch. Tiles
  overlap by ``1 - step`` of the patch, are weighted by a Gaussian (sigma = patch / 8, as nnU-Net)
  and are run ``tile_batch`` at a time; logits are accumulated in fp32 on the compute device, or on
  the CPU when the device runs out of memory.
* :func:`predict_case` / :func:`predict_folder` (alias :func:`predict`) read nnU-Net-style NIfTI
  cases (``{case}_{XXXX}.nii.gz``, one file per channel), preprocess them with the model directory's
  ``preprocessing.json``, predict, bring the result back to the input's voxel grid and write a label
  map with the input's affine and header (optionally the class probabilities as ``.npz``).

Axis convention: spatial axes (D, H, W) are nibabel's voxel axes (i, j, k), as in :mod:`s3d.data.io`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], Any]
AmpDtype = torch.dtype | Literal["bf16", "fp16", "fp32"] | None

# ---------------------------------------------------------------------------------------------------
# Gaussian importance map and tile positions
# ---------------------------------------------------------------------------------------------------


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Separable Gaussian weights over a patch, 1 at the centre and > 0 everywhere.

    ``w[z, y, x] = exp(-sum_a (i_a - c_a)^2 / (2 sigma_a^2))`` with centre ``c_a = (n_a - 1) / 2``
    (so the map is exactly mirror-symmetric) and ``sigma_a = sigma_scale * n_a`` voxels. Values that
    underflow to 0 (only for very small ``sigma_scale``) are raised to the smallest positive value, so
    every voxel of a tile keeps a nonzero weight.

    Args:
        patch_size: (D, H, W) in voxels.
        sigma_scale: sigma as a fraction of the patch size (nnU-Net: 1/8).

    Returns:
        Tensor (D, H, W).

    Example:
        >>> w = gaussian_importance_map((32, 32, 32))
        >>> w.shape, float(w.max())
        (torch.Size([32, 32, 32]), 1.0)
    """
    patch_size = _triple(patch_size, "patch_size")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    w = torch.ones((), dtype=torch.float64)
    for n in patch_size:
        i = torch.arange(n, dtype=torch.float64)
        g = torch.exp(-((i - (n - 1) / 2) ** 2) / (2 * (sigma_scale * n) ** 2))
        w = w.unsqueeze(-1) * g
    w = (w / w.max()).to(dtype)
    if (w <= 0).any():
        w = w.clamp_min(torch.finfo(dtype).tiny if not w[w > 0].numel() else float(w[w > 0].min()))
    return w.to(device)


def tile_starts(image_size: int, patch_size: int, step: float) -> list[int]:
    """Start offsets (voxels) of tiles of ``patch_size`` covering ``image_size`` along one axis.

    The number of tiles is the smallest that keeps the distance between starts at most
    ``step * patch_size``; tiles are spread evenly from 0 to ``image_size - patch_size`` and placed
    mirror-symmetrically (``start[i] + start[-1 - i] == image_size - patch_size``).

    Example:
        >>> tile_starts(48, 32, 0.5)
        [0, 16]
    """
    if image_size < patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch {patch_size}; pad it first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1] (a fraction of the patch), got {step}")
    n = math.ceil((image_size - patch_size) / (step * patch_size)) + 1
    if n == 1:
        return [0]
    spacing = (image_size - patch_size) / (n - 1)
    first = [int(round(spacing * i)) for i in range((n + 1) // 2)]
    return first + [image_size - patch_size - s for s in reversed(first[: n // 2])]


def mirror_axes_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (spatial axes 0..2), the empty one (no flip) first.

    Example:
        >>> mirror_axes_combinations((0, 1))
        [(), (0,), (1,), (0, 1)]
    """
    axes = tuple(sorted(set(int(a) for a in axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be spatial axes 0, 1, 2 (D, H, W), got {axes}")
    return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]


# ---------------------------------------------------------------------------------------------------
# Sliding window on tensors
# ---------------------------------------------------------------------------------------------------


def sliding_window_predict(
    model: Model,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    step: float = 0.5,
    mirror: bool | Sequence[int] = False,
    tile_batch: int = 4,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str = "auto",
    amp_dtype: AmpDtype = None,
    sigma_scale: float = 1.0 / 8,
    gaussian: bool = True,
    output: Literal["logits", "probabilities"] = "logits",
    progress: bool = False,
) -> torch.Tensor:
    """Predict a whole image with overlapping tiles, each weighted by a Gaussian.

    The image is zero-padded (symmetrically) where it is smaller than the patch and the padding
    is removed from the result. Tiles start every ``step * patch_size`` voxels (at most; see
    :func:`tile_starts`), are run ``tile_batch`` at a time under ``torch.inference_mode`` and the
    weighted logits are accumulated in fp32. With ``mirror``, each tile is also predicted flipped
    along every subset of the mirror axes and the logits (flipped back) are averaged.

    Args:
        model: maps (N, C, d, h, w) to logits (N, K, d, h, w) (a list, as from deep supervision,
            counts by its first, full-resolution entry). Set ``model.eval()`` yourself.
        image: (C, D, H, W) or (B, C, D, H, W), any float dtype, on any device.
        patch_size: tile size (d, h, w) in voxels; must be a size the model accepts.
        step: distance between tile starts as a fraction of the patch (0.5 = 50% overlap).
        mirror: ``True`` for all three spatial axes, or a sequence of spatial axes (0=D, 1=H, 2=W).
        tile_batch: tiles per forward pass.
        device: where the model runs; default: the device of the model's first parameter (CPU for a
            plain function).
        accumulate_device: where the fp32 sums live. ``"auto"``: on ``device``, falling back to the
            CPU (with a warning) when that raises ``torch.OutOfMemoryError``.
        amp_dtype: ``torch.bfloat16``/``"bf16"`` or ``torch.float16``/``"fp16"`` runs the model under
            autocast; ``None``/``"fp32"`` runs it in full precision.
        sigma_scale: Gaussian sigma as a fraction of the patch; ``gaussian=False`` weights uniformly.
        output: ``"logits"`` (weighted mean of logits) or ``"probabilities"`` (softmax over K of it).
        progress: show a tqdm bar over tiles.

    Returns:
        fp32 tensor (K, D, H, W) (or (B, K, D, H, W) for a batched image) on the accumulation device.

    Raises:
        ValueError: the image is not 4D/5D, is 1 voxel thick along an axis, or an argument is invalid.

    Example:
        >>> net = s3d.build_resenc_unet("tiny", in_channels=1, num_classes=2).eval()
        >>> logits = sliding_window_predict(net, torch.randn(1, 70, 50, 40), (32, 32, 32))
        >>> logits.shape
        torch.Size([2, 70, 50, 40])
    """
    if not isinstance(image, torch.Tensor) or image.dim() not in (4, 5):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected (C, D, H, W) or (B, C, D, H, W), got {shape}")
    batched = image.dim() == 5
    images = image if batched else image.unsqueeze(0)
    if not images.is_floating_point():
        images = images.float()
    spatial = tuple(int(n) for n in images.shape[2:])
    thin = [a for a, n in enumerate(spatial) if n < 2]
    if thin:
        raise ValueError(
            f"image of spatial shape {spatial} is {spatial[thin[0]]} voxel thick along axis {thin[0]} "
            "(D, H, W): a 2D slice, not a 3D volume; 3D sliding-window prediction needs at least 2 "
            "voxels along every axis")
    patch = _triple(patch_size, "patch_size")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    if output not in ("logits", "probabilities"):
        raise ValueError(f"output must be 'logits' or 'probabilities', got {output!r}")
    if mirror is True:
        mirror_axes: Sequence[int] = (0, 1, 2)
    elif mirror is False or mirror is None:
        mirror_axes = ()
    else:
        mirror_axes = tuple(mirror)
    flips = mirror_axes_combinations(mirror_axes)
    device = _model_device(model) if device is None else torch.device(device)
    autocast_dtype = _amp_dtype(amp_dtype)

    # pad to at least one patch, symmetrically
    pad_lo = [max(0, p - n) // 2 for n, p in zip(spatial, patch, strict=True)]
    pad_hi = [max(0, p - n) - lo for n, p, lo in zip(spatial, patch, pad_lo, strict=True)]
    if any(pad_lo) or any(pad_hi):
        pad = [v for a in (2, 1, 0) for v in (pad_lo[a], pad_hi[a])]  # F.pad wants W first
        images = F.pad(images, pad, mode="constant", value=0.0)
    padded = tuple(int(n) for n in images.shape[2:])
    starts = list(itertools.product(*(tile_starts(n, p, step) for n, p in zip(padded, patch, strict=True))))
    weight = (gaussian_importance_map(patch, sigma_scale, device=device) if gaussian
              else torch.ones(patch, device=device))

    def run(acc_device: torch.device) -> torch.Tensor:
        outs = [_predict_one(model, images[b], patch, starts, flips, weight, tile_batch, device, acc_device,
                             autocast_dtype, progress) for b in range(images.shape[0])]
        return torch.stack(outs)

    acc = device if accumulate_device == "auto" else torch.device(accumulate_device)
    out: torch.Tensor | None = None
    if accumulate_device == "auto" and device.type != "cpu":
        try:
            out = run(acc)
        except torch.OutOfMemoryError:
            pass  # retry below, outside the handler, so the traceback no longer holds device tensors
        if out is None:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory accumulating a {padded} image on {device}; "
                          "accumulating on the CPU instead (slower)", RuntimeWarning, stacklevel=2)
            out = run(torch.device("cpu"))
    else:
        out = run(acc)

    if padded != spatial:
        crop = tuple(slice(lo, lo + n) for lo, n in zip(pad_lo, spatial, strict=True))
        out = out[(slice(None), slice(None), *crop)].contiguous()
    if output == "probabilities":
        out = torch.softmax(out, dim=1)
    return out if batched else out[0]


def _predict_one(
    model: Model,
    image: torch.Tensor,
    patch: tuple[int, int, int],
    starts: list[tuple[int, int, int]],
    flips: list[tuple[int, ...]],
    weight: torch.Tensor,
    tile_batch: int,
    device: torch.device,
    acc_device: torch.device,
    autocast_dtype: torch.dtype | None,
    progress: bool,
) -> torch.Tensor:
    """Accumulate Gaussian-weighted logits of one (C, D, H, W) image; returns (K, D, H, W) fp32."""
    from tqdm.auto import tqdm

    spatial = tuple(image.shape[1:])
    logit_sum: torch.Tensor | None = None
    weight_sum = torch.zeros(spatial, dtype=torch.float32, device=acc_device)
    w_acc = weight.to(acc_device, torch.float32)
    bar = tqdm(total=len(starts), desc="tiles", unit="tile", disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        for i in range(0, len(starts), tile_batch):
            group = starts[i: i + tile_batch]
            slices = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in group]
            x = torch.stack([image[(slice(None), *sl)] for sl in slices]).to(device, non_blocking=True)
            logits = None
            for axes in flips:
                dims = [a + 2 for a in axes]
                xi = torch.flip(x, dims) if dims else x
                with _autocast(device, autocast_dtype):
                    y = model(xi)
                if isinstance(y, (list, tuple)):  # deep supervision: full resolution first
                    y = y[0]
                y = y.float()
                if dims:
                    y = torch.flip(y, dims)
                logits = y if logits is None else logits + y
            assert logits is not None
            if len(flips) > 1:
                logits = logits / len(flips)
            if logits.shape[2:] != patch:
                raise ValueError(f"model returned logits of spatial shape {tuple(logits.shape[2:])} for "
                                 f"tiles of {patch}; expected the same spatial shape")
            logits = (logits * weight).to(acc_device)
            if logit_sum is None:
                logit_sum = torch.zeros((logits.shape[1], *spatial), dtype=torch.float32, device=acc_device)
            for t, sl in enumerate(slices):
                logit_sum[(slice(None), *sl)] += logits[t]
                weight_sum[sl] += w_acc
            bar.update(len(group))
    assert logit_sum is not None
    return logit_sum / weight_sum


def _triple(value: Sequence[int] | int, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value,) * 3
    out = tuple(int(v) for v in value)
    if len(out) != 3 or any(v < 1 for v in out):
        raise ValueError(f"{name}: expected three positive sizes (D, H, W) in voxels, got {tuple(value)}")
    return out  # type: ignore[return-value]


def _model_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return torch.device("cpu")


def _amp_dtype(amp_dtype: AmpDtype) -> torch.dtype | None:
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": None, "float32": None, None: None}
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype == torch.float32:
            return None
        if amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be bf16, fp16 or fp32, got {amp_dtype}")
        return amp_dtype
    if amp_dtype not in names:
        raise ValueError(f"amp_dtype must be one of 'bf16', 'fp16', 'fp32', a torch dtype or None; "
                         f"got {amp_dtype!r}")
    return names[amp_dtype]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# NIfTI cases in, NIfTI labels out
# ---------------------------------------------------------------------------------------------------

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


def resolve_device(device: torch.device | str | None = "auto") -> torch.device:
    """``"auto"``/``None``: the first CUDA device if there is one, else the CPU; otherwise ``device``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    return device


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
    amp_dtype: AmpDtype = None,
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
        step, mirror, tile_batch, device, accumulate_device, amp_dtype, progress: as
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
            device=device, accumulate_device=accumulate_device, amp_dtype=amp_dtype, output="probabilities",
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
    amp_dtype: AmpDtype = None,
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
        step, mirror, tile_batch, accumulate_device, amp_dtype: as :func:`sliding_window_predict`.
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
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    model, spec = load_model_dir(model_dir, device=dev)
    cases = find_cases(input_dir, len(spec.channel_names), spec.file_ending)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case, paths in tqdm(cases.items(), desc="predict", unit="case", disable=not progress):
        out = output_dir / f"{case}{spec.file_ending}"
        predict_case(paths, model, spec, patch_size=patch_size, output_path=out,
                     probabilities_path=output_dir / f"{case}.npz" if save_probabilities else None,
                     step=step, mirror=mirror, tile_batch=tile_batch, device=dev,
                     accumulate_device=accumulate_device, amp_dtype=amp_dtype, progress=progress)
        written.append(out)
    return written


#: ``s3d.predict``: the folder-level entry point (:func:`predict_folder`).
predict = predict_folder
