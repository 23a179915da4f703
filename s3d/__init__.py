"""s3d: sparse MAE pre-training (S3D) and fine-tuning of ResEnc U-Nets (and Primus ViTs) for 3D medical images.

The public API is what this module exports; everything else is private. The jobs are namespaces
with a ``run``: ``s3d.pretrain.run(...)``, ``s3d.finetune.run(...)``; prediction is ``s3d.predict``.

The names are imported when first used (PEP 562), so ``import s3d`` and the ``s3d`` command start
without importing torch: ``s3d --help`` is fast, and Ctrl-C while a command starts up is one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from s3d._version import __version__

#: public name -> the module that defines it (a module of its own where the two are the same)
_EXPORTS: dict[str, str] = {
    "augment": "s3d.augment",
    "finetune": "s3d.finetune",
    "metrics": "s3d.metrics",
    "pretext": "s3d.pretext",
    "pretrain": "s3d.pretrain",
    "LoadReport": "s3d.hub",
    "list_models": "s3d.hub",
    "load_pretrained": "s3d.hub",
    "push_to_hub": "s3d.hub",
    "save_pretrained": "s3d.hub",
    "predict": "s3d.infer",
    "sliding_window_predict": "s3d.infer",
    "Primus": "s3d.nn",
    "PrimusConfig": "s3d.nn",
    "ResEncUNet": "s3d.nn",
    "ResEncUNetConfig": "s3d.nn",
    "build_primus": "s3d.nn",
    "build_resenc_unet": "s3d.nn",
    "MAEOutput": "s3d.sparse",
    "SparseMAEWrapper": "s3d.sparse",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 's3d' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"s3d.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from s3d import augment, finetune, metrics, pretext, pretrain
    from s3d.hub import LoadReport, list_models, load_pretrained, push_to_hub, save_pretrained
    from s3d.infer import predict, sliding_window_predict
    from s3d.nn import Primus, PrimusConfig, ResEncUNet, ResEncUNetConfig, build_primus, build_resenc_unet
    from s3d.sparse import MAEOutput, SparseMAEWrapper
