"""The pre-training job's entry point, :func:`run`: the same arguments (``data``, ``out``) and the same result
(:class:`~s3d.runtime.result.JobResult`) as :func:`s3d.finetune.run`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from s3d.pretrain.config import PretrainConfig
from s3d.pretrain.loop import Trainer
from s3d.runtime.distributed import cleanup
from s3d.runtime.result import JobResult


def run(config: PretrainConfig | str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None,
        /, **fields: Any) -> JobResult:
    """Run (or resume) pre-training: ``run(data=..., out=..., recipe=...)`` or ``run(PretrainConfig(...))``.

    The same arguments and result as :func:`s3d.finetune.run`: the data (``data``, here a prepared
    directory) and the run folder (``out``), positional or by keyword, and a
    :class:`~s3d.runtime.result.JobResult`.

    Args:
        config: the run's settings (``fields`` override its fields), or the prepared data folder (as ``data``).
        run_dir: the run folder (as ``out``), after a data folder.
        **fields: :class:`PretrainConfig` fields (``data``, ``out``, ``recipe``, ``steps``, ...).

    Returns:
        :class:`~s3d.runtime.result.JobResult`: ``.model`` (the pre-trained backbone), ``.paths["backbone"]``
        and ``.paths["nnssl"]`` (when finished), ``.metrics["loss"]``, ``.step``, ``.finished``.

    Under ``torchrun`` every process calls this; rank 0 writes the run directory.

    Example:
        >>> result = s3d.pretrain.run(data="prep/", out="runs/tiny", recipe="s3d-b", architecture="tiny", steps=20,
        ...                           batch_size=2, patch_size=(32, 32, 32), method_kwargs={"block_size": 16})
        >>> result.step, result.paths["backbone"]
        (20, PosixPath('runs/tiny/backbone'))
    """
    if not isinstance(config, PretrainConfig) and config is not None:
        if "data" in fields:
            raise TypeError("run: the data folder given twice (positional and data=)")
        fields["data"], config = str(config), None
    if run_dir is not None:
        if "out" in fields:
            raise TypeError("run: the run folder given twice (positional and out=)")
        fields["out"] = str(run_dir)
    cfg = dataclasses.replace(config, **fields) if config is not None else PretrainConfig(**fields)
    try:
        return Trainer(cfg).fit()
    finally:
        cleanup()
