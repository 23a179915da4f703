"""Fit a pretrained state dict to a freshly built network: stem, seg heads, decoder, strictness.

Pure functions on state dicts; :func:`s3d.hub.load_pretrained` calls :func:`adapt_state_dict` and
loads the result strictly, so every tensor the network gets is either from the checkpoint or listed
in the :class:`LoadReport` as adapted. Which tensors are the stem, the encoder and the heads is one
:class:`AdaptationKeys` per model family (:data:`RESENC_UNET_KEYS`, :data:`PRIMUS_KEYS`; a registry
entry carries its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

StemMode = Literal["replicate", "random"]


@dataclass(frozen=True)
class AdaptationKeys:
    """Where the tensors that :func:`adapt_state_dict` adapts live in a state dict.

    The defaults are the ResEnc U-Net's (every :class:`~s3d.nn.ResEncUNet`, any depth);
    :data:`PRIMUS_KEYS` are Primus's; a registry entry (:class:`~s3d.hub.ModelEntry`) carries the keys
    of its architecture.

    Attributes:
        stem_key: weight of the first conv, shape (O, in_channels, kd, kh, kw). It (and the bias of
            the same conv) is adapted when the input channels differ.
        encoder_prefix: key prefix of the encoder, stem included (a tuple of prefixes for a family whose
            encoder is several modules); ``decoder=False`` loads only these.
        head_prefix: key prefix of the tensors that depend on the number of classes: the ResEnc
            U-Net's segmentation heads, Primus's whole patch decoder. All are freshly initialised when
            the classes differ; the last of them in the model's state dict is the final head's bias
            (num_classes,).

    Example:
        >>> AdaptationKeys().stem_key
        'encoder.stem.convs.0.conv.weight'
    """

    stem_key: str = "encoder.stem.convs.0.conv.weight"
    encoder_prefix: str | tuple[str, ...] = "encoder."
    head_prefix: str = "decoder.seg_layers."

    @property
    def stem_module(self) -> str:
        """Key prefix of the first conv (its weight and bias), e.g. ``"encoder.stem.convs.0.conv."``."""
        return self.stem_key.rpartition(".")[0] + "."

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` naming the key if ``state`` (a model's state dict) lacks one of the keys.

        Example:
            >>> AdaptationKeys().check(build_resenc_unet("tiny").state_dict())   # passes
        """
        problems = []
        stem = state.get(self.stem_key)
        if stem is None or stem.dim() < 2:
            problems.append(f"stem_key {self.stem_key!r} is not a conv weight of the model")
        for name in ("encoder_prefix", "head_prefix"):
            prefix = getattr(self, name)
            if not any(k.startswith(prefix) for k in state):
                problems.append(f"{name} {prefix!r} starts no key of the model")
        if problems:
            raise ValueError(
                f"adaptation keys: {'; '.join(problems)} (the model's keys start with "
                f"{sorted({k.split('.')[0] for k in state})}). Pass keys=AdaptationKeys(...) naming the "
                "model's first conv weight, encoder prefix and segmentation-head prefix."
            )


#: The ResEnc U-Net's keys (the defaults of :class:`AdaptationKeys`); used where no registry entry says otherwise.
RESENC_UNET_KEYS = AdaptationKeys()

#: Primus's keys: the patch embedding is the stem; the encoder is the stem, the transformer and the (zero)
#: mask token; the whole patch decoder depends on the classes (its widths are derived from them).
PRIMUS_KEYS = AdaptationKeys(
    stem_key="down_projection.proj.weight",
    encoder_prefix=("down_projection.", "eva.", "mask_token"),
    head_prefix="up_projection.",
)


def keys_for(config: object) -> AdaptationKeys:
    """The adaptation keys of a model family, by its config (:data:`PRIMUS_KEYS` or :data:`RESENC_UNET_KEYS`).

    Example:
        >>> keys_for(s3d.nn.PrimusConfig()).stem_key
        'down_projection.proj.weight'
    """
    from s3d.nn.primus import PrimusConfig

    return PRIMUS_KEYS if isinstance(config, PrimusConfig) else RESENC_UNET_KEYS


class StrictLoadError(KeyError):
    """A strict load found missing, unexpected or reshaped tensors (the message names them)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class LoadReport:
    """What :func:`s3d.hub.load_pretrained` loaded and what it adapted.

    Attributes:
        source: the resolved local file the weights came from.
        format: ``"s3d"`` (safetensors + config.json) or ``"nnssl"`` (.pth).
        repo_id, revision, commit: Hub origin (``None`` for local files); ``commit`` is the
            resolved 40-hex commit when known.
        sha256: the verified sha256 of the weights file, ``None`` if not pinned.
        stem: ``"loaded"`` (channels matched), ``"replicated"`` or ``"random"``.
        stem_channels: (checkpoint in_channels, model in_channels).
        new_head: the tensors under the head prefix are freshly initialised (ResEnc:
            ``decoder.seg_layers.*``; Primus: the whole ``up_projection``).
        head_classes: (checkpoint num_classes, model num_classes).
        random_decoder: the whole decoder is freshly initialised (``decoder=False``).
        adapted_keys: every model key not taken from the checkpoint.
        missing_keys, unexpected_keys, mismatched_keys: partial-load findings (only non-empty when
            ``strict=False``; with ``strict=True`` they are errors).
        alias_preferred: ``"all_modules"`` when DNA's ``all_modules`` copies were used (sparse
            trainer checkpoints), else ``"canonical"``.
        stale_alias_keys: keys whose DNA alias copies disagreed.
        dropped_keys: checkpoint tensors a segmentation network has no place for, set aside by design
            (Primus pre-training: MAE's decoder EVA ``decoder.*``, the learnt ``mask_token``,
            projection heads); never an error, unlike ``unexpected_keys``.
        pos_embed_grid: (checkpoint grid, model grid) in tokens per axis when Primus's absolute
            position embedding was interpolated to another patch, else ``None``.
        recommended_input_shape: the fine-tuning patch (voxels) the checkpoint recommends (nnssl's
            ``recommended_downstream_patchsize``), ``None`` when it names none.
        notes: human-readable remarks.
    """

    source: str = ""
    format: str = "s3d"
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    sha256: str | None = None
    stem: str = "loaded"
    stem_channels: tuple[int, int] = (1, 1)
    new_head: bool = False
    head_classes: tuple[int, int] = (0, 0)
    random_decoder: bool = False
    adapted_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    alias_preferred: str = "canonical"
    stale_alias_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)
    pos_embed_grid: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    recommended_input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per finding, for logs."""
        lines = [f"loaded {self.format} weights from {self.source}"]
        if self.stem != "loaded":
            lines.append(
                f"stem {self.stem}: {self.stem_channels[0]} -> {self.stem_channels[1]} input channels"
            )
        if self.new_head:
            lines.append(f"new segmentation heads: {self.head_classes[0]} -> {self.head_classes[1]} classes")
        if self.random_decoder:
            lines.append("decoder freshly initialised (encoder only)")
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name}: {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if self.alias_preferred != "canonical":
            lines.append(f"used DNA all_modules copies ({len(self.stale_alias_keys)} stale alias tensor(s))")
        if self.dropped_keys:
            from s3d.nn.primus.convert import describe_dropped

            lines.append(f"dropped {len(self.dropped_keys)} pre-training tensor(s) a segmentation network does not "
                         f"use: {describe_dropped(self.dropped_keys)}")
        if self.pos_embed_grid is not None:
            old, new = self.pos_embed_grid
            lines.append(f"position embedding interpolated from a {'x'.join(map(str, old))} to a "
                         f"{'x'.join(map(str, new))} token grid (trilinear)")
        lines.extend(self.notes)
        return "\n".join(lines)


def replicate_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Spread a stem conv weight (O, C, kd, kh, kw) over ``in_channels`` input channels.

    The weights are summed over the checkpoint's channels and divided by ``in_channels`` for each
    new channel, so an input that repeats one image in every channel gives the same stem output as
    that image through the original (1-channel) stem.

    Example:
        >>> w = torch.randn(32, 1, 3, 3, 3)
        >>> replicate_stem(w, 3).shape
        torch.Size([32, 3, 3, 3, 3])
    """
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / in_channels).repeat(1, in_channels, 1, 1, 1).contiguous()


def adapt_state_dict(
    pretrained: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    stem: StemMode = "replicate",
    decoder: bool = True,
    strict: bool = True,
    report: LoadReport | None = None,
    keys: AdaptationKeys = RESENC_UNET_KEYS,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Build a full state dict for the target network from pretrained tensors.

    Args:
        pretrained: canonical checkpoint state dict.
        target: the freshly initialised network's state dict (its values fill adapted keys).
        stem: when input channels differ: ``"replicate"`` (see :func:`replicate_stem`) or
            ``"random"`` (keep the fresh He-initialised stem conv weight and bias).
        decoder: ``False`` loads the encoder only (``keys.encoder_prefix``) and keeps every other
            fresh tensor (the decoder: transpconvs, stages, seg heads).
        strict: raise on missing, unexpected or reshaped tensors (naming them); ``False`` keeps
            the fresh tensor for those and lists them in the report.
        report: a report to fill (a new one if ``None``).
        keys: the stem, encoder and head keys (ResEnc U-Net defaults); each must exist in ``target``.

    Returns:
        ``(state_dict, report)``; ``state_dict`` has exactly ``target``'s keys.

    Example:
        >>> state, report = adapt_state_dict(ckpt_sd, net.state_dict(), stem="replicate")
        >>> net.load_state_dict(state)
    """
    report = report or LoadReport()
    if stem not in ("replicate", "random"):
        raise ValueError(f"stem: expected 'replicate' or 'random', got {stem!r}")
    keys.check(target)
    out: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    stem_w, target_stem = pretrained.get(keys.stem_key), target[keys.stem_key]
    if stem_w is not None:
        report.stem_channels = (int(stem_w.shape[1]), int(target_stem.shape[1]))
    head_key = [k for k in target if k.startswith(keys.head_prefix)][-1]  # the final head's bias (num_classes,)
    head_w, target_head = pretrained.get(head_key), target[head_key]
    if head_w is not None:
        report.head_classes = (int(head_w.shape[0]), int(target_head.shape[0]))
    new_head = head_w is not None and head_w.shape[0] != target_head.shape[0]
    stem_differs = report.stem_channels[0] != report.stem_channels[1]
    if not decoder:
        report.random_decoder = True
    for key, fresh in target.items():
        if not decoder and not key.startswith(keys.encoder_prefix):
            out[key] = fresh
            adapted.append(key)
            continue
        if new_head and key.startswith(keys.head_prefix):
            out[key] = fresh
            adapted.append(key)
            report.new_head = True
            continue
        # the stem bias does not depend on the input channels: replicate loads it like any tensor
        if stem_differs and key.startswith(keys.stem_module) and (stem == "random" or key == keys.stem_key):
            if stem == "random":
                out[key], report.stem = fresh, "random"
            else:
                out[key] = replicate_stem(pretrained[key], int(fresh.shape[1])).to(fresh.dtype)
                report.stem = "replicated"
            adapted.append(key)
            continue
        if key not in pretrained:
            report.missing_keys.append(key)
            out[key] = fresh
            continue
        value = pretrained[key]
        if value.shape != fresh.shape:
            report.mismatched_keys.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(fresh.shape)}"
            )
            out[key] = fresh
            continue
        out[key] = value.to(fresh.dtype)
    skipped = (
        (lambda k: not k.startswith(keys.encoder_prefix))
        if not decoder
        else ((lambda k: k.startswith(keys.head_prefix)) if new_head else (lambda k: False))
    )
    report.unexpected_keys = sorted(k for k in pretrained if k not in target and not skipped(k))
    report.adapted_keys = adapted
    if strict and (report.missing_keys or report.unexpected_keys or report.mismatched_keys):
        problems = []
        if report.missing_keys:
            problems.append(f"missing from the checkpoint: {_some(report.missing_keys)}")
        if report.unexpected_keys:
            problems.append(f"not in the model: {_some(report.unexpected_keys)}")
        if report.mismatched_keys:
            problems.append(f"shape mismatch: {_some(report.mismatched_keys)}")
        raise StrictLoadError(
            f"{report.source or 'checkpoint'}: strict load failed - "
            + "; ".join(problems)
            + ". Pass strict=False for a partial load (the report lists what was skipped)."
        )
    return out, report


def _some(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
