"""What a training job returns: :class:`JobResult` (the model, the files it wrote, its metrics).

``s3d.pretrain.run`` and ``s3d.finetune.run`` (and their ``Trainer.fit``) return the same type, so a
script treats both jobs alike::

    result = s3d.pretrain.run(data="prep/", out="runs/pre", recipe="s3d-b")
    result.model, result.paths["backbone"], result.metrics["loss"]
    result = s3d.finetune.run(data="Dataset001", out="runs/ft", pretrained=str(result.paths["backbone"]))
    result.model, result.paths["model"], result.metrics["final_dice"]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class JobResult:
    """The outcome of a training job (pre-training or fine-tuning).

    Attributes:
        model: the trained network: for pre-training the backbone (a ResEnc U-Net with the pre-trained
            weights, as :func:`s3d.load_pretrained` loads them from ``paths["backbone"]``), for fine-tuning
            the segmentation network.
        run_dir: the run folder.
        step: optimiser steps done (the last checkpoint's step when the job stopped early).
        finished: whether every step of the schedule ran (exports are written only then).
        paths: the files and folders the job wrote, by name: always ``"metrics"`` (``metrics.jsonl``) and
            ``"checkpoint"``; pre-training also ``"backbone"`` (s3d weights folder) and ``"nnssl"`` (nnssl
            checkpoint) when finished; fine-tuning ``"model"`` (the folder ``s3d predict -m`` takes).
        metrics: the last logged values: ``"loss"``; pre-training ``"val_loss"``; fine-tuning ``"val_dice"``
            and ``"final_dice"`` (those that were computed).
    """

    model: nn.Module
    run_dir: Path
    step: int
    finished: bool
    paths: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the model): ``{"run", "step", "finished", "paths", "metrics"}``."""
        return {"run": str(self.run_dir), "step": self.step, "finished": self.finished,
                "paths": {k: str(v) for k, v in self.paths.items()}, "metrics": dict(self.metrics)}

    # ---- the dict that s3d.pretrain.run returned before (deprecated) ----
    def _legacy(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "loss": self.metrics.get("loss", float("nan")),
                               "run": str(self.run_dir), "finished": self.finished}
        out.update({k: str(self.paths[k]) for k in ("backbone", "nnssl") if k in self.paths})
        return out

    def __getitem__(self, key: str) -> Any:
        warnings.warn(f"result[{key!r}]: training jobs return a JobResult now; use its attributes "
                      "(.step, .finished, .run_dir, .metrics['loss'], .paths['backbone'], .paths['nnssl'])",
                      DeprecationWarning, stacklevel=2)
        return self._legacy()[key]

    def __contains__(self, key: object) -> bool:
        warnings.warn("`key in result`: training jobs return a JobResult now; use result.paths / result.metrics",
                      DeprecationWarning, stacklevel=2)
        return key in self._legacy()

    # ---- the model that s3d.finetune.run returned before (deprecated) ----
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        warnings.warn("result(x): training jobs return a JobResult now; call result.model(x)",
                      DeprecationWarning, stacklevel=2)
        return self.__dict__["model"](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only names a JobResult does not have: the model's
        model = self.__dict__.get("model")
        if name.startswith("_") or model is None or not hasattr(model, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(f"result.{name}: training jobs return a JobResult now; use result.model.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(model, name)
