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


def _tile_starts(padded: Sequence[int], ps: Sequence[int]) -> list[tuple[int, int, int]]:
    return [(d, h, w) for d in range(0, padded[0], ps[0]) for h in range(0, padded[1], ps[1])
            for w in range(0, padded[2], ps[2])]


@torch.no_grad()
def predict_tiled(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                  amp_dtype: torch.dtype | None = None, tile_batch: int = 4,
                  return_logits: bool = False) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) by non-overlapping patch tiles (validation).

    The case is zero-padded to whole tiles and the tiles go through the network ``tile_batch`` at a
    time (one forward pass per batch of tiles; the network treats samples independently, instance
    norm included, so batching changes only the rounding). The full prediction with
    Gaussian-weighted overlapping windows is :func:`predict_sliding_window` (:mod:`s3d.infer`); this
    cheap tiling only tracks progress during training.

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
    if tile_batch < 1:
        raise ValueError(f"tile_batch: must be >= 1, got {tile_batch}")
    ps = [int(p) for p in patch_size]
    shape = data.shape[1:]
    padded = [max(p, math.ceil(s / p) * p) for s, p in zip(shape, ps, strict=True)]
    x = np.zeros((data.shape[0], *padded), dtype=np.float32)
    x[(slice(None), *(slice(0, s) for s in shape))] = data
    xt = torch.from_numpy(x)
    starts = _tile_starts(padded, ps)
    labels = None if return_logits else np.zeros(padded, dtype=np.int64)
    logits_out: np.ndarray | None = None
    for i in range(0, len(starts), tile_batch):
        group = starts[i:i + tile_batch]
        sls = [(slice(d, d + ps[0]), slice(h, h + ps[1]), slice(w, w + ps[2])) for d, h, w in group]
        tiles = torch.stack([xt[(slice(None), *sl)] for sl in sls]).to(device)
        with autocast(device, amp_dtype):
            logits = model(tiles)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        if return_logits:
            if logits_out is None:
                logits_out = np.zeros((logits.shape[1], *padded), dtype=np.float32)
            out_np = logits.float().cpu().numpy()
            for j, sl in enumerate(sls):
                logits_out[(slice(None), *sl)] = out_np[j]
        else:
            assert labels is not None
            lab = logits.float().argmax(1).cpu().numpy()
            for j, sl in enumerate(sls):
                labels[sl] = lab[j]
    crop = tuple(slice(0, s) for s in shape)
    if return_logits:
        assert logits_out is not None
        return logits_out[(slice(None), *crop)]
    assert labels is not None
    return labels[crop]


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

    Gaussian-weighted tiles overlapping by half a patch (:func:`s3d.infer.sliding_window_predict`'s
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
           "tiled_validation", "validation_dice"]
