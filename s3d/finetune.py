"""Fine-tuning a pretrained ResEnc U-Net: weight transfer, the paper's schedules, the training loop.

The public face of :mod:`s3d.train.finetune` (``from s3d import finetune``)::

    from s3d.finetune import prepare_model, get_schedule, finetune

    net = prepare_model("s3d-b", in_channels=2, num_classes=3, strategy="all", stem="replicate")
    get_schedule("best").plan(250_000)      # warm-up 1 (decoder), warm-up 2 (all), training
    finetune("Dataset001_Brain", "runs/brain", pretrained="s3d-b", schedule="best")

See ``docs/finetuning.md``.
"""

from s3d.data.nnunet import (
    DatasetError,
    NnUNetDataset,
    PreprocessingSpec,
    preprocess_case,
    read_dataset_json,
    restore_geometry,
    validate_dataset,
)
from s3d.train.finetune import (
    PAPER_STEPS,
    PAPER_WARMUP_STEPS,
    SCHEDULES,
    TABLE8_STEPS,
    AugmentConfig,
    DiceCELoss,
    FinetuneConfig,
    Phase,
    Schedule,
    Trainer,
    augment_batch,
    decoder_parameters,
    encoder_parameters,
    finetune,
    get_schedule,
    lr_at,
    make_split,
    phase_at,
    prepare_model,
    sample_patches,
)

__all__ = [
    "PAPER_STEPS",
    "PAPER_WARMUP_STEPS",
    "SCHEDULES",
    "TABLE8_STEPS",
    "AugmentConfig",
    "DatasetError",
    "DiceCELoss",
    "FinetuneConfig",
    "NnUNetDataset",
    "Phase",
    "PreprocessingSpec",
    "Schedule",
    "Trainer",
    "augment_batch",
    "decoder_parameters",
    "encoder_parameters",
    "finetune",
    "get_schedule",
    "lr_at",
    "make_split",
    "phase_at",
    "prepare_model",
    "preprocess_case",
    "read_dataset_json",
    "restore_geometry",
    "sample_patches",
    "validate_dataset",
]
