"""Settings of one pre-training run besides the recipe's own numbers (:class:`PretrainConfig`)."""

from __future__ import annotations

import dataclasses
import math
import warnings
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
        overwrite: start a new run in an ``out`` that holds an earlier one (checkpoints, ``backbone/``,
            ``nnssl/``), removing them first; without it (and without ``resume``) that is an error.
        stop_after: stop after this global step as if killed (no export); for time-limited job slots.
        progress: show a progress bar (rank 0).
        probe: an nnU-Net raw dataset: run the frozen-encoder probe (:mod:`s3d.pretrain.probing`) on the
            current encoder after checkpoints, and once on the initial weights; ``None``: no probe.
        probe_every: probe every this many steps (at checkpoints, so a multiple of ``checkpoint_every``);
            0: whenever the probes' total time stays within ``probe_budget`` of the training time.
        probe_budget: the probes' share of the training time with ``probe_every=0`` (0.05: 5 %).
        probe_options: :func:`s3d.finetune.probe` arguments (``n_train``, ``seeds``, ``steps``, ``peak_lr``,
            ``patch_size``, ``target_spacing_mm`` (default: the recipe's spacing), ...).
        probe_timeout_s: how long the other ranks wait for rank 0's probe under torchrun (seconds).

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
    probe: str | None = None
    probe_every: int = 0
    probe_budget: float = 0.05
    probe_options: dict[str, Any] = field(default_factory=dict)
    probe_timeout_s: float = 7200.0

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

        if self.probe is not None:
            if int(self.probe_every) < 0 or (self.probe_every and self.probe_every % self.checkpoint_every):
                raise ValueError(f"probe_every (--probe-every): the probe runs at checkpoints, so give 0 (by cost) or "
                                 f"a multiple of checkpoint_every ({self.checkpoint_every}), got {self.probe_every}")
            if not 0 < self.probe_budget <= 1:
                raise ValueError(f"probe_budget (--probe-budget): must be in (0, 1], got {self.probe_budget}")
            if self.probe_timeout_s <= 0:
                raise ValueError(f"probe_timeout_s (--probe-timeout): must be > 0 seconds, got {self.probe_timeout_s}")
            from s3d.finetune.probing import check_probe_options

            check_probe_options(self.probe, self.probe_options)

    def check(self) -> PretrainRecipe:
        """Check every setting that needs no data, before any is read: the recipe and its overrides, the
        method's keyword arguments, the patch against the mask blocks, the device and ``amp``.

        Returns:
            The resolved recipe.

        Raises:
            ValueError / s3d._paths.UsageError: naming the setting.
            PatchProblemError: the method cannot train on the patch (names the library parameters to change).

        Example:
            >>> PretrainConfig(data="prep", out="runs/b", device="mps").check()
            Traceback (most recent call last):
            s3d._paths.UsageError: device (--device) 'mps' is not supported; ...
        """
        import torch

        from s3d.pretrain.methods import build_backbone, build_method
        from s3d.runtime.device import resolve_amp, resolve_device
        from s3d.runtime.method import PatchProblemError

        resolve_amp(self.amp, resolve_device(self.device))
        recipe = self.resolved_recipe()
        with torch.device("meta"):  # the shapes and arguments, no memory
            with warnings.catch_warnings():  # what the method warns about, the run warns again when it builds it
                warnings.simplefilter("ignore")
                method = build_method(recipe.method, build_backbone(recipe.architecture, recipe.patch_size),
                                      **recipe.method_kwargs)
        problem = method.patch_problem(recipe.patch_size)
        if problem is not None:
            raise PatchProblemError(problem)
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

