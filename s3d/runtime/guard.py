"""Training never finishes broken: a non-finite loss or weight stops the run before it is saved or exported.

Both loops use the same rule: every step's loss is checked (pre-training without a host sync per
step, :class:`FiniteWatch`), the weights are checked before every checkpoint and before the export
(:func:`nonfinite_parameters`), and the error (:class:`NonFiniteError`) names the step, the learning
rate and the last good checkpoint, which is kept; nothing broken is written.

Example:
    >>> watch = FiniteWatch()
    >>> watch.observe(torch.tensor(float("nan")), step=7)
    >>> watch.first_bad_step()
    7
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or inf loss or weight; the run stopped, its last good checkpoint is kept."""


def nonfinite_parameters(named: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or inf (one host sync in all).

    Example:
        >>> nonfinite_parameters(torch.nn.Linear(2, 2))
        []
    """
    items = list(named.state_dict().items()) if isinstance(named, nn.Module) else list(named)
    items = [(k, v) for k, v in items if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not items:
        return []
    flags = torch.stack([torch.isfinite(v.detach()).all().to("cpu", non_blocking=True) for _, v in items])
    return [k for (k, _), ok in zip(items, flags.tolist(), strict=True) if not ok]


class FiniteWatch:
    """The first step whose loss was NaN or inf, kept on the loss's device (no host sync per step)."""

    def __init__(self) -> None:
        self._first: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` (a scalar tensor) is not finite and no earlier step was."""
        bad = ~torch.isfinite(loss.detach().float())
        if self._first is None:
            self._first = torch.full_like(loss.detach(), -1, dtype=torch.long)
        self._first = torch.where(bad & (self._first < 0), step, self._first)

    def first_bad_step(self) -> int | None:
        """The first step with a non-finite loss, or ``None`` (a host sync)."""
        if self._first is None:
            return None
        first = int(self._first)
        return first if first >= 0 else None

    def check(self, lr_of_step: Callable[[int], float], run_dir: str | os.PathLike[str],
              last_good_step: int | None) -> None:
        """Raise :class:`NonFiniteError` if a step's loss was not finite (``lr_of_step(step)``: its lr)."""
        bad = self.first_bad_step()
        if bad is not None:
            raise nonfinite_error(bad, lr_of_step(bad), "the loss is not finite (NaN or inf)", run_dir, last_good_step)


def check_weights(model: nn.Module, step: int, lr: float, run_dir: str | os.PathLike[str],
                  last_good_step: int | None) -> None:
    """Raise :class:`NonFiniteError` if a weight of ``model`` is NaN or inf (before a checkpoint or an export).

    Example:
        >>> check_weights(torch.nn.Linear(2, 2), step=10, lr=1e-2, run_dir="runs/a", last_good_step=None)
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise nonfinite_error(step, lr, f"{len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})", run_dir,
                              last_good_step)


def nonfinite_error(step: int, lr: float, what: str, run_dir: str | os.PathLike[str],
                    last_good_step: int | None, advice: str = "lower --lr or check the data") -> NonFiniteError:
    """The error that stops a run: the step, the lr, what was not finite, the checkpoint that is kept.

    Example:
        >>> str(nonfinite_error(12, 1e29, "the loss is nan", "runs/a", 10))[:53]
        'step 12 (lr 1e+29): the loss is nan; training stopped'
    """
    latest = Path(run_dir) / "checkpoint_latest.pt"
    kept = (f"the last good checkpoint {latest} (step {last_good_step}) is kept" if last_good_step is not None
            else "no checkpoint had been written")
    return NonFiniteError(f"step {step} (lr {lr:.3g}): {what}; training stopped, {kept} and nothing was "
                          f"exported. {advice[0].upper() + advice[1:]}, then start again (in another run folder, "
                          "or with --overwrite)")
