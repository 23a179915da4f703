"""The residual-encoder U-Net of nnU-Net ("ResEnc"), the backbone of the S3D paper.

Order of this file: modules, the private builder, the public constructor.
State-dict keys equal the canonical keys of dynamic-network-architectures'
``ResidualEncoderUNet`` (without its ``all_modules`` / ``decoder.encoder`` aliases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from s3d._dataclasses import config_from
from s3d.nn.blocks import StackedConvBlocks, StackedResidualBlocks
from s3d.nn.config import ResEncUNetConfig, get_config

Keeps = Sequence[torch.Tensor] | None


class ResidualEncoder(nn.Module):
    """Stem (one conv-norm-act at input resolution) followed by ``n_stages`` residual stages."""

    def __init__(self, cfg: ResEncUNetConfig) -> None:
        super().__init__()
        #: the architecture (the model's own config object); its ``stage_strides()`` place every stage
        self.config = cfg
        stem_channels = cfg.stem_channels or cfg.features_per_stage[0]
        self.stem = StackedConvBlocks(cfg, 1, cfg.in_channels, stem_channels, cfg.kernel_sizes[0])
        stages, cin = [], stem_channels
        for s in range(cfg.n_stages):
            stages.append(
                StackedResidualBlocks(cfg, cfg.n_blocks_per_stage[s], cin, cfg.features_per_stage[s],
                                      cfg.kernel_sizes[s], cfg.strides[s])
            )
            cin = cfg.features_per_stage[s]
        self.stages = nn.ModuleList(stages)
        self.checkpointing = False

    def forward(self, x: torch.Tensor, keeps: Keeps = None) -> list[torch.Tensor]:
        """Encode ``x`` (B, C, D, H, W) into one feature map per stage (highest resolution first).

        Args:
            keeps: ``None`` for the dense network, or a mask plan's ``keeps``
                (:class:`s3d.sparse.plan.MaskPlan`: input resolution, then one per stage; 1 = visible).
                With masks, the input is zeroed at masked voxels and every layer re-masks.
        """
        if keeps is not None:
            if len(keeps) != len(self.stages) + 1:
                raise ValueError(f"keeps: expected {len(self.stages) + 1} masks (input + one per stage), "
                                 f"got {len(keeps)}")
            x = x * keeps[0].to(x.dtype)
            x = self.stem(x, keeps[0])
        else:
            x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            keep = None if keeps is None else keeps[s + 1]
            if self.checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(stage, x, keep, use_reentrant=False)
            else:
                x = stage(x, keep)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, conv-norm-act, 1x1x1 heads.

    A segmentation head exists at every decoder resolution (as in nnU-Net) so that weights
    trained with and without deep supervision load into each other.
    """

    def __init__(self, cfg: ResEncUNetConfig) -> None:
        super().__init__()
        feats, n = cfg.features_per_stage, cfg.n_stages
        self.deep_supervision = cfg.deep_supervision
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n):
            below, skip = feats[-s], feats[-(s + 1)]
            stride = cfg.strides[-s]
            transpconvs.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=cfg.conv_bias))
            stages.append(StackedConvBlocks(cfg, cfg.n_conv_per_stage_decoder[s - 1], 2 * skip, skip,
                                            cfg.kernel_sizes[-(s + 1)]))
            seg_layers.append(nn.Conv3d(skip, cfg.num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decode encoder features (highest resolution first) into logits (B, num_classes, D, H, W).

        With deep supervision: a list of logits, highest resolution first.
        """
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == last:
                outputs.append(self.seg_layers[-1](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]


class ResEncUNet(nn.Module):
    """3D U-Net with a residual encoder (nnU-Net ResEnc presets), dense or masked.

    Build it with :func:`s3d.build_resenc_unet`. ``forward(x, mask=None)`` takes
    x: (B, in_channels, D, H, W) with every spatial size divisible by
    ``config.total_stride`` and returns logits (B, num_classes, D, H, W).
    """

    def __init__(self, config: ResEncUNetConfig, checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResidualEncoder(config)
        self.decoder = UNetDecoder(config)
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing per encoder stage (less memory, about one extra encoder forward)."""
        return self.encoder.checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self.encoder.checkpointing = bool(value)

    @property
    def deep_supervision(self) -> bool:
        """Whether ``forward`` returns logits at every decoder resolution."""
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = bool(value)
        self.config.deep_supervision = bool(value)

    # ---- input checks --------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` is not (B, in_channels, D, H, W) of a size the network takes."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a 5D tensor (B, C, D, H, W), got {shape}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected {cfg.in_channels} input channel(s) (B, {cfg.in_channels}, D, H, W), "
                f"got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        problems = check_spatial_size(tuple(x.shape[2:]), cfg.total_stride)
        if problems:
            raise ValueError(problems)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``x`` (B, C, D, H, W).

        Args:
            mask: optional keep mask (1 = visible, 0 = masked), (B, 1, d, h, w) on any grid that
                tiles the input (e.g. a 32^3-voxel block grid). The encoder then runs masked
                (input zeroed, every conv re-masked, norm statistics over visible voxels) and the
                decoder sees the masked features; the mask goes down as one
                :class:`s3d.sparse.plan.MaskPlan`, as in the MAE wrapper. ``None``: the dense network.
        """
        self.check_input(x)
        keeps = None
        if mask is not None:
            from s3d.sparse.plan import MaskPlan

            if mask.dim() != 5 or mask.shape[0] != x.shape[0] or mask.shape[1] != 1:
                raise ValueError(f"mask: expected (B={x.shape[0]}, 1, d, h, w), got {tuple(mask.shape)}")
            keeps = MaskPlan.build(mask, x.shape[2:], self.config.stage_strides()).keeps
        return self.decoder(self.encoder(x, keeps))


def check_spatial_size(size: Sequence[int], total_stride: Sequence[int]) -> str:
    """Return an error message if ``size`` (voxels) cannot pass the network, else ``""``."""
    bad = [a for a, (n, s) in enumerate(zip(size, total_stride)) if n % s != 0 or n < s]
    if bad:
        hints = []
        for a in bad:
            n, s = size[a], total_stride[a]
            lo, hi = max(s, n // s * s), max(s, math.ceil(n / s) * s)
            hints.append(f"axis {a}: {n} -> {lo}" + (f" or {hi}" if hi != lo else ""))
        return (
            f"spatial size {tuple(size)} is not divisible by the network's total stride "
            f"{tuple(total_stride)}; crop or pad to a multiple ({'; '.join(hints)})"
        )
    bottleneck = [n // s for n, s in zip(size, total_stride)]
    if math.prod(bottleneck) <= 1:
        want = tuple(2 * s if a == 0 else n for a, (n, s) in enumerate(zip(size, total_stride)))
        return (
            f"spatial size {tuple(size)} gives a 1x1x1 bottleneck, where instance norm is undefined; "
            f"use at least two bottleneck voxels, e.g. {want}"
        )
    return ""


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's initialisation: He-normal conv weights (LeakyReLU gain), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _create_resenc_unet(cfg: ResEncUNetConfig, checkpointing: bool) -> ResEncUNet:
    model = ResEncUNet(cfg, checkpointing=checkpointing)
    init_he(model, cfg.negative_slope)
    return model


def build_resenc_unet(
    config: str | ResEncUNetConfig | dict[str, Any] = "resenc_l",
    in_channels: int | None = None,
    num_classes: int | None = None,
    deep_supervision: bool | None = None,
    checkpointing: bool = False,
    **overrides: Any,
) -> ResEncUNet:
    """Build a ResEnc U-Net from a preset name, a config or a config dict.

    Args:
        config: ``"resenc_l"`` (the paper's backbone, 102.35 M parameters), ``"small"``, ``"tiny"``,
            a :class:`ResEncUNetConfig` (e.g. ``model.config``) or its ``to_dict()``.
        in_channels: input channels; ``None`` keeps the config's value (1 for presets).
        num_classes: output channels; ``None`` keeps the config's value (2 for presets).
        deep_supervision: return logits at every decoder resolution; ``None`` keeps the config's.
        checkpointing: gradient checkpointing per encoder stage (saves activation memory).
        **overrides: any other :class:`ResEncUNetConfig` field, e.g. ``features_per_stage=(...)``.

    Returns:
        A :class:`ResEncUNet` with nnU-Net's He initialisation.

    Example:
        >>> net = build_resenc_unet("tiny", in_channels=2, num_classes=3)
        >>> net(torch.zeros(1, 2, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """
    cfg = config_from(config, ResEncUNetConfig, get_config)
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes),
                       ("deep_supervision", deep_supervision)):
        if value is not None:
            overrides[key] = value
    if overrides:
        cfg = cfg.replace(**overrides)
    return _create_resenc_unet(cfg, checkpointing)
