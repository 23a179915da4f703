"""The fine-tuning loss: soft Dice + cross-entropy with nnU-Net's deep-supervision weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    """Soft Dice (foreground classes) + cross-entropy, as nnU-Net; optional deep supervision.

    ``loss = CE(logits, y) + (1 - mean_k Dice_k)`` with Dice over the batch and all voxels
    ("batch Dice", nnU-Net's 3d default) and smoothing 1e-5. With a list of logits (deep
    supervision, highest resolution first), the target is nearest-downsampled to each output and
    the losses are weighted ``1 / 2**i``, the lowest resolution with 0, normalised to sum 1
    (nnU-Net's weights).

    Example:
        >>> loss = DiceCELoss()(torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 8, 8, 8)))
    """

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (B, K, D, H, W) against integer labels (B, D, H, W)."""
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        k = logits.shape[1]
        probs = torch.softmax(logits, 1)[:, 1:]
        onehot = F.one_hot(target, k).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
        axes = (0, 2, 3, 4) if self.batch_dice else (2, 3, 4)
        inter = (probs * onehot).sum(axes)
        denom = probs.sum(axes) + onehot.sum(axes)
        dice = (2 * inter + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        return ce + (1 - dice.mean())

    @staticmethod
    def deep_supervision_weights(n: int) -> list[float]:
        """nnU-Net's weights for ``n`` outputs: ``1/2**i``, last 0 (if n > 1), normalised to sum 1."""
        w = [1 / 2**i for i in range(n)]
        if n > 1:
            w[-1] = 0.0
        s = sum(w)
        return [x / s for x in w]

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.single(logits, target)
        total = logits[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.deep_supervision_weights(len(logits)), logits, strict=True):
            if w == 0:
                continue
            t = target
            if out.shape[2:] != target.shape[1:]:
                t = F.interpolate(target[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long()
            total = total + w * self.single(out, t)
        return total


__all__ = ["DiceCELoss"]
