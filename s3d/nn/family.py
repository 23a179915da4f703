"""The model families by their configs: one place that maps a config (or its ``model_type``) to a builder.

``config.json`` names a family by ``model_type`` (``"ResEncUNet"``, ``"Primus"``); everything that
rebuilds a network from a config (loading, conversion) goes through :func:`build_from_config`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from s3d.nn.config import ResEncUNetConfig
from s3d.nn.primus import Primus, PrimusConfig, build_primus
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet

ModelConfig = ResEncUNetConfig | PrimusConfig
Model = ResEncUNet | Primus

#: ``model_type`` in config.json -> the config class of that family.
MODEL_TYPES: dict[str, type[ResEncUNetConfig] | type[PrimusConfig]] = {
    "ResEncUNet": ResEncUNetConfig,
    "Primus": PrimusConfig,
}


def model_type(config: ModelConfig) -> str:
    """The family name of a config (``"ResEncUNet"`` or ``"Primus"``), as written into config.json.

    Example:
        >>> model_type(PrimusConfig())
        'Primus'
    """
    for name, cls in MODEL_TYPES.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"expected a ResEncUNetConfig or PrimusConfig, got {type(config).__name__}")


def config_of(model: nn.Module) -> ModelConfig:
    """The ``.config`` of a model of either family; ``TypeError`` naming the class otherwise.

    Example:
        >>> config_of(build_primus("primus_tiny")).name
        'primus_tiny'
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ResEncUNetConfig | PrimusConfig):
        raise TypeError(f"model: expected a ResEncUNet or Primus (with a .config), got {type(model).__name__}")
    return cfg


def build_from_config(config: ModelConfig, **overrides: Any) -> Model:
    """Build the network of a config of either family (fresh weights), with field overrides.

    Example:
        >>> build_from_config(PrimusConfig(), num_classes=3).config.num_classes
        3
    """
    if isinstance(config, PrimusConfig):
        return build_primus(config, **overrides)
    if isinstance(config, ResEncUNetConfig):
        return build_resenc_unet(config, **overrides)
    raise TypeError(f"expected a ResEncUNetConfig or PrimusConfig, got {type(config).__name__}")
