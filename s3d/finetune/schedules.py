"""The fine-tuning schedules of the paper's Table 2 as data, and the learning rate at any step.

A :class:`Schedule` row says what is transferred, whether there is a decoder-only warm-up
(warm-up 1), a warm-up of all weights (warm-up 2), whether the encoder stays frozen, and the peak
learning rate. :meth:`Schedule.plan` turns it into :class:`Phase` s with step ranges; each warm-up
lasts 5 % of the total steps (12.5k of the paper's 250k) unless given. Warm-ups ramp the lr
linearly up to the peak, training phases decay it with PolyLR (exponent 0.9), set before every
optimiser step (:func:`s3d.runtime.lr.lr_at`, the one lr mechanism of both training loops).

Example:
    >>> [(p.name, p.start, p.stop) for p in get_schedule("best").plan(1000)]
    [('warmup_decoder', 0, 50), ('warmup_all', 50, 100), ('train', 100, 1000)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from s3d.runtime.lr import LRPhase, lr_at, phase_at

Trains = Literal["all", "decoder"]

#: The paper's fine-tuning length: 250 steps per epoch x 1000 epochs.
PAPER_STEPS = 250_000
#: The paper's warm-up length (each warm-up phase), steps.
PAPER_WARMUP_STEPS = 12_500
#: Table 8 total lengths (warm-ups fixed at 12.5k + 12.5k steps, the rest is the training stage).
TABLE8_STEPS = (25_000, 37_500, 50_000, 75_000, 150_000, 275_000)


@dataclass(frozen=True)
class Phase(LRPhase):
    """A stretch of steps with one set of trainable weights and one lr shape.

    Attributes:
        lr: ``"ramp"`` (linear up to the peak over the phase) or ``"poly"`` (peak -> 0, exponent 0.9).
        start, stop: step range [start, stop).
        peak_lr: the phase's peak learning rate.
        name: ``warmup_decoder``, ``warmup_all``, ``train`` or ``train_decoder``.
        trains: ``"all"`` or ``"decoder"`` (encoder and stem frozen).
    """

    name: str = "train"
    trains: Trains = "all"


@dataclass(frozen=True)
class Schedule:
    """One row of the paper's Table 2 as data.

    Attributes:
        name: registry key.
        transfer: ``"all"`` (encoder + decoder, new head), ``"encoder"`` (random decoder) or
            ``"none"`` (from scratch).
        decoder_warmup: warm-up 1, only the decoder trains (stem frozen), lr ramps 0 -> peak.
        full_warmup: warm-up 2, all weights train, lr ramps 0 -> peak.
        frozen_encoder: the encoder never trains (the training stage is decoder-only too).
        peak_lr: maximal learning rate.
        description: what the row is, with the paper's average DSC where quoted.
    """

    name: str
    transfer: Literal["all", "encoder", "none"]
    decoder_warmup: bool
    full_warmup: bool
    frozen_encoder: bool
    peak_lr: float
    description: str = ""

    def plan(self, total_steps: int = PAPER_STEPS, warmup_steps: int | None = None,
             peak_lr: float | None = None) -> list[Phase]:
        """The phases with step ranges for a run of ``total_steps`` (warm-ups included).

        Args:
            total_steps: all optimiser steps of the run.
            warmup_steps: steps of each warm-up phase; ``None`` = 5 % of ``total_steps`` (12.5k of 250k).
            peak_lr: override the row's peak lr.

        Example:
            >>> [(p.name, p.start, p.stop) for p in get_schedule("best").plan(1000)]
            [('warmup_decoder', 0, 50), ('warmup_all', 50, 100), ('train', 100, 1000)]
        """
        peak = float(self.peak_lr if peak_lr is None else peak_lr)
        if warmup_steps is None:
            w = round(total_steps * PAPER_WARMUP_STEPS / PAPER_STEPS)
        else:
            w = int(warmup_steps)
        n_warm = int(self.decoder_warmup) + int(self.full_warmup)
        if total_steps < 1 or w < (1 if n_warm else 0) or total_steps - n_warm * w < 1:
            raise ValueError(f"schedule {self.name!r}: total_steps={total_steps} leaves no training stage "
                             f"after {n_warm} warm-up(s) of {w} steps; use more steps or fewer warm-up steps")
        phases, t = [], 0
        if self.decoder_warmup:
            phases.append(Phase("ramp", t, t + w, peak, name="warmup_decoder", trains="decoder"))
            t += w
        if self.full_warmup:
            phases.append(Phase("ramp", t, t + w, peak, name="warmup_all", trains="all"))
            t += w
        trains: Trains = "decoder" if self.frozen_encoder else "all"
        name = "train_decoder" if self.frozen_encoder else "train"
        phases.append(Phase("poly", t, total_steps, peak, name=name, trains=trains))
        return phases


def _row(name: str, transfer: str, dec: bool, full: bool, frozen: bool, lr: float, desc: str) -> Schedule:
    return Schedule(name, transfer, dec, full, frozen, lr, desc)  # type: ignore[arg-type]


#: Named presets covering the rows of the paper's Table 2 (average DSC over D1-D5 where quoted).
SCHEDULES: dict[str, Schedule] = {s.name: s for s in [
    _row("scratch", "none", False, False, False, 1e-2,
         "nnU-Net default: from scratch, no warm-up, PolyLR from 1e-2 (Table 2 baseline, 69.93 DSC)"),
    _row("no_warmup", "all", False, False, False, 1e-2, "transfer all, no warm-up, peak lr 1e-2"),
    _row("no_warmup_lr1e-3", "all", False, False, False, 1e-3, "transfer all, no warm-up, peak lr 1e-3"),
    _row("warmup_all", "all", False, True, False, 1e-2, "transfer all, warm-up of all weights, peak lr 1e-2"),
    _row("warmup_all_lr1e-3", "all", False, True, False, 1e-3,
         "transfer all, warm-up of all weights, peak lr 1e-3"),
    _row("warmup_all_lr1e-4", "all", False, True, False, 1e-4,
         "transfer all, warm-up of all weights, peak lr 1e-4"),
    _row("decoder_warmup", "encoder", True, False, False, 1e-2,
         "transfer encoder, decoder-only warm-up, then all weights, peak lr 1e-2"),
    _row("decoder_warmup_lr1e-3", "encoder", True, False, False, 1e-3,
         "transfer encoder, decoder-only warm-up, then all weights, peak lr 1e-3"),
    _row("frozen_encoder", "all", True, False, True, 1e-2,
         "transfer all, encoder frozen for the whole run (decoder warm-up, decoder training), peak lr 1e-2"),
    _row("frozen_encoder_lr1e-3", "all", True, False, True, 1e-3,
         "transfer all, encoder frozen for the whole run, peak lr 1e-3"),
    _row("sawtooth_lr1e-2", "all", True, True, False, 1e-2,
         "transfer all, decoder warm-up, warm-up of all weights, then all weights, peak lr 1e-2"),
    _row("best", "all", True, True, False, 1e-3,
         "the paper's best (71.76 DSC): transfer all, warm-up 1 decoder only (stem frozen), warm-up 2 "
         "all weights, then all weights with PolyLR from peak lr 1e-3"),
    _row("sawtooth_lr1e-4", "all", True, True, False, 1e-4,
         "transfer all, decoder warm-up, warm-up of all weights, then all weights, peak lr 1e-4"),
]}


def get_schedule(name: str | Schedule) -> Schedule:
    """A preset from :data:`SCHEDULES` by name (a :class:`Schedule` passes through).

    Example:
        >>> get_schedule("best").peak_lr
        0.001
    """
    if isinstance(name, Schedule):
        return name
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES)}") from None


__all__ = [
    "PAPER_STEPS",
    "PAPER_WARMUP_STEPS",
    "SCHEDULES",
    "TABLE8_STEPS",
    "Phase",
    "Schedule",
    "get_schedule",
    "lr_at",
    "phase_at",
]
