"""Pieces shared by the pretext methods: the output type, what they provide as pre-training methods
(:class:`PretextMethod`), random streams, box masks, decoder features."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import nn


class PretextOutput(NamedTuple):
    """Result of a pretext method's ``forward``.

    Attributes:
        loss: scalar training loss.
        reconstruction: (B, C, D, H, W) what the network produced for snapshots, or ``None``.
        target: (B, C, D, H, W) what it should have produced, or ``None``.
        extras: method-specific tensors (e.g. the transformed input, the labels), may be empty.
        loss_weight: ``None``: every sample weighs the same when losses are combined across processes.
        mask: ``None``: the input is not masked (a snapshot shows it as it is).
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor | None = None
    target: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] | None = None
    loss_weight: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class PretextMethod(nn.Module):
    """What the pretext methods share as pre-training methods (:class:`s3d.runtime.method.PretrainMethod`):
    they take the loop's patches as they are, any patch their backbone takes works (unless a method says
    otherwise), they choose nothing at run time, and their export is the backbone's state dict.

    Subclasses set ``self.backbone`` and implement ``forward(x, generator=None) -> PretextOutput``.
    """

    backbone: nn.Module
    #: nothing is chosen at run time (the MAE wrapper's encoder engine is)
    engine_choices: Mapping[Any, Any] = MappingProxyType({})

    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch ``forward`` takes: the z-scored patches (B, C, D, H, W) as they are."""
        return x

    def patch_problem(self, patch_size: Sequence[int]) -> Any:
        """``None``: any patch the backbone takes works (a subclass with a constraint says otherwise)."""
        return None

    def export_backbone(self) -> OrderedDict[str, torch.Tensor]:
        """A detached copy of the backbone's state dict (loads strictly into ``build_resenc_unet(config)``;
        method heads are not part of it)."""
        return export_state(self.backbone)


def device_generator(x: torch.Tensor, generator: torch.Generator | None) -> torch.Generator:
    """The generator the transforms draw from: ``generator``, or one on ``x.device`` seeded from the
    global torch RNG (so ``torch.manual_seed`` before the call makes the draw reproducible).

    Example:
        >>> _ = torch.manual_seed(0); g = device_generator(torch.zeros(1), None)
    """
    if generator is not None:
        return generator
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=x.device).manual_seed(seed)


def rand(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 of ``shape``, drawn on the generator's device, returned on ``device``."""
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def randint_between(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in ``[low, high]`` (inclusive, elementwise; ``high < low`` gives ``low``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> v = randint_between(torch.tensor([1, 5]), torch.tensor([3, 5]), g); bool((v >= 1).all())
        True
    """
    low, high = low.long(), torch.maximum(high.long(), low.long())
    u = rand(low.shape, generator, low.device).double()
    return low + torch.floor(u * (high - low + 1).double()).long().clamp_max(high - low)


def box_mask(lo: torch.Tensor, hi: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Boolean (B, 1, D, H, W) mask of one box per sample: ``lo <= index < hi`` on every axis.

    Args:
        lo, hi: (B, 3) integer corners (voxels), ``hi`` exclusive.
        size: (D, H, W) voxels.

    Example:
        >>> box_mask(torch.tensor([[0, 1, 2]]), torch.tensor([[1, 3, 4]]), (2, 4, 4)).sum().item()
        4
    """
    parts = []
    for a in range(3):
        idx = torch.arange(size[a], device=lo.device)
        inside = (idx[None] >= lo[:, a, None]) & (idx[None] < hi[:, a, None])  # (B, n_a)
        shape = [lo.shape[0], 1, 1, 1, 1]
        shape[a + 2] = size[a]
        parts.append(inside.view(shape))
    return parts[0] & parts[1] & parts[2]


def decoder_features(backbone: nn.Module, skips: Sequence[torch.Tensor]) -> torch.Tensor:
    """The backbone decoder's last feature map (B, F0, D, H, W), before its segmentation head.

    Runs the same transposed convs and conv stages as ``backbone.decoder`` (so every decoder
    weight is trained) but skips ``decoder.seg_layers``, letting a method put its own head on top.
    """
    dec = backbone.decoder
    x = skips[-1]
    for s, (up, stage) in enumerate(zip(dec.transpconvs, dec.stages, strict=True)):
        x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
    return x


def export_state(backbone: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A detached copy of ``backbone.state_dict()`` (loads strictly into ``build_resenc_unet(config)``)."""
    return OrderedDict((k, v.detach().clone()) for k, v in backbone.state_dict().items())


def check_backbone(backbone: nn.Module, method: str) -> None:
    """Raise ``TypeError`` unless ``backbone`` looks like an s3d ResEnc U-Net."""
    for attr in ("config", "encoder", "decoder", "check_input"):
        if not hasattr(backbone, attr):
            raise TypeError(f"{method}: backbone must be an s3d ResEncUNet (build_resenc_unet), "
                            f"{type(backbone).__name__} has no {attr!r}")
