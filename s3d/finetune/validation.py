"""Validation during and after fine-tuning: per-label Dice of held-out cases in preprocessed space.

Two predictors share the Dice bookkeeping (:func:`validation_dice`):

- :func:`predict_tiled`: non-overlapping patch tiles, cheap, for the periodic validations that track
  progress during training;
- :func:`predict_sliding_window`: the prediction users get from :mod:`s3d.infer` (Gaussian-weighted
  overlapping windows, :func:`s3d.infer.sliding_window_predict`), for the final validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from s3d.runtime.device import autocast


def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label in ``labels`` (NaN where the label is in neither map).

    Example:
        >>> dice_per_label(np.array([0, 1, 1]), np.array([0, 1, 0]), [1])
        {1: 0.6666666666666666}
    """
    out = {}
    for v in labels:
        p, t = pred == v, target == v
        denom = int(p.sum()) + int(t.sum())
        out[int(v)] = float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


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


@torch.no_grad()
def predict_tiled(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                  amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) by non-overlapping patch tiles (validation).

    The full prediction with Gaussian-weighted overlapping windows is :func:`predict_sliding_window`
    (:mod:`s3d.infer`); this cheap tiling only tracks progress during training.

    Example:
        >>> pred = predict_tiled(net.eval(), case.data, (32, 32, 32), torch.device("cpu"))
    """
    ps = [int(p) for p in patch_size]
    shape = data.shape[1:]
    padded = [max(p, math.ceil(s / p) * p) for s, p in zip(shape, ps, strict=True)]
    x = np.zeros((data.shape[0], *padded), dtype=np.float32)
    x[(slice(None), *(slice(0, s) for s in shape))] = data
    out = np.zeros(padded, dtype=np.int64)
    xt = torch.from_numpy(x)
    for d in range(0, padded[0], ps[0]):
        for h in range(0, padded[1], ps[1]):
            for w in range(0, padded[2], ps[2]):
                sl = (slice(d, d + ps[0]), slice(h, h + ps[1]), slice(w, w + ps[2]))
                tile = xt[(slice(None), *sl)][None].to(device)
                with autocast(device, amp_dtype):
                    logits = model(tile)
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                out[sl] = logits.float().argmax(1)[0].cpu().numpy()
    return out[tuple(slice(0, s) for s in shape)]


def predict_sliding_window(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                           amp: str | torch.dtype | None = None, **kwargs: Any) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) as ``s3d predict`` makes them.

    The argmax of :func:`s3d.infer.sliding_window_predict` with its defaults (tiles overlapping by
    half a patch, Gaussian importance with sigma = patch / 8, no mirroring) unless ``kwargs`` say
    otherwise. A deep-supervision model counts by its full-resolution output. Set ``model.eval()``.

    Args:
        model: the network, on ``device``.
        data: preprocessed image (C, D, H, W).
        patch_size: (D, H, W) tile size in voxels.
        device: where the model runs (the logits accumulate there, or on the CPU when it is full).
        amp: autocast dtype or :data:`~s3d.runtime.device.AMP_MODES` name (``None`` = fp32).
        **kwargs: more :func:`s3d.infer.sliding_window_predict` arguments (``step``, ``tile_batch``...).

    Example:
        >>> pred = predict_sliding_window(net.eval(), case.data, (32, 32, 32), torch.device("cpu"))
    """
    from s3d.infer import sliding_window_predict

    image = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy (the cache is read-only)
    logits = sliding_window_predict(model, image, patch_size, device=device, amp=amp, **kwargs)
    return logits.argmax(0).cpu().numpy()


__all__ = ["dice_per_label", "predict_sliding_window", "predict_tiled", "validation_dice"]
