"""What trains in a phase, and the DDP wrapper of that trainable set.

:func:`trainable_parameters` turns a :class:`~s3d.finetune.schedules.Phase` into the parameters that
train (and sets ``requires_grad`` on the model accordingly: a frozen parameter gets no gradient,
no momentum, no weight decay). :func:`wrap_ddp` wraps the model for torchrun: DDP expects a gradient
for every parameter that required one when it was built, so the trainer wraps again whenever the
trainable set changes (decoder-only warm-up -> all weights) and never needs ``find_unused_parameters``.

Example:
    >>> params = trainable_parameters(model, get_schedule("best").plan(100)[0])   # warm-up 1: decoder
    >>> net = wrap_ddp(model, info, device)                                        # model itself when alone
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from s3d.finetune.schedules import ADAMW_BETAS, Phase, Schedule
from s3d.nn.family import encoder_decoder_parameters, stem_parameters
from s3d.runtime.distributed import DistInfo
from s3d.runtime.optim import adamw, sgd


def trainable_parameters(model: nn.Module, phase: Phase, train_stem_in_decoder_warmup: bool = False
                         ) -> list[nn.Parameter]:
    """The parameters that train in ``phase``; sets ``requires_grad`` (and drops the grads) of the others.

    ``trains="all"``: every parameter; ``"decoder"``: the decoder only (plus the stem in warm-up 1 with
    ``train_stem_in_decoder_warmup``, Table 6's "unfrozen"). For Primus the decoder is ``up_projection`` and
    the encoder ``down_projection`` (the stem) + ``eva`` (position embedding included). With deep supervision the
    lowest-resolution head is never trainable: its loss weight is 0 (nnU-Net's weights), so it gets no
    gradient (and under DDP a parameter without a gradient would stall the reduction).

    Example:
        >>> [p.requires_grad for p in model.encoder.parameters()][:1]   # after a decoder-only phase
        [False]
    """
    if phase.trains == "all":
        params = list(model.parameters())
    else:
        params = encoder_decoder_parameters(model)[1]
        if phase.name == "warmup_decoder" and train_stem_in_decoder_warmup:
            params += stem_parameters(model)
    if model.deep_supervision and len(model.decoder.seg_layers) > 1:
        unused = {id(p) for p in model.decoder.seg_layers[0].parameters()}
        params = [p for p in params if id(p) not in unused]
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
        if id(p) not in ids:
            p.grad = None
    return params


def make_optimizer(schedule: Schedule, params: list[nn.Parameter], lr: float, *, momentum: float = 0.99,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The schedule's optimiser over ``params``: nnU-Net's SGD (Nesterov, ``momentum``) or AdamW (the Primus
    recipe: betas (0.9, 0.98)); ``weight_decay=None`` takes the schedule's default (SGD 3e-5, AdamW 5e-2).

    Example:
        >>> make_optimizer(get_schedule("primus"), list(model.parameters()), 1e-4).defaults["weight_decay"]
        0.05
    """
    decay = schedule.default_weight_decay if weight_decay is None else float(weight_decay)
    if schedule.optimizer == "adamw":
        return adamw(params, lr, betas=ADAMW_BETAS, weight_decay=decay)
    return sgd(params, lr, momentum=momentum, weight_decay=decay)


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """A new DDP wrapper around ``model`` for its current ``requires_grad`` set (``model`` when alone).

    Drop the previous wrapper before calling this: its reducer removes its gradient hooks when it is
    freed (a garbage collection here frees a wrapper caught in a reference cycle).
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    gc.collect()
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


__all__ = ["make_optimizer", "trainable_parameters", "wrap_ddp"]
