"""Pre-training: sparse MAE (S3D) and the baseline methods on one loop (1 GPU, N with ``torchrun``, or CPU).

The public face of pre-training (``from s3d import pretrain``)::

    s3d.pretrain.run(data="prepared/", out="runs/s3d-b", recipe="s3d-b")      # or run(PretrainConfig(...))
    s3d.pretrain.get_recipe("s3d-l").batch_size                              # 48
    s3d.pretrain.METHODS["mae"].default_recipe                               # 's3d-b'

- :mod:`~s3d.pretrain.recipes`: :class:`PretrainRecipe` and the table of named recipes;
- :mod:`~s3d.pretrain.methods`: the method registry (``mae``, ``mg``, ``vf``, ``voco``);
- :mod:`~s3d.pretrain.config`: :class:`PretrainConfig`, the run's other settings;
- :mod:`~s3d.pretrain.loop`: :class:`PretrainRun` and :func:`run`.

See ``docs/pretraining.md``.
"""

from s3d.pretrain.config import PretrainConfig
from s3d.pretrain.loop import PretrainRun, run
from s3d.pretrain.methods import METHODS, Method, build_method, get_method
from s3d.pretrain.recipes import RECIPES, PretrainRecipe, get_recipe, list_recipes, register_recipe
from s3d.runtime.metrics import read_metrics

__all__ = [
    "METHODS",
    "RECIPES",
    "Method",
    "PretrainConfig",
    "PretrainRecipe",
    "PretrainRun",
    "build_method",
    "get_method",
    "get_recipe",
    "list_recipes",
    "read_metrics",
    "register_recipe",
    "run",
]
