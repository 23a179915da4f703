"""The model families: the ResEnc U-Net (dense, or masked with ``forward(x, mask)``) and Primus (``s3d.nn.primus``)."""

from s3d.nn.config import CONFIGS, ResEncUNetConfig, get_config
from s3d.nn.masked import expand_keep, masked_instance_norm, stage_keeps
from s3d.nn.primus import PRIMUS_CONFIGS, Primus, PrimusConfig, build_primus, get_primus_config
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet, check_spatial_size

__all__ = [
    "CONFIGS",
    "PRIMUS_CONFIGS",
    "Primus",
    "PrimusConfig",
    "ResEncUNet",
    "ResEncUNetConfig",
    "build_primus",
    "build_resenc_unet",
    "check_spatial_size",
    "expand_keep",
    "get_config",
    "get_primus_config",
    "masked_instance_norm",
    "stage_keeps",
]
