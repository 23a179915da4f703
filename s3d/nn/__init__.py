"""ResEnc U-Net building blocks and the model (dense, or masked with ``forward(x, mask)``)."""

from s3d.nn.config import CONFIGS, ResEncUNetConfig, get_config
from s3d.nn.masked import expand_keep, masked_instance_norm, stage_keeps
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet, check_spatial_size

__all__ = [
    "CONFIGS",
    "ResEncUNet",
    "ResEncUNetConfig",
    "build_resenc_unet",
    "check_spatial_size",
    "expand_keep",
    "get_config",
    "masked_instance_norm",
    "stage_keeps",
]
