"""PNG snapshots of what a pre-training method reconstructs (input, masked input, output, target)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from s3d._fs import atomic_path
from s3d.runtime.method import MethodOutput


def snapshot_image(panels: list[torch.Tensor], clip: float = 3.0) -> np.ndarray:
    """A uint8 grid: rows = three orthogonal centre slices, columns = ``panels`` (each (D, H, W)).

    Values are clipped to [-clip, clip] (z-score units) and mapped to 0..255.

    Example:
        >>> snapshot_image([torch.zeros(8, 8, 8)] * 4).shape
        (24, 32)
    """
    rows = []
    for axis in range(3):
        cells = []
        for vol in panels:
            v = vol.detach().float().cpu()
            sl = v.select(axis, v.shape[axis] // 2).numpy()
            cells.append(np.clip((sl + clip) / (2 * clip) * 255.0, 0, 255).astype(np.uint8))
        h = max(c.shape[0] for c in cells)
        rows.append(np.concatenate([np.pad(c, ((0, h - c.shape[0]), (0, 0))) for c in cells], axis=1))
    w = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, w - r.shape[1]))) for r in rows], axis=0)


def reconstruction_panels(x: torch.Tensor, out: MethodOutput) -> list[torch.Tensor] | None:
    """The four (D, H, W) panels of sample 0: input, masked input, reconstruction, target; ``None``
    when the method's output has no ``reconstruction``."""
    if out.reconstruction is None:
        return None
    masked = x
    if out.mask is not None:
        from s3d.nn.masked import expand_keep

        masked = x * expand_keep(out.mask, x.shape[2:]).to(x.dtype)
    target = x if out.target is None else out.target
    return [x[0, 0], masked[0, 0], out.reconstruction[0, 0], target[0, 0]]


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 image as PNG, atomically (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with most torch installs
        raise ImportError('reconstruction snapshots need Pillow: pip install "s3d[plot]" (or pillow), '
                          "or pass --snapshot-every 0") from e
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
