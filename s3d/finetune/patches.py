"""Fine-tuning batches: random (foreground-oversampled) patches of cached cases.

Every random draw of a batch comes from one CPU ``torch.Generator`` in a fixed order; the trainer
seeds a new one for every step and rank (:mod:`s3d.finetune.loader`), so the batch of a step does not
depend on the batches before it and a run (and its resume) is reproducible on any device. The
patches are augmented by :mod:`s3d.augment` on the training device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CachedCase:
    """A preprocessed case in memory (or memory-mapped): data (C, D, H, W), seg (D, H, W), locations."""

    name: str
    data: np.ndarray
    seg: np.ndarray
    locs: np.ndarray


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(0, max(1, high), (1,), generator=gen))


def sample_patches(
    cases: Sequence[CachedCase], batch_size: int, patch_size: Sequence[int], gen: torch.Generator,
    foreground_fraction: float = 0.33, foreground: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random patches; the last ``round(B * foreground_fraction)`` are centred on foreground.

    Foreground patches (nnU-Net's oversampling) pick a label present in the case, then one of its
    voxels, and centre the patch there. Cases smaller than the patch are zero-padded.

    Args:
        cases: the cases to draw from (uniformly).
        batch_size: patches B.
        patch_size: (D, H, W) voxels.
        gen: the CPU generator every draw comes from.
        foreground_fraction: share of forced-foreground patches (the last ones of the batch).
        foreground: which of the B patches are forced onto foreground (overrides
            ``foreground_fraction``; a DDP rank passes its slice of the global batch's flags).

    Returns:
        x (B, C, *patch_size) float32, y (B, *patch_size) int64 (CPU).

    Example:
        >>> x, y = sample_patches(cases, 2, (32, 32, 32), torch.Generator().manual_seed(0))
    """
    ps = tuple(int(p) for p in patch_size)
    if foreground is None:
        n_fg = round(batch_size * foreground_fraction)
        foreground = [i >= batch_size - n_fg for i in range(batch_size)]
    if len(foreground) != batch_size:
        raise ValueError(f"foreground: {len(foreground)} flags for a batch of {batch_size}")
    xs, ys = [], []
    for i in range(batch_size):
        case = cases[_randint(gen, len(cases))]
        shape = case.seg.shape
        hi = [max(0, s - p) for s, p in zip(shape, ps, strict=True)]
        force_fg = bool(foreground[i]) and len(case.locs) > 0
        if force_fg:
            labels = np.unique(case.locs[:, 0])
            lab = labels[_randint(gen, len(labels))]
            rows = np.flatnonzero(case.locs[:, 0] == lab)
            centre = case.locs[rows[_randint(gen, len(rows))], 1:]
            lo = [min(max(0, int(c) - p // 2), h) for c, p, h in zip(centre, ps, hi, strict=True)]
        else:
            lo = [_randint(gen, h + 1) for h in hi]
        sl = tuple(slice(a, a + p) for a, p in zip(lo, ps, strict=True))
        x = np.asarray(case.data[(slice(None), *sl)], dtype=np.float32)
        y = np.asarray(case.seg[sl], dtype=np.int64)
        pad = [(0, p - s) for p, s in zip(ps, y.shape, strict=True)]
        if any(b for _, b in pad):
            x = np.pad(x, [(0, 0), *pad])
            y = np.pad(y, pad)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


__all__ = ["CachedCase", "sample_patches"]
