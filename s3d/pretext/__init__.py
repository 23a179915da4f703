"""Other pre-training tasks on the same ResEnc U-Net backbone: Models Genesis, VolumeFusion, VoCo.

Each method is an ``nn.Module`` around the backbone whose ``forward(x)`` takes a z-scored batch
(B, C, D, H, W) and returns a :class:`PretextOutput` with a scalar ``loss``, and whose
``export_backbone()`` returns a plain ResEnc U-Net state dict (method heads are not part of it).
Importing this package registers the recipes ``"mg"``, ``"vf"`` and ``"voco"``.

Example:
    >>> from s3d.nn import build_resenc_unet
    >>> method = build("mg", build_resenc_unet("tiny", in_channels=1, num_classes=1))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from s3d.pretext._common import PretextOutput
from s3d.pretext.genesis import ModelsGenesis
from s3d.pretext.recipes import BASELINE_RECIPES
from s3d.pretext.voco import VoCo
from s3d.pretext.volume_fusion import VolumeFusion

#: Method name -> class (the names of ``PretrainRecipe.method``).
METHODS: dict[str, type[nn.Module]] = {"mg": ModelsGenesis, "vf": VolumeFusion, "voco": VoCo}


def build(name: str, backbone: nn.Module, **kwargs: Any) -> nn.Module:
    """The pre-training module of method ``name`` around ``backbone``.

    Args:
        name: ``"mg"``, ``"vf"`` or ``"voco"``.
        backbone: the ResEnc U-Net to pre-train (``build_resenc_unet(..., num_classes=1)``).
        **kwargs: the method's keyword arguments (a recipe's ``method_kwargs``).

    Example:
        >>> from s3d.nn import build_resenc_unet
        >>> build("voco", build_resenc_unet("tiny", in_channels=1, num_classes=1), crop_size=32).num_targets
        5
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pre-training method {name!r}; available: {sorted(METHODS)} "
                         f"(and 'mae' in s3d.sparse)") from None
    try:
        return cls(backbone, **kwargs)
    except TypeError as e:
        raise TypeError(f"method {name!r}: bad method_kwargs {sorted(kwargs)} ({e})") from e


__all__ = ["BASELINE_RECIPES", "METHODS", "ModelsGenesis", "PretextOutput", "VoCo", "VolumeFusion", "build"]
