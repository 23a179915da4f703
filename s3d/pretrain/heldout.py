"""What a pre-training run measures on held-out images: the validation loss and reconstruction snapshots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from s3d.pretrain.snapshots import reconstruction_panels, snapshot_image, write_png
from s3d.runtime.device import autocast
from s3d.runtime.method import PretrainMethod


@torch.no_grad()
def validation_loss(method: PretrainMethod, files: Sequence[str], patch_size: Sequence[int], batch: int,
                    to_device: Callable[[torch.Tensor], torch.Tensor], amp_dtype: torch.dtype | None) -> float | None:
    """The method's loss over held-out images (centre crops of ``patch_size`` voxels, ``batch`` at a time).

    For a method that reports ``loss_weight`` (MAE: masked voxels) it is the weighted mean over the whole
    set, as the training loss is over the global batch; otherwise the image mean. Seed the global RNG
    first (the method's randomness, e.g. the mask). The method is in eval mode meanwhile.

    Returns:
        The loss, ``None`` without held-out images (NaN when nothing was weighted).
    """
    from s3d.data.pretrain_dataset import CenterCropDataset

    if not files:
        return None
    ds = CenterCropDataset(list(files), tuple(patch_size))
    total, n = 0.0, 0.0
    method.eval()
    for i in range(0, len(ds), batch):
        x = to_device(torch.stack([ds[j] for j in range(i, min(i + batch, len(ds)))]))
        with autocast(x.device, amp_dtype):
            out = method(method.prepare_batch(x))
        w = float(out.loss_weight) if out.loss_weight is not None else float(x.shape[0])
        total, n = total + float(out.loss) * w, n + w
    method.train()
    return total / n if n > 0 else float("nan")


@torch.no_grad()
def write_snapshot(method: PretrainMethod, x: torch.Tensor, path: Path, amp_dtype: torch.dtype | None) -> Path | None:
    """A PNG of the method's reconstruction of ``x`` (1, C, D, H, W) (:func:`~s3d.pretrain.snapshots.snapshot_image`).

    Seed the global RNG first. Returns ``path``, or ``None`` when the method reconstructs nothing.
    """
    x = method.prepare_batch(x)
    method.eval()
    with autocast(x.device, amp_dtype):
        out = method(x)
    method.train()
    panels = reconstruction_panels(x, out)
    if panels is None:
        return None
    write_png(path, snapshot_image(panels))
    return path
