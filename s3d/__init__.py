"""s3d: sparse MAE pre-training (S3D) and fine-tuning of ResEnc U-Nets for 3D medical images.

The public API is what this module exports; everything else is private.
"""

from s3d import finetune, metrics, pretext
from s3d._version import __version__
from s3d.hub import LoadReport, list_models, load_pretrained, push_to_hub, save_pretrained
from s3d.infer import predict, sliding_window_predict
from s3d.nn import ResEncUNet, ResEncUNetConfig, build_resenc_unet
from s3d.sparse import MAEOutput, SparseMAEWrapper
from s3d.train.pretrain import PretrainConfig, pretrain
from s3d.train.recipes import PretrainRecipe, get_recipe, list_recipes

__all__ = [
    "LoadReport",
    "MAEOutput",
    "PretrainConfig",
    "PretrainRecipe",
    "ResEncUNet",
    "ResEncUNetConfig",
    "SparseMAEWrapper",
    "__version__",
    "build_resenc_unet",
    "finetune",
    "get_recipe",
    "list_models",
    "list_recipes",
    "load_pretrained",
    "metrics",
    "predict",
    "pretext",
    "pretrain",
    "push_to_hub",
    "save_pretrained",
    "sliding_window_predict",
]
