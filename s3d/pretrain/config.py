"""Settings of one pre-training run besides the recipe's own numbers (:class:`PretrainConfig`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from s3d._dataclasses import from_dict_strict, jsonable
from s3d.pretrain.recipes import PretrainRecipe, get_recipe
from s3d.runtime.device import AMP_MODES
from s3d.sparse.mask import block_grid_size


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
        overwrite: start a new run in an ``out`` that holds an earlier one (checkpoints, ``backbone/``,
            ``nnssl/``), removing them first; without it (and without ``resume``) that is an error.
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
    overwrite: bool = False
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
        from s3d._paths import UsageError

        for name in ("steps", "batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise UsageError(f"{name} (--{name.replace('_', '-')}): must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr (--lr): must be a finite number > 0, got {self.lr}")
        if self.patch_size is not None and (len(tuple(self.patch_size)) != 3
                                            or min(int(p) for p in self.patch_size) < 1):
            raise UsageError(f"patch_size (--patch-size): expected 3 sizes >= 1 voxel, got {tuple(self.patch_size)}")
        if not isinstance(self.method_kwargs, dict):
            raise UsageError(f"method_kwargs (--method-kwargs): expected a JSON object, got {self.method_kwargs!r}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: continue the earlier run, or replace it")

    def check(self) -> PretrainRecipe:
        """Check every setting that needs no data, before any is read: the recipe and its overrides, the
        method's keyword arguments, the patch against the mask blocks, the device and ``amp``.

        Returns:
            The resolved recipe.

        Raises:
            ValueError / s3d._paths.UsageError: naming the setting.

        Example:
            >>> PretrainConfig(data="prep", out="runs/b", device="mps").check()
            Traceback (most recent call last):
            s3d._paths.UsageError: device (--device) 'mps' is not supported; ...
        """
        import torch

        from s3d.nn import build_resenc_unet
        from s3d.pretrain.methods import build_method
        from s3d.runtime.device import resolve_amp, resolve_device

        resolve_amp(self.amp, resolve_device(self.device))
        recipe = self.resolved_recipe()
        with torch.device("meta"):  # the shapes and arguments, no memory
            backbone = build_resenc_unet(recipe.architecture, in_channels=1, num_classes=1, deep_supervision=False)
            method = build_method(recipe.method, backbone, **recipe.method_kwargs)
        _check_mask_blocks(recipe.patch_size, getattr(method, "block_size", None))
        return recipe

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


def _check_mask_blocks(patch_size: tuple[int, ...], block_size: int | None) -> None:
    """Refuse a patch the MAE mask grid cannot use, before the first step, naming both arguments."""
    if block_size is None:
        return
    try:
        if math.prod(block_grid_size(patch_size, block_size)) >= 2:
            return
    except ValueError:  # not a whole number of blocks along some axis
        pass
    fit = [-(-p // block_size) * block_size for p in patch_size]  # each axis up to a whole block
    if math.prod(f // block_size for f in fit) < 2:
        fit[-1] *= 2
    raise ValueError(
        f"--patch-size {' '.join(map(str, patch_size))} with mask block_size {block_size}: the patch must be a "
        f"multiple of the block along every axis and hold at least 2 blocks (one visible, one masked); use "
        f"--patch-size {' '.join(map(str, fit))} or a smaller block, e.g. --method-kwargs "
        f"'{{\"block_size\": {max(1, block_size // 2)}}}'")
