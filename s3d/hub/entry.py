"""One named set of pretrained weights: :class:`ModelEntry` (the table of them is :mod:`s3d.hub.registry`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from s3d.hub.adapt import RESENC_UNET_KEYS, AdaptationKeys
from s3d.nn.config import ResEncUNetConfig, get_config
from s3d.nn.family import ModelConfig, model_type
from s3d.nn.primus import PrimusConfig, get_primus_config
from s3d.nn.primus.modules import decoder_strides

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelEntry:
    """One named set of pretrained weights.

    Attributes:
        name: the registry name (``load_pretrained(name)``).
        repo_id: Hub repository ``org/name``.
        filename: the weights file inside the repo.
        revision: 40-hex commit (pinned) or a branch name (unpinned).
        format: ``"s3d"`` (model.safetensors + config.json) or ``"nnssl"`` (``.pth`` dict).
        architecture: preset name (``"resenc_l"``, ``"primus_m"``, ...) or config dict used when the
            file does not determine it (nnssl files: the architecture is inferred from tensor shapes and
            the adaptation plan, and this fills what they leave open).
        aliases: other names that resolve to this entry.
        sha256: pinned hex digest of ``filename`` (``None``: not verified).
        method: pre-training method.
        data: pre-training data.
        license: SPDX-like licence id of the weights.
        citation: how to cite.
        provenance: one line: who trained it, how, on what.
        record: the public record this entry rests on (model card, adaptation plan, third-party pins).
        keys: where the stem, encoder and segmentation heads are in the state dict (what
            :func:`~s3d.hub.load_pretrained` adapts); the ResEnc U-Net's by default.
        extra_files: other files in the repo (informational).
        package_data: for weights shipped inside the s3d package: their folder relative to the
            package (s3d format); loaded offline, never from the Hub (``repo_id`` is then empty).
    """

    name: str
    repo_id: str
    filename: str
    revision: str
    format: str
    architecture: str | dict[str, Any] = "resenc_l"
    aliases: tuple[str, ...] = ()
    sha256: str | None = None
    method: str = ""
    data: str = ""
    license: str = ""
    citation: str = ""
    provenance: str = ""
    record: str = ""
    keys: AdaptationKeys = RESENC_UNET_KEYS
    extra_files: tuple[str, ...] = field(default_factory=tuple)
    package_data: str | None = None

    @property
    def pinned(self) -> bool:
        """True when ``revision`` is an immutable 40-hex commit."""
        return bool(_COMMIT_RE.match(self.revision))

    @property
    def config(self) -> ModelConfig:
        """The architecture as a config (a preset name, ``primus_*`` for Primus, or a config dict)."""
        arch = self.architecture
        if isinstance(arch, str):
            return get_primus_config(arch) if arch.startswith("primus") else get_config(arch)
        return PrimusConfig.from_dict(arch) if "embed_dim" in arch else ResEncUNetConfig.from_dict(arch)

    @property
    def family(self) -> str:
        """``"ResEncUNet"`` or ``"Primus"``."""
        return model_type(self.config)

    @property
    def stem_key(self) -> str:
        """``keys.stem_key``: the first conv's weight (adapted for other input channel counts)."""
        return self.keys.stem_key

    @property
    def encoder_prefix(self) -> str | tuple[str, ...]:
        """``keys.encoder_prefix``: key prefix(es) of the encoder."""
        return self.keys.encoder_prefix

    @property
    def head_key(self) -> str:
        """Weight of the final (full-resolution) segmentation head in this architecture."""
        cfg = self.config
        if isinstance(cfg, PrimusConfig):
            return f"{self.keys.head_prefix}decode.{len(decoder_strides(cfg.patch_embed_size)) - 1}.weight"
        return f"{self.keys.head_prefix}{cfg.n_stages - 2}.weight"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict including ``pinned`` and ``family``."""
        d = asdict(self)
        d["pinned"] = self.pinned
        d["family"] = self.family
        return d
