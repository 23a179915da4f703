"""Primus, the second model family: a 3D ViT (patch embedding, timm's EVA blocks, patch decoder).

Files in timm's order: ``config`` (the dataclass and the presets), ``modules`` (the network),
``convert`` (foreign checkpoints onto our keys: nnssl prefixes, position-embedding resizing,
architecture inference), ``build`` (the private builder and :func:`build_primus`).
"""

from s3d.nn.primus.build import build_primus, init_primus
from s3d.nn.primus.config import PRIMUS_CONFIGS, PrimusConfig, get_primus_config
from s3d.nn.primus.modules import Primus, rope_table

__all__ = [
    "PRIMUS_CONFIGS",
    "Primus",
    "PrimusConfig",
    "build_primus",
    "get_primus_config",
    "init_primus",
    "rope_table",
]
