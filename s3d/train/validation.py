"""Cheap validation during fine-tuning: per-label Dice of a non-overlapping tiled prediction."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label in ``labels`` (NaN where the label is in neither map)."""
    out = {}
    for v in labels:
        p, t = pred == v, target == v
        denom = int(p.sum()) + int(t.sum())
        out[int(v)] = float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


@torch.no_grad()
def predict_tiled(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                  autocast: Callable[[], Any] | None = None) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) by non-overlapping patch tiles (validation).

    The full prediction with Gaussian-weighted overlapping windows is :mod:`s3d.infer`; this cheap
    tiling only tracks progress during training.
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
                with (autocast() if autocast else contextlib.nullcontext()):
                    logits = model(tile)
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                out[sl] = logits.float().argmax(1)[0].cpu().numpy()
    return out[tuple(slice(0, s) for s in shape)]


__all__ = ["dice_per_label", "predict_tiled"]
