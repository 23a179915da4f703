"""Learning rate as a pure function of the optimiser step: linear ramps and PolyLR, in phases.

Both training loops describe their schedule as a list of :class:`LRPhase` s and set the lr of
step ``t`` to :func:`lr_at` ``(phases, t)`` before the optimiser step; there is no scheduler object
and no hidden state, so a resumed run continues exactly. Pre-training's recipe (optional linear
warm-up, then PolyLR) is :func:`poly_schedule`; fine-tuning's Table 2 schedules are phases of
:mod:`s3d.finetune.schedules`.

- ``"ramp"``: ``peak * (t + 1) / n`` for ``t`` = 0..n-1 (the first step already moves the weights,
  the last reaches the peak; the authors' nnU-Net warm-up);
- ``"poly"``: ``peak * (1 - t / n) ** exponent`` (nnU-Net's PolyLR, stepped every optimiser step),

with ``t = step - phase.start`` and ``n = phase.stop - phase.start``.

Example:
    >>> round(lr_at(poly_schedule(1e-2, 1000), 500), 6)
    0.005359
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Shape = Literal["ramp", "poly"]


@dataclass(frozen=True)
class LRPhase:
    """A stretch of steps ``[start, stop)`` with one lr shape.

    Attributes:
        lr: ``"ramp"`` (linear up to ``peak_lr``) or ``"poly"`` (``peak_lr`` down to 0).
        start, stop: optimiser steps (0-based, ``stop`` exclusive).
        peak_lr: the phase's peak learning rate.
    """

    lr: Shape
    start: int
    stop: int
    peak_lr: float

    @property
    def steps(self) -> int:
        """Length of the phase, steps."""
        return self.stop - self.start


def phase_at(phases: Sequence[LRPhase], step: int) -> int:
    """Index of the phase holding ``step`` (steps past the end belong to the last phase).

    Example:
        >>> phase_at(poly_schedule(1e-2, 100, warmup_steps=10), 10)
        1
    """
    for i, p in enumerate(phases):
        if step < p.stop:
            return i
    return len(phases) - 1


def lr_at(phases: Sequence[LRPhase], step: int, poly_exponent: float = 0.9) -> float:
    """Learning rate of optimiser step ``step`` (0-based); 0 from the end of the last poly phase on.

    Example:
        >>> lr_at(poly_schedule(1e-2, 100, warmup_steps=10), 0)
        0.001
    """
    phase = phases[phase_at(phases, step)]
    t = min(max(step - phase.start, 0), phase.steps)
    if phase.lr == "ramp":
        return phase.peak_lr * (min(t + 1, phase.steps) / phase.steps)
    if phase.lr == "poly":
        return phase.peak_lr * (1.0 - t / phase.steps) ** poly_exponent
    raise ValueError(f"lr shape {phase.lr!r}: expected 'ramp' or 'poly'")


def poly_schedule(peak_lr: float, steps: int, warmup_steps: int = 0) -> list[LRPhase]:
    """PolyLR over ``steps`` optimiser steps, after an optional linear warm-up of ``warmup_steps``.

    Example:
        >>> [(p.lr, p.start, p.stop) for p in poly_schedule(1e-2, 100, 10)]
        [('ramp', 0, 10), ('poly', 10, 100)]
    """
    if steps < 1 or not 0 <= warmup_steps < steps:
        raise ValueError(f"need steps >= 1 and 0 <= warmup_steps < steps, got {steps} and {warmup_steps}")
    ramp = [LRPhase("ramp", 0, warmup_steps, float(peak_lr))] if warmup_steps else []
    return [*ramp, LRPhase("poly", warmup_steps, steps, float(peak_lr))]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
