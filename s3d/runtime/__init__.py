"""What every s3d job shares: device and AMP, checkpoints, the metrics log, learning rates, RNG
state, optimiser steps, progress bars and ``torchrun`` process groups.

Pre-training (:mod:`s3d.pretrain`), fine-tuning (:mod:`s3d.finetune`) and prediction
(:mod:`s3d.infer`) are built on these pieces, so a change to how a checkpoint is written or a device
is picked is made once, here:

- :mod:`~s3d.runtime.device`: ``resolve_device`` and ``resolve_amp`` (one vocabulary,
  ``auto|bf16|fp16|off``), ``autocast``;
- :mod:`~s3d.runtime.checkpoint`: one checkpoint format, atomic saves that keep the previous
  checkpoint, one resume policy;
- :mod:`~s3d.runtime.metrics`: the ``metrics.jsonl`` log (append, read, truncate on resume);
- :mod:`~s3d.runtime.lr`: learning rate as a pure function of the step (linear ramps, PolyLR);
- :mod:`~s3d.runtime.optim`: SGD, the AMP-aware backward/clip/step, RNG states;
- :mod:`~s3d.runtime.progress`: progress bars;
- :mod:`~s3d.runtime.distributed`: ``torchrun`` process groups (NCCL on GPUs, gloo on CPU).

This package is internal: its names may change between releases.
"""
