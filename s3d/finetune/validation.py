"""Validation during and after fine-tuning: per-label Dice of held-out cases in preprocessed space.

Both predictors are :class:`s3d.infer.SlidingWindowInferer` s (fine-tuning has no tiler of its own) and
share the Dice bookkeeping (:func:`validation_dice`, Dice by :func:`s3d.metrics.dice`):

- :func:`predict_tiled` (:func:`tiles_inferer`): non-overlapping patch tiles, uniform weights, the image
  zero-padded at its end to whole tiles; cheap, for the periodic validations that track progress;
- :func:`predict_sliding_window`: the prediction users get from :mod:`s3d.infer` (Gaussian-weighted
  windows overlapping by half a patch), for the final validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from s3d.infer.sliding_window import SlidingWindowInferer
from s3d.metrics.overlap import EmptyPolicy, dice


def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label in ``labels`` (:func:`s3d.metrics.dice`: NaN where the label is in neither map).

    Example:
        >>> dice_per_label(np.array([0, 1, 1]), np.array([0, 1, 0]), [1])
        {1: 0.6666666666666666}
    """
    return {int(v): dice(pred == v, target == v, EmptyPolicy.NAN) for v in labels}


def validation_dice(
    predict: Callable[[np.ndarray], np.ndarray],
    cases: Iterable[Any],
    labels: Sequence[int],
) -> tuple[float, dict[str, float]]:
    """Mean foreground Dice of ``predict`` over cases, and the per-label means.

    Each label's Dice is averaged over the cases where it is defined (NaN-mean), and the overall value
    is the mean over labels.

    Args:
        predict: maps a preprocessed image (C, D, H, W) to labels (D, H, W).
        cases: objects with ``.data`` (C, D, H, W) and ``.seg`` (D, H, W) (e.g. ``CachedCase``).
        labels: foreground label values.

    Returns:
        ``(mean, {"label": mean Dice})`` (NaN where no case defines a label, or without cases).

    Example:
        >>> mean, per_label = validation_dice(lambda x: x[0] > 0, cases, [1])
    """
    per_case = []
    for case in cases:
        pred = predict(np.asarray(case.data))
        per_case.append(dice_per_label(pred, np.asarray(case.seg), labels))
    per_label = {}
    for v in labels:
        vals = [d[v] for d in per_case if not math.isnan(d[v])]
        per_label[str(v)] = float(np.mean(vals)) if vals else float("nan")
    defined = [d for d in per_label.values() if not math.isnan(d)]
    mean = float(np.mean(defined)) if defined else float("nan")
    return mean, per_label


def tiles_inferer(patch_size: Sequence[int], device: torch.device, amp_dtype: torch.dtype | None = None,
                  tile_batch: int = 4) -> SlidingWindowInferer:
    """The periodic validation's predictor: non-overlapping tiles (``step=1``), uniform weights, the image
    zero-padded at its end to whole tiles (``padding="tiles"``), no mirroring, ``tile_batch`` per pass.

    Example:
        >>> tiles_inferer((32, 32, 32), torch.device("cpu")).padding
        'tiles'
    """
    return SlidingWindowInferer(patch_size, step=1.0, mirror=False, tile_batch=tile_batch, device=device,
                                amp=amp_dtype, gaussian=False, padding="tiles")


def predict_tiled(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                  amp_dtype: torch.dtype | None = None, tile_batch: int = 4,
                  return_logits: bool = False) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) by non-overlapping patch tiles (:func:`tiles_inferer`).

    One forward pass per ``tile_batch`` tiles (the network treats samples independently, instance norm
    included, so batching changes only the rounding). The full prediction with Gaussian-weighted
    overlapping windows is :func:`predict_sliding_window`; this cheap tiling only tracks progress.

    Args:
        model: the network, in eval mode, on ``device`` (a deep-supervision model counts by its
            full-resolution output).
        data: preprocessed image (C, D, H, W).
        patch_size: (D, H, W) tile size in voxels.
        device: where the model runs.
        amp_dtype: autocast dtype (``None``: fp32).
        tile_batch: tiles per forward pass (>= 1).
        return_logits: return the logits (K, D, H, W) float32 instead of the labels.

    Example:
        >>> pred = predict_tiled(net.eval(), case.data, (32, 32, 32), torch.device("cpu"), tile_batch=4)
    """
    image = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy (the cache is read-only)
    logits = tiles_inferer(patch_size, device, amp_dtype, tile_batch)(image, model)
    return logits.cpu().numpy() if return_logits else logits.argmax(0).cpu().numpy()


def predict_sliding_window(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                           amp: str | torch.dtype | None = None, **kwargs: Any) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) as ``s3d predict`` makes them.

    The argmax of a :class:`s3d.infer.SlidingWindowInferer` with its defaults (tiles overlapping by
    half a patch, Gaussian importance with sigma = patch / 8, no mirroring) unless ``kwargs`` say
    otherwise. A deep-supervision model counts by its full-resolution output. Set ``model.eval()``.

    Args:
        model: the network, on ``device``.
        data: preprocessed image (C, D, H, W).
        patch_size: (D, H, W) tile size in voxels.
        device: where the model runs (the logits accumulate there, or on the CPU when it is full).
        amp: autocast dtype or :data:`~s3d.runtime.device.AMP_MODES` name (``None`` = fp32).
        **kwargs: more :class:`s3d.infer.SlidingWindowInferer` settings (``step``, ``tile_batch``...).

    Example:
        >>> pred = predict_sliding_window(net.eval(), case.data, (32, 32, 32), torch.device("cpu"))
    """
    image = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy (the cache is read-only)
    logits = SlidingWindowInferer(patch_size, device=device, amp=amp, **kwargs)(image, model)
    return logits.argmax(0).cpu().numpy()


def tiled_validation(model: nn.Module, cases: Iterable[Any], labels: Sequence[int], patch_size: Sequence[int],
                     device: torch.device, amp_dtype: torch.dtype | None = None, tile_batch: int = 4,
                     step: int = 0) -> dict[str, Any]:
    """The periodic validation record: ``{"step", "val_dice", "val_dice_per_label", "val_mode": "tiles"}``.

    :func:`predict_tiled` (non-overlapping tiles, ``tile_batch`` per forward pass) on every case; the
    model is put in eval mode for it and back in train mode after.

    Example:
        >>> tiled_validation(net, val_cases, [1], (32, 32, 32), torch.device("cpu"))["val_dice"]
        0.87
    """
    model.eval()
    try:
        mean, per_label = validation_dice(
            lambda data: predict_tiled(model, data, patch_size, device, amp_dtype, tile_batch=tile_batch),
            cases, labels)
    finally:
        model.train()
    return {"step": step, "val_dice": mean, "val_dice_per_label": per_label, "val_mode": "tiles"}


def sliding_window_validation(model: nn.Module, cases: Iterable[Any], labels: Sequence[int],
                              patch_size: Sequence[int], device: torch.device,
                              amp_dtype: torch.dtype | None = None, step: int = 0) -> dict[str, Any]:
    """The final validation record, predicted as ``s3d predict`` does (:func:`predict_sliding_window`).

    Gaussian-weighted tiles overlapping by half a patch (:class:`s3d.infer.SlidingWindowInferer`'s
    defaults), in preprocessed space, under the autocast dtype, from the full-resolution output.

    Returns:
        ``{"step", "final_dice", "final_dice_per_label", "val_mode": "sliding_window", "val_time_s"}``
        (``val_time_s``: seconds this validation took).

    Example:
        >>> sliding_window_validation(net, val_cases, [1], (32, 32, 32), torch.device("cpu"))["final_dice"]
        0.88
    """
    import time

    model.eval()
    t0 = time.perf_counter()
    try:
        mean, per_label = validation_dice(
            lambda data: predict_sliding_window(model, data, patch_size, device, amp_dtype), cases, labels)
    finally:
        model.train()
    return {"step": step, "final_dice": mean, "final_dice_per_label": per_label, "val_mode": "sliding_window",
            "val_time_s": round(time.perf_counter() - t0, 3)}


__all__ = ["dice_per_label", "predict_sliding_window", "predict_tiled", "sliding_window_validation",
           "tiled_validation", "tiles_inferer", "validation_dice"]
