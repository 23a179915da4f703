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
Optimizer = Literal["sgd", "adamw"]

#: The paper's fine-tuning length: 250 steps per epoch x 1000 epochs.
PAPER_STEPS = 250_000
#: The paper's warm-up length (each warm-up phase), steps.
PAPER_WARMUP_STEPS = 12_500
#: Table 8 total lengths (warm-ups fixed at 12.5k + 12.5k steps, the rest is the training stage).
TABLE8_STEPS = (25_000, 37_500, 50_000, 75_000, 150_000, 275_000)
#: The published Primus fine-tuning recipe's AdamW betas and weight decay (Wald et al. 2025; nnU-Net's Primus
#: trainers).
ADAMW_BETAS = (0.9, 0.98)
ADAMW_WEIGHT_DECAY = 5e-2
#: nnU-Net's SGD weight decay.
SGD_WEIGHT_DECAY = 3e-5


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
        description: what the schedule does, in words.
        table2_row: the row of Table 2 it reproduces (``"row 13: ..."``), or ``"not in Table 2: ..."``
            for the few extra variants.
        table2_dsc: the row's average DSC over D1-D5 (``None`` for the extra variants).
        optimizer: ``"sgd"`` (nnU-Net's: Nesterov momentum 0.99, weight decay 3e-5) or ``"adamw"``
            (the Primus recipe: betas (0.9, 0.98), weight decay 5e-2).
    """

    name: str
    transfer: Literal["all", "encoder", "none"]
    decoder_warmup: bool
    full_warmup: bool
    frozen_encoder: bool
    peak_lr: float
    description: str = ""
    table2_row: str = ""
    table2_dsc: float | None = None
    optimizer: Optimizer = "sgd"

    @property
    def default_weight_decay(self) -> float:
        """The optimiser's weight decay when the run sets none (SGD 3e-5, AdamW 5e-2)."""
        return ADAMW_WEIGHT_DECAY if self.optimizer == "adamw" else SGD_WEIGHT_DECAY

    @property
    def n_warmups(self) -> int:
        """Number of warm-up phases (0, 1 or 2)."""
        return int(self.decoder_warmup) + int(self.full_warmup)

    def min_steps(self, warmup_steps: int | None = None) -> int:
        """The fewest total steps that leave a training stage (with ``warmup_steps`` or 5 % warm-ups).

        Example:
            >>> get_schedule("best").min_steps(), get_schedule("best").min_steps(100)
            (11, 201)
        """
        if warmup_steps is not None:
            return self.n_warmups * int(warmup_steps) + 1
        n = 1
        while self._warmup_len(n, None) < (1 if self.n_warmups else 0) or n - self.n_warmups * self._warmup_len(
                n, None) < 1:
            n += 1
        return n

    @staticmethod
    def _warmup_len(total_steps: int, warmup_steps: int | None) -> int:
        if warmup_steps is None:
            return round(total_steps * PAPER_WARMUP_STEPS / PAPER_STEPS)
        return int(warmup_steps)

    def plan(self, total_steps: int = PAPER_STEPS, warmup_steps: int | None = None,
             peak_lr: float | None = None) -> list[Phase]:
        """The phases with step ranges for a run of ``total_steps`` (warm-ups included).

        Args:
            total_steps: all optimiser steps of the run.
            warmup_steps: steps of each warm-up phase; ``None`` = 5 % of ``total_steps`` (12.5k of 250k).
            peak_lr: override the row's peak lr.

        Raises:
            ValueError: the warm-ups leave no training stage; the message names ``--steps`` and
                ``--warmup-steps`` with values that work.

        Example:
            >>> ", ".join(f"{p.name} {p.start}-{p.stop}" for p in get_schedule("best").plan(1000))
            'warmup_decoder 0-50, warmup_all 50-100, train 100-1000'
        """
        peak = float(self.peak_lr if peak_lr is None else peak_lr)
        w = self._warmup_len(total_steps, warmup_steps)
        n_warm = self.n_warmups
        if total_steps < 1 or w < (1 if n_warm else 0) or total_steps - n_warm * w < 1:
            raise ValueError(self._too_short(total_steps, warmup_steps, w))
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

    def _too_short(self, total_steps: int, warmup_steps: int | None, w: int) -> str:
        """The one-line error of :meth:`plan` when the warm-ups leave no training stage."""
        n = self.n_warmups
        if total_steps < 1:
            return f"--steps {total_steps}: must be >= 1"
        if warmup_steps is not None and w < 1:
            return f"--warmup-steps {w} with schedule {self.name!r}: a warm-up needs at least 1 step"
        count = "one warm-up" if n == 1 else "two warm-ups"
        if warmup_steps is None:
            what = f"{count} of 5 % of --steps ({w} step(s) each)"
            need = self.min_steps()
        else:
            what = f"{count} of --warmup-steps {w} ({n * w} step(s))"
            need = self.min_steps(w)
        largest = (total_steps - 1) // n
        alt = f" or --warmup-steps <= {largest}" if largest >= 1 else ""
        return (f"--steps {total_steps} with schedule {self.name!r}: {what} leave no training stage; "
                f"use --steps >= {need}{alt}")


def _row(name: str, transfer: str, dec: bool, full: bool, frozen: bool, lr: float, desc: str,
         row: int | None = None, dsc: float | None = None, note: str = "", optimizer: str = "sgd") -> Schedule:
    if row is None:
        label = f"not in Table 2: {note}"
    else:
        cells = ["transfer " + {"all": "all", "encoder": "encoder", "none": "none (scratch)"}[transfer],
                 "warm-up 1 " + ("decoder" if dec else "-"), "warm-up 2 " + ("all" if full else "-"),
                 "train " + ("decoder" if frozen else "all"), f"lr {lr:.0e}".replace("e-0", "e-")]
        label = f"row {row}: {' | '.join(cells)} ({dsc:.2f} DSC{note})"
    return Schedule(name, transfer, dec, full, frozen, lr, desc, label, dsc, optimizer)  # type: ignore[arg-type]


#: The 14 rows of the paper's Table 2 in the table's order (average DSC over D1-D5), then the extra
#: variants of earlier s3d versions. Our copy of the table lost its symbols (transfer and trained-weight
#: icons); docs/finetuning.md ("Schedules") says how the rows were reconstructed.
SCHEDULES: dict[str, Schedule] = {s.name: s for s in [
    _row("scratch", "none", False, False, False, 1e-2,
         "from scratch, no warm-up, PolyLR from 1e-2 (nnU-Net's default schedule)", 1, 69.93,
         "; the paper's row used nnU-Net's dataset-specific plans, s3d's preprocessing is fixed"),
    _row("frozen_encoder", "all", False, False, True, 1e-2,
         "transfer all, the encoder frozen for the whole run (only the decoder trains), PolyLR from 1e-2",
         2, 69.87),
    _row("no_warmup", "all", False, False, False, 1e-2, "transfer all, no warm-up, PolyLR from 1e-2", 3, 70.61),
    _row("no_warmup_lr1e-3", "all", False, False, False, 1e-3, "transfer all, no warm-up, PolyLR from 1e-3",
         4, 70.65),
    _row("warmup_all", "all", False, True, False, 1e-2,
         "transfer all, warm-up of all weights, then all weights, peak lr 1e-2", 5, 70.95),
    _row("warmup_all_lr1e-3", "all", False, True, False, 1e-3,
         "transfer all, warm-up of all weights, then all weights, peak lr 1e-3", 6, 71.58),
    _row("warmup_all_lr1e-4", "all", False, True, False, 1e-4,
         "transfer all, warm-up of all weights, then all weights, peak lr 1e-4", 7, 71.43),
    _row("encoder_no_warmup", "encoder", False, False, False, 1e-2,
         "transfer the encoder (random decoder), no warm-up, PolyLR from 1e-2", 8, 69.87),
    _row("encoder_no_warmup_lr1e-3", "encoder", False, False, False, 1e-3,
         "transfer the encoder (random decoder), no warm-up, PolyLR from 1e-3", 9, 71.18),
    _row("encoder_warmup_all", "encoder", False, True, False, 1e-2,
         "transfer the encoder (random decoder), warm-up of all weights, then all weights, peak lr 1e-2",
         10, 71.12),
    _row("encoder_warmup_all_lr1e-3", "encoder", False, True, False, 1e-3,
         "transfer the encoder (random decoder), warm-up of all weights, then all weights, peak lr 1e-3",
         11, 71.34),
    _row("sawtooth_lr1e-2", "all", True, True, False, 1e-2,
         "transfer all, decoder warm-up, warm-up of all weights, then all weights, peak lr 1e-2", 12, 71.02),
    _row("best", "all", True, True, False, 1e-3,
         "the paper's best: transfer all, warm-up 1 decoder only (stem frozen), warm-up 2 all weights, then "
         "all weights with PolyLR from peak lr 1e-3", 13, 71.76, "; the best row"),
    _row("sawtooth_lr1e-4", "all", True, True, False, 1e-4,
         "transfer all, decoder warm-up, warm-up of all weights, then all weights, peak lr 1e-4", 14, 70.95),
    # extra variants (kept for existing runs and scripts; not rows of the table)
    _row("decoder_warmup", "encoder", True, False, False, 1e-2,
         "transfer encoder, decoder-only warm-up, then all weights, peak lr 1e-2",
         note="transfer encoder, a decoder-only warm-up and no warm-up of all weights, lr 1e-2"),
    _row("decoder_warmup_lr1e-3", "encoder", True, False, False, 1e-3,
         "transfer encoder, decoder-only warm-up, then all weights, peak lr 1e-3",
         note="as decoder_warmup with lr 1e-3"),
    _row("frozen_encoder_lr1e-3", "all", False, False, True, 1e-3,
         "transfer all, the encoder frozen for the whole run, PolyLR from 1e-3",
         note="row 2 (frozen_encoder) with lr 1e-3"),
    # the Primus recipe (AdamW): not rows of the table (which fine-tunes a ResEnc-L with SGD)
    _row("primus", "all", False, True, False, 1e-4,
         "Primus: transfer all, warm-up of all weights, then all weights with PolyLR from 1e-4; AdamW "
         "betas (0.9, 0.98), weight decay 5e-2", note="the published Primus recipe (AdamW, lr 1e-4)",
         optimizer="adamw"),
    _row("primus_decoder_warmup", "all", True, True, False, 1e-4,
         "Primus: transfer all, warm-up 1 decoder only (up_projection; patch embedding and EVA frozen), "
         "warm-up 2 all weights, then all weights with PolyLR from 1e-4; AdamW",
         note="the Primus recipe with the paper's decoder warm-up (row 13's phases)", optimizer="adamw"),
    _row("primus_scratch", "none", False, True, False, 3e-4,
         "Primus from scratch: warm-up of all weights, then PolyLR from 3e-4; AdamW betas (0.9, 0.98), "
         "weight decay 5e-2", note="the published Primus recipe from scratch (AdamW, lr 3e-4)", optimizer="adamw"),
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
    "ADAMW_BETAS",
    "ADAMW_WEIGHT_DECAY",
    "PAPER_STEPS",
    "PAPER_WARMUP_STEPS",
    "SCHEDULES",
    "SGD_WEIGHT_DECAY",
    "TABLE8_STEPS",
    "Phase",
    "Schedule",
    "get_schedule",
    "lr_at",
    "phase_at",
]
