"""Weight transfer for fine-tuning: a pretrained network adapted to the downstream channels and classes.

"Decoder only" means the encoder (stem included) gets no update at all: its parameters are not in
the optimiser *and* have ``requires_grad=False``, so neither gradients, momentum nor weight decay
can move them. (The reference implementation optimises ``decoder.parameters()``, which there
includes the encoder because DNA's decoder holds a reference to it.)
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn

from s3d.nn.family import Model, build_from_config, config_from_json, encoder_decoder_parameters
from s3d.nn.primus import PRIMUS_CONFIGS, Primus, PrimusConfig, build_primus
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet

Strategy = Literal["all", "encoder"]


def prepare_model(
    source: nn.Module | str | os.PathLike[str] | None,
    *,
    in_channels: int,
    num_classes: int,
    strategy: Strategy = "all",
    stem: Literal["replicate", "random"] = "replicate",
    config: str | Any = "resenc_l",
    deep_supervision: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    **load_kwargs: Any,
) -> Model:
    """A network for fine-tuning with ``in_channels`` inputs and ``num_classes`` outputs (either family).

    Args:
        source: a pretrained :class:`~s3d.nn.ResEncUNet` or :class:`~s3d.nn.Primus`; a registry name, Hub
            repo, model directory or checkpoint path for :func:`s3d.hub.load_pretrained`; or ``None`` to
            train from scratch (``build_resenc_unet(config)`` / ``build_primus(config)``).
        in_channels: image channels of the downstream data. When the source has fewer (1 at
            pre-training), the stem is adapted as ``stem`` says.
        num_classes: output classes; a new segmentation head when it differs from the source.
        strategy: ``"all"`` transfers encoder and decoder; ``"encoder"`` keeps a random decoder.
        stem: ``"replicate"`` (Table 6's best: pretrained stem replicated over channels) or
            ``"random"`` (fresh stem).
        config: architecture preset for ``source=None`` (``"resenc_l"``, ``"primus_m"``, ... or a config).
        deep_supervision: return logits at every decoder resolution (training; ResEnc only, Primus has one).
        input_shape: Primus only: the training patch (D, H, W voxels) of the returned network; a pretrained
            one's position embedding is interpolated to it. ``None``: the checkpoint's (recommended) patch or
            the preset's. Ignored for a ResEnc U-Net, which takes any multiple of its stride.
        **load_kwargs: passed to :func:`s3d.hub.load_pretrained` (``revision``, ``strict``, ...).

    Returns:
        The model (train mode, CPU); ``model.transfer_report`` holds the hub's ``LoadReport`` (or
        ``None`` from scratch).

    Example:
        >>> net = prepare_model("s3d-b", in_channels=2, num_classes=3, strategy="all")
        >>> net.transfer_report.stem
        'replicated'
    """
    if strategy not in ("all", "encoder"):
        raise ValueError(f"strategy: expected 'all' or 'encoder', got {strategy!r}")
    if stem not in ("replicate", "random"):
        raise ValueError(f"stem: expected 'replicate' or 'random', got {stem!r}")
    report = None
    model: Model
    if source is None:
        if isinstance(config, PrimusConfig) or (isinstance(config, str) and config in PRIMUS_CONFIGS):
            shape = {} if input_shape is None else {"input_shape": input_shape}
            model = build_primus(config, in_channels=in_channels, num_classes=num_classes, **shape)
        else:
            model = build_resenc_unet(config, in_channels=in_channels, num_classes=num_classes,
                                      deep_supervision=deep_supervision)
    elif isinstance(source, nn.Module):
        from s3d.hub.adapt import LoadReport, adapt_state_dict, keys_for

        if not isinstance(source, ResEncUNet | Primus):
            raise TypeError(f"source: expected a ResEncUNet or Primus, got {type(source).__name__}")
        if isinstance(source, Primus) and input_shape is not None and tuple(input_shape) != source.config.input_shape:
            raise ValueError(f"input_shape {tuple(input_shape)}: the given Primus takes {source.config.input_shape}; "
                             "load it with s3d.hub.load_pretrained(..., input_shape=) to interpolate its position "
                             "embedding")
        model = build_from_config(source.config, in_channels=in_channels, num_classes=num_classes)
        state, report = adapt_state_dict(source.state_dict(), model.state_dict(), stem=stem,
                                         decoder=strategy == "all", report=LoadReport(source="nn.Module"),
                                         keys=keys_for(source.config))
        model.load_state_dict(state, strict=True)
    else:
        from s3d.hub.pretrained import load_pretrained_for_finetuning

        model, report = load_pretrained_for_finetuning(
            source, in_channels=in_channels, num_classes=num_classes, stem=stem, decoder=strategy == "all",
            input_shape=input_shape, **load_kwargs)
    if isinstance(model, ResEncUNet):
        model.deep_supervision = deep_supervision
    model.transfer_report = report  # type: ignore[attr-defined]
    return model.train()


def run_model(cfg: Any, transfer: str, ds: Any, device: torch.device, state: dict[str, Any] | None = None,
              given: Model | None = None, announce: bool = True) -> Model:
    """The network of a fine-tuning run, on ``device`` in train mode.

    From the checkpoint ``state`` (resume), else ``given``, else :func:`prepare_model` from
    ``cfg.pretrained`` with the weights ``transfer`` says (``cfg.strategy`` wins over the schedule's;
    ``"none"``: from scratch), fresh weights seeded by ``cfg.seed``. A Primus gets ``input_shape =
    cfg.patch_size`` when that is set; deep supervision applies to a ResEnc U-Net only.

    Args:
        cfg: the :class:`~s3d.finetune.FinetuneConfig`.
        transfer: the schedule's transfer (``"all"``, ``"encoder"``, ``"none"``).
        ds: the dataset (``num_channels``, ``num_classes``).
        device: where the model goes.
        state: a checkpoint to resume from.
        given: a network to use instead.
        announce: print when a transferring schedule has no ``--pretrained`` (rank 0 only).

    Raises:
        ValueError: the model's channels or classes do not fit the dataset.

    Example:
        >>> net = run_model(cfg, "all", read_dataset_json(cfg.dataset), torch.device("cpu"))
    """
    if state is not None:
        model = build_from_config(config_from_json(state["model_config"], state.get("model_type", "ResEncUNet")))
        model.load_state_dict(state["model"])
    elif given is not None:
        model = given
    else:
        transfer = cfg.strategy or transfer
        source = None if transfer == "none" else cfg.pretrained
        if transfer != "none" and cfg.pretrained is None and announce:
            print(f"schedule {cfg.schedule!r} transfers weights but no --pretrained was given: training from scratch")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # fresh weights (scratch, new head/decoder/stem) follow the seed
            model = prepare_model(source, in_channels=ds.num_channels, num_classes=ds.num_classes,
                                  strategy="all" if transfer == "none" else transfer,  # type: ignore[arg-type]
                                  stem=cfg.stem, config=cfg.config, input_shape=cfg.patch_size)
    if model.config.in_channels != ds.num_channels or model.config.num_classes != ds.num_classes:
        raise ValueError(f"model has {model.config.in_channels} input channel(s) and {model.config.num_classes} "
                         f"classes; the dataset needs {ds.num_channels} and {ds.num_classes}")
    if isinstance(model, ResEncUNet):
        model.deep_supervision = cfg.deep_supervision
    model.to(device).train()
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    return model


def encoder_parameters(model: Model) -> list[nn.Parameter]:
    """Parameters of the encoder, stem included (everything a decoder-only phase must not move).

    ResEnc U-Net: ``encoder.*``; Primus: ``down_projection.*`` + ``eva.*`` (position embedding included).
    """
    return encoder_decoder_parameters(model)[0]


def decoder_parameters(model: Model) -> list[nn.Parameter]:
    """Parameters of the decoder, not the encoder (ResEnc: transposed convs, stages, heads; Primus:
    ``up_projection.*``)."""
    return encoder_decoder_parameters(model)[1]
