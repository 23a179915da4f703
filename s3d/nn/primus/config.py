"""Architecture configuration of Primus: a plain dataclass that round-trips through JSON, and the presets.

Field names follow dynamic-network-architectures' ``Primus`` constructor (``embed_dim``,
``eva_depth``, ``eva_numheads``, ``patch_embed_size``, ``input_shape``, ``drop_path_rate``,
``init_values``, ``scale_attn_inner``, ...), except ``in_channels``/``num_classes``, which are named as
in :class:`~s3d.nn.ResEncUNetConfig`; DNA's and nnssl's spellings are accepted as aliases
(:data:`ALIASES`). The configuration goes into ``config.json`` next to the weights, and
:func:`s3d.build_primus` rebuilds the identical network from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from s3d._dataclasses import from_dict_strict, to_jsonable_dict
from s3d._triple import Triple, to_3tuple

#: DNA's (and nnssl's) keyword names -> PrimusConfig field names.
ALIASES = {
    "input_channels": "in_channels",
    "output_channels": "num_classes",
    "encoder_eva_depth": "eva_depth",
    "encoder_eva_numheads": "eva_numheads",
    "use_abs_pos_emb": "use_abs_pos_embed",
}

#: DNA's MLP ratio, ``4 * 2 / 3`` (a SwiGLU with the parameter count of a 4x GELU MLP).
MLP_RATIO = 4 * 2 / 3


def canonical_names(overrides: dict[str, Any]) -> dict[str, Any]:
    """Rename DNA/nnssl keyword names (``input_channels``, ``encoder_eva_depth``, ...) to field names.

    Example:
        >>> canonical_names({"input_channels": 2, "embed_dim": 96})
        {'in_channels': 2, 'embed_dim': 96}
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in overrides.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise ValueError(f"{given[name]!r} and {key!r} name the same field {name!r}; pass one of them")
        out[name], given[name] = value, key
    return out


@dataclass
class PrimusConfig:
    """Shape of a Primus network (Wald et al. 2025): patch embedding, EVA transformer, patch decoder.

    Attributes:
        embed_dim: token width (channels after the patch embedding).
        eva_depth: transformer blocks.
        eva_numheads: attention heads; ``embed_dim / eva_numheads`` is the head width, which must be
            divisible by 6 with RoPE on (3 axes x sin/cos pairs: head width / 1.5 divisible by 4).
        patch_embed_size: token size in voxels (int or (pd, ph, pw)), each a power of 2.
        input_shape: the training patch in voxels (int or (D, H, W)), divisible by
            ``patch_embed_size``. The absolute position embedding has one entry per token of this
            patch, so the network takes inputs of exactly this size.
        in_channels: input channels (image modalities).
        num_classes: output channels of the decoder (logits).
        mlp_ratio: hidden width of the SwiGLU MLP over ``embed_dim`` (DNA: 4 * 2 / 3).
        use_rot_pos_emb: 3D rotary position embedding in every attention.
        use_abs_pos_embed: learnt absolute position embedding added to the tokens.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over the blocks.
        proj_drop_rate: dropout after the attention and MLP projections.
        attn_drop_rate: dropout on the attention weights.
        init_values: initial layer scale (``gamma_1``/``gamma_2``); ``None``: no layer scale.
        scale_attn_inner: a LayerNorm on the attention output before its projection.
    """

    embed_dim: int = 864
    eva_depth: int = 16
    eva_numheads: int = 12
    patch_embed_size: Any = (8, 8, 8)
    input_shape: Any = (160, 160, 160)
    in_channels: int = 1
    num_classes: int = 2
    mlp_ratio: float = MLP_RATIO
    use_rot_pos_emb: bool = True
    use_abs_pos_embed: bool = True
    drop_path_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    init_values: float | None = 0.1
    scale_attn_inner: bool = True
    # Free-form provenance (e.g. the preset name); not used to build the network.
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.patch_embed_size = to_3tuple(self.patch_embed_size, "patch_embed_size")
        self.input_shape = to_3tuple(self.input_shape, "input_shape")
        for fname in ("embed_dim", "eva_depth", "eva_numheads", "in_channels", "num_classes"):
            value = getattr(self, fname)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{fname}: expected a positive int, got {value!r}")
        if self.embed_dim % self.eva_numheads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by eva_numheads {self.eva_numheads}")
        if self.use_rot_pos_emb and self.head_dim % 6:
            raise ValueError(
                f"head width embed_dim / eva_numheads = {self.head_dim} must be divisible by 6 for the 3D rotary "
                "embedding (width / 1.5 divisible by 4); change embed_dim or eva_numheads, or use_rot_pos_emb=False"
            )
        bad = [p for p in self.patch_embed_size if p & (p - 1)]
        if bad or max(self.patch_embed_size) < 2:
            raise ValueError(f"patch_embed_size: every entry must be a power of 2 and one >= 2, "
                             f"got {self.patch_embed_size}")
        if any(s % p for s, p in zip(self.input_shape, self.patch_embed_size)):
            raise ValueError(f"input_shape {self.input_shape} is not divisible by patch_embed_size "
                             f"{self.patch_embed_size}")
        for fname in ("drop_path_rate", "proj_drop_rate", "attn_drop_rate"):
            if not 0.0 <= float(getattr(self, fname)) < 1.0:
                raise ValueError(f"{fname}: expected a value in [0, 1), got {getattr(self, fname)!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected > 0, got {self.mlp_ratio!r}")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head (``embed_dim / eva_numheads``)."""
        return self.embed_dim // self.eva_numheads

    @property
    def grid(self) -> Triple:
        """Tokens per axis of ``input_shape`` (``input_shape / patch_embed_size``)."""
        d, h, w = (s // p for s, p in zip(self.input_shape, self.patch_embed_size))
        return d, h, w

    @property
    def num_tokens(self) -> int:
        """Tokens of one input (the length of the absolute position embedding)."""
        return math.prod(self.grid)

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return to_jsonable_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrimusConfig:
        """Build from :meth:`to_dict` output (DNA's names accepted); unknown keys are an error naming them."""
        return from_dict_strict(cls, canonical_names(d))

    def to_json(self, indent: int | None = 2) -> str:
        """The configuration as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PrimusConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> PrimusConfig:
        """A copy with some fields changed (validated; DNA's names accepted); unknown names raise ``ValueError``."""
        overrides = canonical_names(overrides)
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown Primus config override(s) {unknown}; known: {sorted(known)} "
                             f"(or DNA's names {sorted(ALIASES)})")
        d = self.to_dict()
        d.update(overrides)
        return PrimusConfig.from_dict(d)


def _preset(name: str, embed_dim: int, depth: int, heads: int, **kw: Any) -> PrimusConfig:
    return PrimusConfig(embed_dim=embed_dim, eva_depth=depth, eva_numheads=heads, name=name, **kw)


#: Named presets: DNA's ``PrimusS/B/M/L`` (patch 8^3, layer scale 0.1, attention-inner norm; the paper's
#: sizes), at the OpenMind pre-training patch 160^3 unless ``input_shape`` is given. ``primus_tiny`` is
#: a CPU-sized network for tests and examples (2 blocks of width 48, patch 4^3).
PRIMUS_CONFIGS: dict[str, PrimusConfig] = {
    "primus_s": _preset("primus_s", 396, 12, 6),
    "primus_b": _preset("primus_b", 792, 12, 12),
    "primus_m": _preset("primus_m", 864, 16, 12),
    "primus_l": _preset("primus_l", 1056, 24, 16),
    "primus_tiny": _preset("primus_tiny", 48, 2, 2, patch_embed_size=(4, 4, 4), input_shape=(32, 32, 32)),
}

#: DNA's / nnssl's architecture class names of the presets (``PrimusM`` ...) -> s3d preset names.
DNA_CLASS_NAMES = {"PrimusS": "primus_s", "PrimusB": "primus_b", "PrimusM": "primus_m", "PrimusL": "primus_l"}


def get_primus_config(name: str) -> PrimusConfig:
    """A copy of the named preset (``primus_s``, ``primus_b``, ``primus_m``, ``primus_l``, ``primus_tiny``).

    DNA's class names (``"PrimusM"``) are accepted too.

    Example:
        >>> get_primus_config("primus_m").embed_dim
        864
    """
    key = DNA_CLASS_NAMES.get(name, name)
    try:
        return PRIMUS_CONFIGS[key].replace()
    except KeyError:
        raise ValueError(f"unknown Primus preset {name!r}; available: {sorted(PRIMUS_CONFIGS)}") from None
