"""Building Primus: the private builder (DNA's initialisation) and the public constructor."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from s3d._dataclasses import config_from
from s3d.nn.primus.config import PrimusConfig, get_primus_config
from s3d.nn.primus.modules import Primus


def init_primus(model: Primus) -> None:
    """DNA's initialisation of Primus.

    Transformer: every Linear weight truncated-normal (std 0.02) with zero bias, the position
    embedding truncated-normal (std 0.02), then block i's attention and MLP output projections divided
    by sqrt(2 i) (i = 1..depth); LayerNorms 1/0, layer scales ``init_values``. Patch embedding and
    decoder: He-normal conv weights (LeakyReLU slope 0.01 gain, as nnU-Net), zero biases.
    """
    for m in model.eva.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if model.eva.pos_embed is not None:
        nn.init.trunc_normal_(model.eva.pos_embed, std=0.02)
    with torch.no_grad():
        for i, block in enumerate(model.eva.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
    for part in (model.down_projection, model.up_projection):
        for m in part.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _create_primus(cfg: PrimusConfig, checkpointing: bool) -> Primus:
    model = Primus(cfg)
    init_primus(model)
    model.checkpointing = checkpointing
    return model


def build_primus(
    config: str | PrimusConfig | dict[str, Any] = "primus_m",
    in_channels: int | None = None,
    num_classes: int | None = None,
    input_shape: int | tuple[int, int, int] | None = None,
    checkpointing: bool = False,
    **overrides: Any,
) -> Primus:
    """Build a Primus network from a preset name, a config or a config dict.

    Args:
        config: ``"primus_s"``, ``"primus_b"``, ``"primus_m"`` (the OpenMind checkpoints' size,
            152 M parameters at 160^3 with 2 classes), ``"primus_l"``, ``"primus_tiny"`` (tests, CPU),
            DNA's class names (``"PrimusM"``), a :class:`PrimusConfig` (e.g. ``model.config``) or its
            ``to_dict()``.
        in_channels: input channels; ``None`` keeps the config's (1 for presets).
        num_classes: output channels; ``None`` keeps the config's (2 for presets).
        input_shape: the training patch in voxels, an int (cube) or (D, H, W), divisible by the patch
            size (8 for the presets); ``None`` keeps the config's (160^3 for S/B/M/L). The network
            takes inputs of exactly this size.
        checkpointing: gradient checkpointing per transformer block (saves activation memory).
        **overrides: any other :class:`PrimusConfig` field, under its name or DNA's
            (``embed_dim``, ``eva_depth``, ``eva_numheads``, ``patch_embed_size``, ``drop_path_rate``,
            ``init_values``, ``scale_attn_inner``, ``input_channels``, ``output_channels``, ...).

    Returns:
        A :class:`~s3d.nn.primus.Primus` with DNA's initialisation (see :func:`init_primus`).

    Example:
        >>> net = build_primus("primus_tiny", in_channels=2, num_classes=3, input_shape=(32, 32, 16))
        >>> net(torch.zeros(1, 2, 32, 32, 16)).shape
        torch.Size([1, 3, 32, 32, 16])
    """
    cfg = config_from(config, PrimusConfig, get_primus_config)
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("input_shape", input_shape)):
        if value is not None:
            overrides[key] = value
    if overrides:
        cfg = cfg.replace(**overrides)
    return _create_primus(cfg, checkpointing)
