"""Fine-tuning a pretrained ResEnc U-Net: weight transfer, the paper's schedules, the training loop.

The public face of fine-tuning (``from s3d import finetune``)::

    net = s3d.finetune.prepare_model("s3d-b", in_channels=2, num_classes=3, strategy="all", stem="replicate")
    s3d.finetune.get_schedule("best").plan(250_000)   # warm-up 1 (decoder), warm-up 2 (all), training
    s3d.finetune.run("Dataset001_Brain", "runs/brain", pretrained="s3d-b", schedule="best")

- :mod:`~s3d.finetune.transfer`: :func:`prepare_model`, encoder/decoder parameters;
- :mod:`~s3d.finetune.schedules`: the schedule presets of the paper's Table 2 (:data:`SCHEDULES`);
- :mod:`~s3d.finetune.config`: :class:`FinetuneConfig`, the split, the automatic patch size;
- :mod:`~s3d.finetune.data`: the validated, cached dataset of a run;
- :mod:`~s3d.finetune.patches`, :mod:`~s3d.finetune.loader` (per-step seeded batches, background
  prefetch), :mod:`~s3d.finetune.losses` (also the global batch's loss under DDP),
  :mod:`~s3d.finetune.phases` (what trains, the DDP wrapper), :mod:`~s3d.finetune.validation`;
- :mod:`~s3d.finetune.trainer`: :class:`Trainer` (one process, or N with ``torchrun``);
  :mod:`~s3d.finetune.job`: :func:`run`;
- :mod:`~s3d.finetune.probing`: :func:`probe`, the frozen-encoder probe of a set of weights against
  random weights (``s3d probe``).

Augmentation is :mod:`s3d.augment`; the dataset format is :mod:`s3d.data.nnunet`. See ``docs/finetuning.md``.
"""

from s3d.data.nnunet import DatasetError
from s3d.finetune.config import FinetuneConfig, auto_patch_size, make_split
from s3d.finetune.job import run
from s3d.finetune.losses import DiceCELoss
from s3d.finetune.patches import CachedCase, sample_patches
from s3d.finetune.probing import ProbeResult, ProbeRun, probe
from s3d.finetune.schedules import (
    PAPER_STEPS,
    PAPER_WARMUP_STEPS,
    SCHEDULES,
    TABLE8_STEPS,
    Phase,
    Schedule,
    get_schedule,
    lr_at,
    phase_at,
)
from s3d.finetune.trainer import StepRecord, Trainer
from s3d.finetune.transfer import decoder_parameters, encoder_parameters, prepare_model

__all__ = [
    "PAPER_STEPS",
    "PAPER_WARMUP_STEPS",
    "SCHEDULES",
    "TABLE8_STEPS",
    "CachedCase",
    "DatasetError",
    "DiceCELoss",
    "FinetuneConfig",
    "Phase",
    "ProbeResult",
    "ProbeRun",
    "Schedule",
    "StepRecord",
    "Trainer",
    "auto_patch_size",
    "decoder_parameters",
    "encoder_parameters",
    "get_schedule",
    "lr_at",
    "make_split",
    "phase_at",
    "prepare_model",
    "probe",
    "run",
    "sample_patches",
]
