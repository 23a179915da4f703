"""Pre-training: sparse MAE (S3D) and the baseline methods on one loop (1 GPU, N with ``torchrun``, or CPU).

The public face of pre-training (``from s3d import pretrain``)::

    result = s3d.pretrain.run(data="prepared/", out="runs/s3d-b", recipe="s3d-b")  # or run(PretrainConfig(...))
    result.model, result.paths["backbone"], result.metrics["loss"]            # a JobResult, as finetune.run's
    s3d.pretrain.get_recipe("s3d-l").batch_size                              # 48
    s3d.pretrain.METHODS["mae"].default_recipe                               # 's3d-b'

- :mod:`~s3d.pretrain.recipes`: :class:`PretrainRecipe` and the table of named recipes;
- :mod:`~s3d.pretrain.methods`: the method registry (``mae``, ``mg``, ``vf``, ``voco``); what a method
  provides is :class:`PretrainMethod` (:mod:`s3d.runtime.method`);
- :mod:`~s3d.pretrain.config`: :class:`PretrainConfig`, the run's other settings;
- :mod:`~s3d.pretrain.loop`: :class:`Trainer` (``train_step``, ``after_step``, ``fit``); :mod:`~s3d.pretrain.job`:
  :func:`run`, as :func:`s3d.finetune.run`;
- :mod:`~s3d.pretrain.heldout` (validation loss, snapshots), :mod:`~s3d.pretrain.export` (the backbone's
  files at the end).

See ``docs/pretraining.md``.
"""

import warnings
from typing import Any

from s3d.pretrain.config import PretrainConfig
from s3d.pretrain.job import run
from s3d.pretrain.loop import StepRecord, Trainer
from s3d.pretrain.methods import METHODS, Method, build_backbone, build_method, get_method
from s3d.pretrain.recipes import RECIPES, PretrainRecipe, get_recipe, list_recipes, register_recipe
from s3d.runtime.method import MethodOutput, PatchProblem, PatchProblemError, PretrainMethod
from s3d.runtime.metrics import read_metrics
from s3d.runtime.result import JobResult

__all__ = [
    "METHODS",
    "RECIPES",
    "JobResult",
    "Method",
    "MethodOutput",
    "PatchProblem",
    "PatchProblemError",
    "PretrainConfig",
    "PretrainMethod",
    "PretrainRecipe",
    "StepRecord",
    "Trainer",
    "build_backbone",
    "build_method",
    "get_method",
    "get_recipe",
    "list_recipes",
    "read_metrics",
    "register_recipe",
    "run",
]


def __getattr__(name: str) -> Any:
    if name == "PretrainRun":
        warnings.warn("s3d.pretrain.PretrainRun is now s3d.pretrain.Trainer (as s3d.finetune.Trainer); its "
                      ".train() is .fit()", DeprecationWarning, stacklevel=2)
        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
