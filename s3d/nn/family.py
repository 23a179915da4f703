"""The model families by their configs: one place that maps a config (or its ``model_type``) to a builder.

``config.json`` names a family by ``model_type`` (``"ResEncUNet"``, ``"Primus"``); everything that
rebuilds a network from a config (loading, conversion) goes through :func:`build_from_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from s3d._triple import Triple
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


def patch_problem(config: ModelConfig, size: Sequence[int]) -> str:
    """Why a network of ``config`` cannot take a patch/tile of ``size`` (D, H, W) voxels, or ``""``.

    ResEnc U-Net: any size divisible by its total stride with more than one bottleneck voxel.
    Primus: exactly its training patch ``config.input_shape`` (one position embedding per token).

    Example:
        >>> patch_problem(PrimusConfig(input_shape=(64, 64, 64)), (64, 64, 64))
        ''
    """
    sizes = tuple(int(v) for v in size)
    if isinstance(config, PrimusConfig):
        if sizes == config.input_shape:
            return ""
        return (f"Primus takes exactly its training patch {config.input_shape} (config.json input_shape); use "
                f"that size, or fine-tune / load it with input_shape={sizes} (the position embedding is then "
                "interpolated)")
    from s3d.nn.resenc_unet import check_spatial_size

    return check_spatial_size(sizes, config.total_stride)


def fixed_patch(config: ModelConfig) -> Triple | None:
    """The one patch size (D, H, W voxels) the network takes (Primus: ``input_shape``), or ``None`` (ResEnc: any
    multiple of the total stride).

    Example:
        >>> fixed_patch(PrimusConfig(input_shape=(64, 64, 64)))
        (64, 64, 64)
    """
    return config.input_shape if isinstance(config, PrimusConfig) else None


def min_case_shape(config: ModelConfig) -> Triple | None:
    """The smallest case (D, H, W voxels) training needs unpadded: ResEnc's total stride; ``None`` for Primus (its
    windows are zero-padded to the training patch)."""
    return None if isinstance(config, PrimusConfig) else config.total_stride


def config_from_json(text: str, model_type_name: str = "ResEncUNet") -> ModelConfig:
    """A config of the family ``model_type_name`` (``"ResEncUNet"``/``"Primus"``) from its JSON.

    Example:
        >>> config_from_json(PrimusConfig().to_json(), "Primus").embed_dim
        864
    """
    try:
        cls = MODEL_TYPES[model_type_name]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type_name!r}; known: {sorted(MODEL_TYPES)}") from None
    return cls.from_json(text)


def encoder_decoder_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder, decoder) parameters of either family: what a decoder-only phase freezes and trains.

    ResEnc U-Net: ``encoder.*`` (stem included) / ``decoder.*`` without the encoder. Primus:
    ``down_projection.*`` + ``eva.*`` (absolute position embedding included) / ``up_projection.*``.
    """
    if isinstance(model, Primus):
        enc = [*model.down_projection.parameters(), *model.eva.parameters()]
        return enc, list(model.up_projection.parameters())
    encoder = list(model.encoder.parameters())  # type: ignore[union-attr]
    ids = {id(p) for p in encoder}
    return encoder, [p for p in model.decoder.parameters() if id(p) not in ids]  # type: ignore[union-attr]


def stem_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stem's parameters (ResEnc: ``encoder.stem``; Primus: the patch embedding ``down_projection``)."""
    if isinstance(model, Primus):
        return list(model.down_projection.parameters())
    return list(model.encoder.stem.parameters())  # type: ignore[union-attr]
