"""The pre-training methods: one registry in which S3D's sparse MAE is a method like the baselines.

A method is an ``nn.Module`` built around a backbone that provides :class:`s3d.runtime.method.PretrainMethod`
(its batch preparation, its patch check, a ``forward`` returning the loss and its weight, the run-time
choices it made, ``export_backbone()``); that protocol is all the loop knows of it, so a new method (or a
new model family) is a row here and needs no change to the loop.

| name | module | default recipe |
|---|---|---|
| ``mae`` | :class:`s3d.sparse.SparseMAEWrapper` (S3D); for a Primus :class:`s3d.sparse.PrimusMAEWrapper` | ``s3d-b`` |
| ``mg`` | :class:`s3d.pretext.ModelsGenesis` | ``mg`` |
| ``vf`` | :class:`s3d.pretext.VolumeFusion` | ``vf`` |
| ``voco`` | :class:`s3d.pretext.VoCo` | ``voco`` |

Example:
    >>> from s3d.nn import build_resenc_unet
    >>> mae = build_method("mae", build_resenc_unet("tiny", in_channels=1, num_classes=1), block_size=16)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from s3d.pretext import ModelsGenesis, VoCo, VolumeFusion
from s3d.runtime.method import PretrainMethod, check_method
from s3d.sparse import PrimusMAEWrapper, SparseMAEWrapper


@dataclass(frozen=True)
class Method:
    """A pre-training method: its module class, the recipe ``s3d pretrain --method NAME`` starts from,
    a one-line description, and its module for a Primus backbone (``None``: ResEnc U-Net only)."""

    name: str
    module: type[nn.Module]
    default_recipe: str
    description: str
    primus_module: type[nn.Module] | None = None


#: Method name -> :class:`Method` (the names of ``PretrainRecipe.method`` and ``s3d pretrain --method``).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("mae", SparseMAEWrapper, "s3d-b", "sparse masked autoencoder (S3D, the paper's method)",
           PrimusMAEWrapper),
    Method("mg", ModelsGenesis, "mg", "Models Genesis (restoration of distorted volumes)"),
    Method("vf", VolumeFusion, "vf", "VolumeFusion (segment which of two volumes each voxel comes from)"),
    Method("voco", VoCo, "voco", "VoCo (volume contrast: predict crop overlaps)"),
)}


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pre-training method {name!r}; available: {sorted(METHODS)}") from None


def build_backbone(architecture: str, patch_size: Sequence[int] | None = None) -> nn.Module:
    """The network a recipe pre-trains: the ``architecture`` preset with 1 input channel and 1 output (the
    reconstruction), deep supervision off. A ResEnc U-Net preset (:func:`s3d.build_resenc_unet`) or a Primus
    one (``primus_m``, ..., :func:`s3d.build_primus`, whose ``input_shape`` is ``patch_size`` (D, H, W
    voxels) when given); another model family adds its presets here, not in the loop.

    Example:
        >>> build_backbone("tiny").config.num_classes
        1
        >>> build_backbone("primus_tiny", (16, 16, 16)).config.input_shape
        (16, 16, 16)
    """
    from s3d.nn import build_resenc_unet
    from s3d.nn.primus import PRIMUS_CONFIGS, build_primus

    if architecture in PRIMUS_CONFIGS:
        shape = {} if patch_size is None else {"input_shape": tuple(patch_size)}
        return build_primus(architecture, in_channels=1, num_classes=1, **shape)
    return build_resenc_unet(architecture, in_channels=1, num_classes=1, deep_supervision=False)


def build_method(name: str, backbone: nn.Module, **kwargs: Any) -> PretrainMethod:
    """The pre-training module of method ``name`` around ``backbone``.

    Args:
        name: a key of :data:`METHODS`.
        backbone: the network to pre-train (:func:`build_backbone`): a ResEnc U-Net, or a Primus for a method
            with a ``primus_module`` (``mae``: :class:`s3d.sparse.PrimusMAEWrapper`, which drops the ResEnc-only
            keyword arguments of a ResEnc recipe with a warning naming them).
        **kwargs: the method's keyword arguments (a recipe's ``method_kwargs``).

    Raises:
        ValueError: an unknown method or keyword arguments it does not take.
        TypeError: the registered module does not provide :class:`~s3d.runtime.method.PretrainMethod`.

    Example:
        >>> from s3d.nn import build_resenc_unet
        >>> build_method("voco", build_resenc_unet("tiny", in_channels=1, num_classes=1), crop_size=32).num_targets
        5
    """
    from s3d.nn.primus import Primus

    method = get_method(name)
    module_cls = method.module
    if isinstance(backbone, Primus):
        if method.primus_module is None:
            raise ValueError(f"method {name!r} pre-trains a ResEnc U-Net only; for a Primus use method 'mae'")
        module_cls = method.primus_module
        dropped = sorted(k for k in kwargs if k in getattr(module_cls, "RESENC_ONLY_KWARGS", ()))
        if dropped:
            warnings.warn(f"method {name!r} on a Primus: ignoring the ResEnc-only method_kwargs {dropped} (the "
                          "token is the mask cell)", stacklevel=2)
            kwargs = {k: v for k, v in kwargs.items() if k not in dropped}
    try:
        module = module_cls(backbone, **kwargs)
    except TypeError as e:
        raise ValueError(f"method {name!r}: bad method_kwargs {sorted(kwargs)} ({e})") from e
    return check_method(module, name)
