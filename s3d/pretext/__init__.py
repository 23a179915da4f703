"""Other pre-training tasks on the same ResEnc U-Net backbone: Models Genesis, VolumeFusion, VoCo.

Each method is a :class:`PretextMethod` (an ``nn.Module`` around the backbone that provides
:class:`s3d.runtime.method.PretrainMethod`) whose ``forward(x)`` takes a z-scored batch (B, C, D, H, W)
and returns a :class:`PretextOutput` with a scalar ``loss``, and whose ``export_backbone()`` returns a
plain ResEnc U-Net state dict (method heads are not part of it).
They are registered, with S3D's sparse MAE, in :data:`s3d.pretrain.methods.METHODS`; their recipes
(``"mg"``, ``"vf"``, ``"voco"``) are rows of :data:`s3d.pretrain.recipes.RECIPES`.

Example:
    >>> from s3d.nn import build_resenc_unet
    >>> method = ModelsGenesis(build_resenc_unet("tiny", in_channels=1, num_classes=1))
"""

from __future__ import annotations

from s3d.pretext._common import PretextMethod, PretextOutput
from s3d.pretext.genesis import ModelsGenesis
from s3d.pretext.voco import VoCo
from s3d.pretext.volume_fusion import VolumeFusion

__all__ = ["ModelsGenesis", "PretextMethod", "PretextOutput", "VoCo", "VolumeFusion"]
