"""VolumeFusion (Wang et al., MIS-FM 2023): segment the fusion coefficients of two fused volumes.

Two sub-volumes ``a`` and ``b`` (two different images of the batch: sample ``i`` is fused with
sample ``i + 1 mod B``; with a batch of one, with its own flipped copy) are mixed voxel-wise,
``fused = alpha * a + (1 - alpha) * b``, with ``alpha = label / K`` and ``label`` in
``{0, ..., K}`` (K = 4: coefficients {0, .25, .5, .75, 1}, 5 classes). The label map starts at 0
and ``M ~ U{10, ..., 40}`` rectangles are painted over it one after the other, each with a random
class; rectangle sides are uniform in ``[8, 0.625 * patch]`` voxels per axis (``[8, 100]`` at the
paper's 160^3 patch, Appendix A.2). The network (encoder + decoder of the backbone, with its own
(K+1)-class 1x1x1 head) predicts the label map; the loss is Dice + cross-entropy (nnU-Net's, see
:class:`s3d.finetune.DiceCELoss`).

The backbone's own segmentation heads are not used (frozen); the extra head lives in this module,
so :meth:`VolumeFusion.export_backbone` is a plain ResEnc U-Net state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from s3d.pretext._common import (
    PretextMethod,
    PretextOutput,
    box_mask,
    check_backbone,
    decoder_features,
    device_generator,
    randint_between,
)


def rectangle_side_range(size: Sequence[int], min_side: int = 8, max_fraction: float = 0.625
                         ) -> tuple[list[int], list[int]]:
    """Per-axis (min, max) rectangle side in voxels: ``[min_side, max_fraction * size]`` (clamped to size).

    Example:
        >>> rectangle_side_range((160, 160, 160))
        ([8, 8, 8], [100, 100, 100])
    """
    hi = [max(1, min(int(s), int(max_fraction * s))) for s in size]
    lo = [min(int(min_side), h) for h in hi]
    return lo, hi


def sample_fusion_boxes(
    batch: int, size: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu",
    num_rectangles: Sequence[int] = (10, 40), min_side: int = 8, max_fraction: float = 0.625,
    num_classes: int = 5,
) -> dict[str, torch.Tensor]:
    """Random rectangles of VolumeFusion.

    Returns:
        ``lo``, ``hi``: (B, M_max, 3) long corners (voxels, ``hi`` exclusive), ``active``: (B, M_max)
        bool (the first ``M_i`` of sample i, ``M_i ~ U{num_rectangles}``), ``label``: (B, M_max) long
        class of each rectangle, uniform in ``0 .. num_classes - 1``.
    """
    device = torch.device(device)
    m_lo, m_hi = int(num_rectangles[0]), int(num_rectangles[1])
    if not 1 <= m_lo <= m_hi:
        raise ValueError(f"num_rectangles: expected 1 <= low <= high, got {tuple(num_rectangles)}")
    s_lo, s_hi = rectangle_side_range(size, min_side, max_fraction)
    count = randint_between(torch.full((batch,), m_lo, device=device),
                            torch.full((batch,), m_hi, device=device), generator)
    shape = (batch, m_hi, 3)
    side = randint_between(torch.tensor(s_lo, device=device).expand(shape),
                           torch.tensor(s_hi, device=device).expand(shape), generator)
    start = randint_between(torch.zeros(shape, dtype=torch.long, device=device),
                            torch.tensor(list(size), device=device) - side, generator)
    label = randint_between(torch.zeros((batch, m_hi), dtype=torch.long, device=device),
                            torch.full((batch, m_hi), num_classes - 1, device=device), generator)
    active = torch.arange(m_hi, device=device)[None] < count[:, None]
    return {"lo": start, "hi": start + side, "active": active, "label": label, "count": count}


def fusion_labels(boxes: dict[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """Paint the rectangles in order onto a zero label map: (B, 1, D, H, W) long."""
    lo, hi, active, label = boxes["lo"], boxes["hi"], boxes["active"], boxes["label"]
    out = torch.zeros((lo.shape[0], 1, *size), dtype=torch.long, device=lo.device)
    for m in range(lo.shape[1]):
        inside = box_mask(lo[:, m], hi[:, m], size) & active[:, m].view(-1, 1, 1, 1, 1)
        out = torch.where(inside, label[:, m].view(-1, 1, 1, 1, 1), out)
    return out


def fuse(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, num_classes: int = 5) -> torch.Tensor:
    """``alpha * a + (1 - alpha) * b`` with ``alpha = label / (num_classes - 1)``; shapes (B, C, D, H, W).

    Example:
        >>> fuse(torch.ones(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 2), torch.tensor([[[[[0, 2]]]]]))
        tensor([[[[[0.0000, 0.5000]]]]])
    """
    alpha = label.to(a.dtype) / (num_classes - 1)
    return alpha * a + (1 - alpha) * b


class VolumeFusion(PretextMethod):
    """VolumeFusion pseudo-segmentation pre-training around a ResEnc U-Net.

    Args:
        backbone: the ResEnc U-Net (encoder and decoder are trained; its seg heads are not used).
        num_classes: fusion classes K + 1 (5: coefficients {0, .25, .5, .75, 1}).
        num_rectangles: (low, high) of the rectangle count M, inclusive.
        min_side: smallest rectangle side (voxels).
        max_fraction: largest rectangle side as a fraction of the patch side (0.625).

    Example:
        >>> from s3d.nn import build_resenc_unet
        >>> vf = VolumeFusion(build_resenc_unet("tiny", in_channels=1, num_classes=1))
        >>> out = vf(torch.randn(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
        >>> out.extras["label"].unique().numel() <= 5
        True
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 5, num_rectangles: Sequence[int] = (10, 40),
                 min_side: int = 8, max_fraction: float = 0.625) -> None:
        super().__init__()
        check_backbone(backbone, "vf")
        if num_classes < 2:
            raise ValueError(f"vf: num_classes must be >= 2, got {num_classes}")
        if len(num_rectangles) != 2 or not 1 <= int(num_rectangles[0]) <= int(num_rectangles[1]):
            raise ValueError(f"vf: num_rectangles must be (low, high) with 1 <= low <= high, "
                             f"got {num_rectangles}")
        if min_side < 1 or not 0 < max_fraction <= 1:
            raise ValueError(f"vf: need min_side >= 1 and 0 < max_fraction <= 1, "
                             f"got {min_side}, {max_fraction}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.num_rectangles = (int(num_rectangles[0]), int(num_rectangles[1]))
        self.min_side = int(min_side)
        self.max_fraction = float(max_fraction)
        self.head = nn.Conv3d(backbone.config.features_per_stage[0], self.num_classes, 1)
        backbone.decoder.seg_layers.requires_grad_(False)
        from s3d.finetune.losses import DiceCELoss

        self.loss_fn = DiceCELoss()

    def make_pair(self, x: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(fused (B, C, D, H, W), label (B, 1, D, H, W) long, boxes) for ``x``."""
        g = device_generator(x, generator)
        other = torch.roll(x, 1, dims=0) if x.shape[0] > 1 else x.flip(2, 3, 4)
        size = tuple(x.shape[2:])
        boxes = sample_fusion_boxes(x.shape[0], size, g, x.device, self.num_rectangles, self.min_side,
                                    self.max_fraction, self.num_classes)
        label = fusion_labels(boxes, size)
        return fuse(x, other, label, self.num_classes), label, boxes

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> PretextOutput:
        """Fuse ``x`` (B, C, D, H, W, z-scored) with its batch neighbours and score the segmentation.

        Returns:
            :class:`PretextOutput` (loss, reconstruction = predicted class map (B, 1, D, H, W) float,
            target = true class map, extras ``{"input", "label", "logits"}``).
        """
        self.backbone.check_input(x)
        fused, label, _ = self.make_pair(x, generator)
        logits = self.head(decoder_features(self.backbone, self.backbone.encoder(fused)))
        loss = self.loss_fn(logits.float(), label[:, 0])
        pred = logits.detach().argmax(1, keepdim=True).to(x.dtype)
        extras = {"input": fused, "label": label, "logits": logits}
        return PretextOutput(loss, pred, label.to(x.dtype), extras)
