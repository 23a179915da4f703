"""Weight transfer for fine-tuning: a pretrained network adapted to the downstream channels and classes.

"Decoder only" means the encoder (stem included) gets no update at all: its parameters are not in
the optimiser *and* have ``requires_grad=False``, so neither gradients, momentum nor weight decay
can move them. (The reference implementation optimises ``decoder.parameters()``, which there
includes the encoder because DNA's decoder holds a reference to it.)
"""

from __future__ import annotations

import os
from typing import Any, Literal

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


def encoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the encoder, stem included (everything a decoder-only phase must not move)."""
    return list(model.encoder.parameters())


def decoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the decoder (transposed convs, decoder stages, segmentation heads), not the encoder."""
    enc = {id(p) for p in model.encoder.parameters()}
    return [p for p in model.decoder.parameters() if id(p) not in enc]
