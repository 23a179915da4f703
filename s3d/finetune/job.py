"""The fine-tuning job's entry point, :func:`run`: the same arguments (``data``, ``out``) and the same result
(:class:`~s3d.runtime.result.JobResult`) as :func:`s3d.pretrain.run`."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

from s3d.finetune.config import FinetuneConfig
from s3d.finetune.trainer import Trainer
from s3d.nn.resenc_unet import ResEncUNet
from s3d.runtime.distributed import cleanup
from s3d.runtime.result import JobResult

#: the keywords :func:`run` took before it had the same names as :func:`s3d.pretrain.run` (deprecated)
_OLD_KEYWORDS = {"dataset": "data", "out_dir": "out"}


def run(config: FinetuneConfig | str | os.PathLike[str] | None = None, out: str | os.PathLike[str] | None = None,
        /, *, model: ResEncUNet | None = None, **fields: Any) -> JobResult:
    """Fine-tune on an nnU-Net v2 raw dataset: ``run(data=..., out=..., **fields)`` or ``run(FinetuneConfig(...))``.

    The same arguments and result as :func:`s3d.pretrain.run`: the data (``data``, here the nnU-Net v2 raw
    dataset folder) and the run folder (``out``), positional or by keyword, and a
    :class:`~s3d.runtime.result.JobResult`. The old keywords ``dataset=`` and ``out_dir=`` still work with a
    ``DeprecationWarning``; so does using the result as the model (``result(x)``, ``result.state_dict()``).

    Args:
        config: a :class:`FinetuneConfig` (``fields`` override its fields), or the dataset folder (as ``data``).
        out: the run folder, after a dataset folder.
        model: start from this network instead of :func:`~s3d.finetune.prepare_model`.
        **fields: ``data``, ``out`` and the other :class:`FinetuneConfig` fields (``pretrained``, ``steps``, ...).

    Returns:
        :class:`~s3d.runtime.result.JobResult`: ``.model`` (the trained network), ``.paths["model"]`` (the folder
        ``s3d predict -m`` takes), ``.paths["metrics"]``, ``.paths["checkpoint"]``, ``.metrics`` (``"loss"``,
        ``"val_dice"``, ``"final_dice"``), ``.step``, ``.finished``.

    Raises:
        TypeError: no dataset or run folder, or one given twice.

    Under ``torchrun`` every process calls this (``torchrun --nproc_per_node N -m s3d finetune ...``);
    rank 0 writes the run folder, and the process group is left at the end.

    Example:
        >>> result = s3d.finetune.run(data="Dataset001_Brain", out="runs/brain", pretrained="s3d-b",
        ...                           schedule="best", steps=37_500, warmup_steps=12_500)
        >>> result.paths["model"], result.metrics["final_dice"]
        (PosixPath('runs/brain/model'), 0.91)
    """
    for old, new in _OLD_KEYWORDS.items():
        if old in fields:
            warnings.warn(f"s3d.finetune.run({old}=...) is deprecated: use {new}=... (as s3d.pretrain.run)",
                          DeprecationWarning, stacklevel=2)
            if new in fields:
                raise TypeError(f"run: give {new}= or the deprecated {old}=, not both")
            fields[new] = fields.pop(old)
    if not isinstance(config, FinetuneConfig) and config is not None:
        if "data" in fields:
            raise TypeError("run: the dataset folder given twice (positional and data=)")
        fields["data"], config = config, None
    if out is not None:
        if "out" in fields:
            raise TypeError("run: the run folder given twice (positional and out=)")
        fields["out"] = out
    for new, name in (("data", "dataset"), ("out", "out_dir")):
        if new in fields:
            fields[name] = str(fields.pop(new))
    if config is not None:
        cfg = dataclasses.replace(config, **fields)
    else:
        missing = [k for k, name in (("data", "dataset"), ("out", "out_dir")) if name not in fields]
        if missing:
            raise TypeError(f"run: give a FinetuneConfig, or data= (the dataset folder) and out= (the run folder); "
                            f"missing {', '.join(missing)}")
        cfg = FinetuneConfig(**fields)
    try:
        return Trainer(cfg, model=model).fit()
    finally:
        cleanup()
