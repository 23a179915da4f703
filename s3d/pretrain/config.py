"""Settings of one pre-training run besides the recipe's own numbers (:class:`PretrainConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from s3d._dataclasses import from_dict_strict, jsonable
from s3d.pretrain.recipes import PretrainRecipe, get_recipe
from s3d.runtime.device import AMP_MODES


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs besides the recipe's own numbers.

    Attributes:
        data: prepared directory (holds ``manifest.json``, see :func:`s3d.data.scan.prepare`).
        out: run directory (checkpoints, metrics, snapshots, exports).
        recipe: recipe name (``"s3d-b"``, ``"s3d-l"``, ``"mg"``, ...) or a :class:`PretrainRecipe`.
        architecture: backbone preset overriding the recipe's (``"tiny"`` for tests/demos).
        steps / batch_size / patch_size / lr: overrides of the recipe (``batch_size`` is global:
            all processes together; ``patch_size`` in voxels (D, H, W)).
        method_kwargs: merged into the recipe's ``method_kwargs``.
        seed: run seed (model init, data, augmentation, masks).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: ``"auto"`` (bf16 on GPUs that support it, else fp16; off on CPU), ``"bf16"``, ``"fp16"``
            or ``"off"`` (see :mod:`s3d.runtime.device`).
        channels_last: channels_last_3d memory format for model and input (measure: can be slower
            with InstanceNorm3d).
        compile: wrap the training module in ``torch.compile``.
        workers / prefetch_factor: DataLoader worker processes and batches prefetched per worker.
        augment: apply the paper's spatial augmentation (:meth:`s3d.augment.AugmentConfig.pretraining`).
        val_fraction: fraction of subjects held out for the validation loss.
        val_every / val_max_cases: validation interval (steps) and number of held-out images used.
        snapshot_every: PNG reconstruction snapshot interval (steps); 0 = off.
        checkpoint_every: checkpoint interval (steps); a checkpoint is also written at the end.
        log_every: metrics line interval (steps).
        tensorboard: also log to TensorBoard (``RUN/tb``; needs the ``tensorboard`` package).
        resume: continue from ``RUN/checkpoint_latest.pt``.
        stop_after: stop after this global step as if killed (no export); for time-limited job slots.
        progress: show a progress bar (rank 0).

    Example:
        >>> PretrainConfig(data="prep", out="runs/b", recipe="s3d-b", steps=1000).resolved_recipe().steps
        1000
    """

    data: str
    out: str
    recipe: str | PretrainRecipe = "s3d-b"
    architecture: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    patch_size: tuple[int, int, int] | None = None
    lr: float | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    prefetch_factor: int = 4
    augment: bool = True
    val_fraction: float = 0.02
    val_every: int = 1000
    val_max_cases: int = 16
    snapshot_every: int = 5000
    checkpoint_every: int = 1000
    log_every: int = 1
    tensorboard: bool = False
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name in ("checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "snapshot_every", "workers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")

    def resolved_recipe(self) -> PretrainRecipe:
        """The recipe with this config's overrides applied."""
        recipe = get_recipe(self.recipe) if isinstance(self.recipe, str) else self.recipe
        changes: dict[str, Any] = {}
        for key in ("architecture", "steps", "batch_size", "patch_size", "lr"):
            value = getattr(self, key)
            if value is not None:
                changes[key] = tuple(value) if key == "patch_size" else value
        if self.method_kwargs:
            changes["method_kwargs"] = dict(self.method_kwargs)
        return recipe.replace(**changes) if changes else recipe

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the recipe as its name or dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.recipe, PretrainRecipe):
            d["recipe"] = self.recipe.to_dict()
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them)."""
        d = dict(d)
        if isinstance(d.get("recipe"), dict):
            d["recipe"] = PretrainRecipe.from_dict(d["recipe"])
        return from_dict_strict(cls, d)
