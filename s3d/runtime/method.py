"""The contract between a pre-training method and the one loop that trains it (:mod:`s3d.pretrain.loop`).

A method is an ``nn.Module`` around a backbone. The loop uses exactly what :class:`PretrainMethod`
lists, and nothing else: it never asks a method what it is or whether it has an attribute.

- before the first step: :meth:`~PretrainMethod.patch_problem` (``None``, or a :class:`PatchProblem`
  naming the library parameters to change: the loop raises it as :class:`PatchProblemError`, and
  ``s3d pretrain`` turns it into advice about its flags);
- every batch (training, validation, snapshots): :meth:`~PretrainMethod.prepare_batch`, then
  ``forward``, which returns a :class:`MethodOutput` (the loss, its weight for multi-process
  normalisation, and the tensors a reconstruction snapshot shows);
- after every step: :attr:`~PretrainMethod.engine_choices`, what the method chose at run time (logged
  once each);
- checkpoints: ``state_dict()`` / ``load_state_dict()``, which also carry those run-time choices (so a
  resumed run runs what it ran);
- at the end: :meth:`~PretrainMethod.export_backbone` and ``backbone.config``.

It lives in :mod:`s3d.runtime` because both sides use it: the model families (:mod:`s3d.sparse`,
:mod:`s3d.pretext`, later others) implement it and :mod:`s3d.pretrain` runs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class MethodOutput(Protocol):
    """What a method's ``forward`` returns (a NamedTuple such as ``MAEOutput`` or ``PretextOutput``).

    Attributes:
        loss: scalar training loss.
        loss_weight: the loss's denominator (e.g. masked voxels x channels, detached), which the loop sums
            over processes to weigh the global batch; ``None``: the samples weigh equally.
        reconstruction: (B, C, D, H, W) what the network produced, for snapshots, or ``None``.
        mask: the keep grid (B, 1, d, h, w) the input was masked with (1 = visible), or ``None``.
        target: (B, C, D, H, W) what the network should have produced (``None``: the input itself).
    """

    @property
    def loss(self) -> torch.Tensor: ...

    @property
    def loss_weight(self) -> torch.Tensor | None: ...

    @property
    def reconstruction(self) -> torch.Tensor | None: ...

    @property
    def mask(self) -> torch.Tensor | None: ...

    @property
    def target(self) -> torch.Tensor | None: ...


class RuntimeChoice(Protocol):
    """A decision a method made while running (e.g. :class:`s3d.sparse.autotune.EngineChoice`)."""

    def message(self) -> str:
        """One line for the log."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``metrics.jsonl``)."""
        ...


@dataclass(frozen=True)
class PatchProblem:
    """Why a method cannot train on a patch size, in the library's terms, and what would work.

    Attributes:
        patch_size: the patch size it is about, (D, H, W) voxels.
        reason: what is wrong with it, naming the method's parameters (e.g. "with mask block_size 32 ...").
        fix_patch_size: a patch size (D, H, W voxels) that works with the method as configured, if any.
        fix_method_kwargs: method keyword arguments that would make ``patch_size`` work instead, if any.

    Example:
        >>> p = PatchProblem((32, 32, 32), "1 block", (32, 32, 64), {"block_size": 16})
        >>> p.message()
        "patch_size (32, 32, 32): 1 block; use patch_size=(32, 32, 64) or method_kwargs={'block_size': 16}"
    """

    patch_size: tuple[int, int, int]
    reason: str
    fix_patch_size: tuple[int, int, int] | None = None
    fix_method_kwargs: dict[str, Any] = field(default_factory=dict)

    def message(self) -> str:
        """The problem and its fixes in the library's words (``patch_size=...``, ``method_kwargs=...``)."""
        fixes = []
        if self.fix_patch_size is not None:
            fixes.append(f"patch_size={tuple(self.fix_patch_size)}")
        if self.fix_method_kwargs:
            fixes.append(f"method_kwargs={self.fix_method_kwargs}")
        use = f"; use {' or '.join(fixes)}" if fixes else ""
        return f"patch_size {tuple(self.patch_size)}: {self.reason}{use}"


class PatchProblemError(ValueError):
    """A patch size the method cannot train on (raised before the first step); ``problem`` says why."""

    def __init__(self, problem: PatchProblem) -> None:
        super().__init__(problem.message())
        self.problem = problem


@runtime_checkable
class PretrainMethod(Protocol):
    """What a pre-training method provides to :mod:`s3d.pretrain` (besides being an ``nn.Module``).

    Attributes:
        backbone: the network being pre-trained (its ``config`` is what the export rebuilds).
        engine_choices: what the method chose at run time, by key (empty when it chooses nothing); each
            choice is logged once. They are part of ``state_dict()``.
    """

    backbone: nn.Module
    engine_choices: Mapping[Any, RuntimeChoice]

    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch ``forward`` takes, from the loop's augmented z-scored patches (B, C, D, H, W) on the
        training device (the built-in methods take them as they are)."""
        ...

    def patch_problem(self, patch_size: tuple[int, int, int]) -> PatchProblem | None:
        """``None`` when the method can train on patches of ``patch_size`` (D, H, W voxels), else why not."""
        ...

    def __call__(self, x: torch.Tensor) -> MethodOutput:
        """The loss (and snapshot tensors) of one prepared batch (B, C, D, H, W)."""
        ...

    def export_backbone(self) -> OrderedDict[str, torch.Tensor]:
        """A detached copy of the backbone's state dict (loads strictly into ``build_resenc_unet(config)``)."""
        ...


def check_method(module: nn.Module, name: str) -> PretrainMethod:
    """``module`` as a :class:`PretrainMethod`, or ``TypeError`` naming what it lacks.

    Example:
        >>> check_method(nn.Linear(1, 1), "linear")
        Traceback (most recent call last):
        TypeError: method 'linear': Linear is not a pre-training method; it lacks backbone, engine_choices, \
prepare_batch, patch_problem, export_backbone (see s3d.pretrain.PretrainMethod)
    """
    if isinstance(module, PretrainMethod):
        return module
    members = ("backbone", "engine_choices", "prepare_batch", "patch_problem", "export_backbone")
    missing = [m for m in members if not hasattr(module, m)]
    raise TypeError(f"method {name!r}: {type(module).__name__} is not a pre-training method; it lacks "
                    f"{', '.join(missing)} (see s3d.pretrain.PretrainMethod)")
