"""s3d: sparse MAE pre-training (S3D) and fine-tuning of ResEnc U-Nets (and Primus ViTs) for 3D medical images.

The public API is what this module exports; everything else is private. The jobs are namespaces
with a ``run``: ``s3d.pretrain.run(...)``, ``s3d.finetune.run(...)``; prediction is ``s3d.predict``.
"""

from s3d import augment, finetune, metrics, pretext, pretrain
from s3d._version import __version__
from s3d.hub import LoadReport, list_models, load_pretrained, push_to_hub, save_pretrained
from s3d.infer import predict, sliding_window_predict
from s3d.nn import Primus, PrimusConfig, ResEncUNet, ResEncUNetConfig, build_primus, build_resenc_unet
from s3d.sparse import MAEOutput, SparseMAEWrapper

__all__ = [
    "LoadReport",
    "MAEOutput",
    "Primus",
    "PrimusConfig",
    "ResEncUNet",
    "ResEncUNetConfig",
    "SparseMAEWrapper",
    "__version__",
    "augment",
    "build_primus",
    "build_resenc_unet",
    "finetune",
    "list_models",
    "load_pretrained",
    "metrics",
    "predict",
    "pretext",
    "pretrain",
    "push_to_hub",
    "save_pretrained",
    "sliding_window_predict",
]
