"""Settings of one fine-tuning run (:class:`FinetuneConfig`), the train/validation split and the patch size."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from s3d._dataclasses import from_dict_strict, to_jsonable_dict
from s3d._triple import to_3tuple
from s3d.finetune.schedules import PAPER_STEPS, get_schedule
from s3d.runtime.device import AMP_MODES


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; saved to ``out_dir/finetune_config.json``.

    Attributes:
        dataset: nnU-Net v2 raw dataset folder (with dataset.json).
        out_dir: run folder (split, metrics, checkpoints, final model).
        pretrained: registry name / Hub repo / path for :func:`s3d.hub.load_pretrained`; ``None`` = scratch.
        schedule: a :data:`~s3d.finetune.SCHEDULES` name.
        steps: total optimiser steps, warm-ups included (paper: 250k).
        warmup_steps: steps of each warm-up; ``None`` = 5 % of ``steps``.
        peak_lr: override the schedule's peak lr.
        strategy: ``"all"`` / ``"encoder"``; ``None`` = the schedule's transfer.
        stem: ``"replicate"`` or ``"random"`` for multi-channel data.
        train_stem_in_decoder_warmup: also train the stem during warm-up 1 (Table 6 "unfrozen").
        config: architecture preset when training from scratch: a ResEnc preset (``resenc_l``, ...) or a
            Primus one (``primus_m``, ...; its ``input_shape`` is ``patch_size`` when given).
        batch_size: patches per step.
        patch_size: (D, H, W) voxels; ``None`` = median case shape rounded up to the network
            stride, capped at 160 (ResEnc), or the network's ``input_shape`` (Primus: a pretrained Primus is
            loaded with ``input_shape=patch_size``, its position embedding interpolated).
        target_spacing_mm: resampling target (mm).
        use_mask_for_norm: z-score each channel over its nonzero mask, voxels outside it 0 (nnU-Net's
            ``use_mask_for_norm``, for skull-stripped images); ``False`` (default, as in the nnssl
            pre-training): over the whole cropped image; ``"auto"``: nnU-Net's planner rule
            (:func:`s3d.data.nnunet.nnunet_use_mask_for_norm`, reads every case once).
        deep_supervision: deep-supervision loss.
        foreground_fraction: share of each batch centred on foreground (nnU-Net: 0.33).
        augment: nnU-Net-like augmentation (:class:`s3d.augment.AugmentConfig` defaults).
        val_fraction: share of cases held out (at least one); the split is saved to ``split.json``.
        n_train: use only the first N training cases of the seeded split (low-data regime).
        val_every, checkpoint_every: steps between validations / checkpoints.
        seed: seeds the split, patch sampling and augmentation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        amp: ``"auto"`` (bf16 on GPUs that support it, else fp16; off on CPU), ``"bf16"``, ``"fp16"``,
            ``"off"`` (see :mod:`s3d.runtime.device`).
        channels_last: channels_last_3d memory format (GPU only; measure it, InstanceNorm may be slower).
        grad_clip: max gradient norm (nnU-Net: 12).
        momentum, poly_exponent: SGD momentum and the PolyLR exponent (0.99, 0.9).
        weight_decay: the optimiser's weight decay; ``None`` = the schedule's optimiser default (SGD 3e-5,
            AdamW 5e-2, :attr:`~s3d.finetune.Schedule.default_weight_decay`).
        num_val_cases: validate on at most this many held-out cases (``None`` = all).
        final_validation: after the last step, validate once more on the same cases with the
            prediction ``s3d predict`` makes (Gaussian-weighted sliding windows overlapping by half a
            patch, :func:`s3d.infer.sliding_window_predict`) and log it as ``final_dice`` with
            ``"val_mode": "sliding_window"``; the periodic validations (``val_dice``,
            ``"val_mode": "tiles"``) use cheap non-overlapping tiles. On cases much larger than the
            patch, overlap 0.5 means up to 2^3 = 8 times the forward passes of a tiled validation.
        resume: continue from ``out_dir/checkpoint_latest.pt`` (also with another number of processes;
            the data stream then differs from an uninterrupted run, and a warning says so).
        overwrite: start a new run in an ``out_dir`` that holds an earlier one (checkpoints or
            ``model/``), removing them first; without it (and without ``resume``) that is an error.
        progress: show a progress bar.
        cache_dir: keep the preprocessing cache here instead of ``DATASET/.s3d_cache`` (``None``:
            ``$S3D_CACHE_DIR`` if set), e.g. for a read-only dataset.
        loader_threads: background threads that sample the next steps' patches while the network
            trains (0: sample in the training thread). The batches do not depend on it.
        val_tile_batch: tiles per forward pass in the periodic (tiled) validations.

    Under ``torchrun`` (DDP) ``batch_size`` is the global batch, split evenly over the processes.

    Example:
        >>> FinetuneConfig("Dataset001_Brain", "runs/brain", pretrained="s3d-b", steps=1000).schedule
        'best'
    """

    dataset: str
    out_dir: str
    pretrained: str | None = None
    schedule: str = "best"
    steps: int = PAPER_STEPS
    warmup_steps: int | None = None
    peak_lr: float | None = None
    strategy: str | None = None
    stem: str = "replicate"
    train_stem_in_decoder_warmup: bool = False
    config: str = "resenc_l"
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = None
    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    use_mask_for_norm: bool | str = False
    deep_supervision: bool = True
    foreground_fraction: float = 0.33
    augment: bool = True
    val_fraction: float = 0.2
    n_train: int | None = None
    val_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    grad_clip: float = 12.0
    momentum: float = 0.99
    weight_decay: float | None = None
    poly_exponent: float = 0.9
    num_val_cases: int | None = None
    final_validation: bool = True
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    cache_dir: str | None = None
    loader_threads: int = 2
    val_tile_batch: int = 4

    #: fields that must match when resuming
    RESUME_KEYS = ("schedule", "steps", "warmup_steps", "peak_lr", "batch_size", "seed", "config", "strategy",
                   "stem", "deep_supervision", "n_train", "target_spacing_mm", "patch_size",
                   "train_stem_in_decoder_warmup", "foreground_fraction", "augment", "momentum",
                   "weight_decay", "poly_exponent", "grad_clip", "use_mask_for_norm")

    def __post_init__(self) -> None:
        from s3d._paths import UsageError

        for name in ("dataset", "out_dir"):
            if not isinstance(getattr(self, name), str | os.PathLike) or not str(getattr(self, name)):
                raise UsageError(f"{name}: expected a folder, got {getattr(self, name)!r}")
        self.dataset, self.out_dir = str(self.dataset), str(self.out_dir)
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "val_tile_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_train is not None and int(self.n_train) < 1:
            raise UsageError(f"n_train (--n-train): must be >= 1, got {self.n_train}")
        if self.peak_lr is not None and not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
            raise UsageError(f"peak_lr (--lr): must be a finite number > 0, got {self.peak_lr}")
        if self.stem not in ("replicate", "random"):
            raise UsageError(f"stem (--stem): expected 'replicate' or 'random', got {self.stem!r}")
        if self.strategy not in (None, "all", "encoder"):
            raise UsageError(f"strategy (--strategy): expected 'all' or 'encoder', got {self.strategy!r}")
        if len(tuple(self.target_spacing_mm)) != 3 or not all(
                math.isfinite(float(v)) and float(v) > 0 for v in self.target_spacing_mm):
            raise UsageError(f"target_spacing_mm (--spacing): expected 3 finite sizes > 0 mm, got "
                             f"{tuple(self.target_spacing_mm)}")
        if self.patch_size is not None and (len(tuple(self.patch_size)) != 3
                                            or min(int(p) for p in self.patch_size) < 1):
            raise UsageError(f"patch_size (--patch-size): expected 3 sizes >= 1 voxel, got {tuple(self.patch_size)}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: continue the earlier run, or replace it")
        if int(self.loader_threads) < 0:
            raise ValueError(f"loader_threads: must be >= 0, got {self.loader_threads}")
        if not 0 <= self.foreground_fraction <= 1 or not 0 < self.val_fraction < 1:
            raise ValueError(f"foreground_fraction must be in [0, 1] and val_fraction in (0, 1), got "
                             f"{self.foreground_fraction} and {self.val_fraction}")
        if self.use_mask_for_norm not in (True, False, "auto"):
            raise ValueError(f"use_mask_for_norm: expected true, false or 'auto', got {self.use_mask_for_norm!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.patch_size is not None:
            self.patch_size = to_3tuple(self.patch_size, "patch_size")
        self.target_spacing_mm = to_3tuple(self.target_spacing_mm, "target_spacing_mm", float)
        get_schedule(self.schedule).plan(self.steps, self.warmup_steps, self.peak_lr)  # too short: one line now

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return to_jsonable_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them and the known ones)."""
        return from_dict_strict(cls, d)

    def resume_fields(self) -> dict[str, Any]:
        """The :attr:`RESUME_KEYS` values (JSON form), which a resumed run must share with its checkpoint
        (``weight_decay`` resolved to the schedule's default, as runs before it could be ``None`` saved it)."""
        d = self.to_dict()
        if d["weight_decay"] is None:
            d["weight_decay"] = get_schedule(self.schedule).default_weight_decay
        return {k: d[k] for k in self.RESUME_KEYS}


def make_split(
    cases: Sequence[str], val_fraction: float, seed: int, n_train: int | None = None
) -> dict[str, Any]:
    """Seeded train/val split; ``n_train`` keeps the first N training cases (low-data regime).

    Example:
        >>> make_split([f"c{i}" for i in range(10)], 0.2, seed=0)["val"]
        ['c2', 'c8']
    """
    if len(cases) < 2:
        raise ValueError(f"need at least 2 cases for a train/validation split, got {len(cases)}")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    val, train = sorted(order[:n_val]), order[n_val:]
    if n_train is not None:
        if not 1 <= n_train <= len(train):
            raise ValueError(f"n_train={n_train}: the split has {len(train)} training case(s)")
        train = train[:n_train]
    return {"seed": seed, "val_fraction": val_fraction, "n_train": n_train, "train": sorted(train),
            "val": val}


def auto_patch_size(
    shapes: Sequence[Sequence[int]], total_stride: Sequence[int], cap: int = 160
) -> tuple[int, ...]:
    """Median case shape rounded up to a multiple of the network stride, capped at ``cap`` voxels.

    Example:
        >>> auto_patch_size([(70, 80, 90), (90, 80, 70)], (32, 32, 32))
        (96, 96, 96)
    """
    med = np.median(np.asarray(shapes), axis=0)
    return tuple(int(min(max(s, math.ceil(m / s) * s), max(s, cap // s * s)))
                 for m, s in zip(med, total_stride, strict=True))
