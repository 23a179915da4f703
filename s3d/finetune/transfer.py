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
    **load_kwargs: Any,
) -> ResEncUNet:
    """A network for fine-tuning with ``in_channels`` inputs and ``num_classes`` outputs.

    Args:
        source: a pretrained :class:`~s3d.nn.ResEncUNet`; a registry name, Hub repo, model
            directory or checkpoint path for :func:`s3d.hub.load_pretrained`; or ``None`` to train
            from scratch (``build_resenc_unet(config)``, He init).
        in_channels: image channels of the downstream data. When the source has fewer (1 at
            pre-training), the stem is adapted as ``stem`` says.
        num_classes: output classes; a new segmentation head when it differs from the source.
        strategy: ``"all"`` transfers encoder and decoder; ``"encoder"`` keeps a random decoder.
        stem: ``"replicate"`` (Table 6's best: pretrained stem replicated over channels) or
            ``"random"`` (fresh stem).
        config: architecture preset for ``source=None``.
        deep_supervision: return logits at every decoder resolution (training).
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
    if source is None:
        model = build_resenc_unet(config, in_channels=in_channels, num_classes=num_classes,
                                  deep_supervision=deep_supervision)
    elif isinstance(source, nn.Module):
        from s3d.hub.adapt import LoadReport, adapt_state_dict

        if not isinstance(source, ResEncUNet):
            raise TypeError(f"source: expected a ResEncUNet, got {type(source).__name__}")
        model = build_resenc_unet(source.config, in_channels=in_channels, num_classes=num_classes,
                                  deep_supervision=deep_supervision)
        state, report = adapt_state_dict(source.state_dict(), model.state_dict(), stem=stem,
                                         decoder=strategy == "all", report=LoadReport(source="nn.Module"))
        model.load_state_dict(state, strict=True)
    else:
        from s3d.hub import load_pretrained

        model, report = load_pretrained(source, in_channels=in_channels, num_classes=num_classes, stem=stem,
                                        decoder=strategy == "all", output_loading_info=True, **load_kwargs)
        model.deep_supervision = deep_supervision
    model.transfer_report = report  # type: ignore[attr-defined]
    return model.train()


def run_model(cfg: Any, transfer: str, ds: Any, device: torch.device, state: dict[str, Any] | None = None,
              given: ResEncUNet | None = None, announce: bool = True) -> ResEncUNet:
    """The network of a fine-tuning run, on ``device`` in train mode.

    From the checkpoint ``state`` (resume), else ``given``, else :func:`prepare_model` from
    ``cfg.pretrained`` with the weights ``transfer`` says (``cfg.strategy`` wins over the schedule's;
    ``"none"``: from scratch), fresh weights seeded by ``cfg.seed``.

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
        from s3d.nn.config import ResEncUNetConfig

        model = build_resenc_unet(ResEncUNetConfig.from_json(state["model_config"]))
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
                                  stem=cfg.stem, config=cfg.config)
    if model.config.in_channels != ds.num_channels or model.config.num_classes != ds.num_classes:
        raise ValueError(f"model has {model.config.in_channels} input channel(s) and {model.config.num_classes} "
                         f"classes; the dataset needs {ds.num_channels} and {ds.num_classes}")
    model.deep_supervision = cfg.deep_supervision
    model.to(device).train()
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    return model


def encoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the encoder, stem included (everything a decoder-only phase must not move)."""
    return list(model.encoder.parameters())


def decoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the decoder (transposed convs, decoder stages, segmentation heads), not the encoder."""
    enc = {id(p) for p in model.encoder.parameters()}
    return [p for p in model.decoder.parameters() if id(p) not in enc]
