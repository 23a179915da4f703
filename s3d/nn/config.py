"""Architecture configuration of the ResEnc U-Net: a plain dataclass that round-trips through JSON.

The configuration is the single source of truth for the network's shape: it goes into
``config.json`` next to the weights, and :func:`s3d.build_resenc_unet` rebuilds the
identical network from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from s3d._dataclasses import from_dict_strict, to_jsonable_dict
from s3d._triple import Triple, to_3tuple, triple

NORMS = ("instance", "batch")
NONLINS = ("leaky_relu", "relu", "gelu")


@dataclass
class ResEncUNetConfig:
    """Shape of a 3D residual-encoder U-Net (nnU-Net's ``ResidualEncoderUNet``).

    Attributes:
        features_per_stage: channels of each encoder stage, highest resolution first.
        strides: downsampling of each stage's first block (int or (sd, sh, sw)); the first
            entry is normally 1 so that the stem keeps the input resolution.
        n_blocks_per_stage: residual blocks (BasicBlockD) per encoder stage.
        kernel_sizes: conv kernel of each stage (int or 3 ints), also used by the decoder.
        n_conv_per_stage_decoder: conv-norm-act layers per decoder stage (``n_stages - 1`` entries,
            lowest resolution first).
        in_channels: input channels (image modalities).
        num_classes: output channels of the segmentation head (logits).
        deep_supervision: return a list of logits at every decoder resolution, highest first.
        stem_channels: channels of the stem conv; ``None`` means ``features_per_stage[0]``.
        conv_bias: bias on the 3x3x3 and transposed convs (the 1x1x1 skip conv never has one).
        norm: ``"instance"`` (InstanceNorm3d) or ``"batch"`` (BatchNorm3d).
        norm_eps: epsilon of the norm layers.
        norm_affine: learnable scale and shift in the norm layers.
        nonlin: ``"leaky_relu"``, ``"relu"`` or ``"gelu"``.
        negative_slope: slope of LeakyReLU for negative inputs.
    """

    features_per_stage: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    strides: tuple[Any, ...] = (1, 2, 2, 2, 2, 2)
    n_blocks_per_stage: tuple[int, ...] = (1, 3, 4, 6, 6, 6)
    kernel_sizes: tuple[Any, ...] = (3, 3, 3, 3, 3, 3)
    n_conv_per_stage_decoder: tuple[int, ...] = (1, 1, 1, 1, 1)
    in_channels: int = 1
    num_classes: int = 2
    deep_supervision: bool = False
    stem_channels: int | None = None
    conv_bias: bool = True
    norm: str = "instance"
    norm_eps: float = 1e-5
    norm_affine: bool = True
    nonlin: str = "leaky_relu"
    negative_slope: float = 1e-2
    # Free-form provenance (e.g. the preset name); not used to build the network.
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        n = len(self.features_per_stage)
        if n < 2:
            raise ValueError(f"features_per_stage: need at least 2 stages, got {self.features_per_stage!r}")
        self.features_per_stage = tuple(int(f) for f in self.features_per_stage)
        if isinstance(self.n_blocks_per_stage, int):
            self.n_blocks_per_stage = (self.n_blocks_per_stage,) * n
        if isinstance(self.n_conv_per_stage_decoder, int):
            self.n_conv_per_stage_decoder = (self.n_conv_per_stage_decoder,) * (n - 1)
        if isinstance(self.strides, int):
            self.strides = (1,) + (self.strides,) * (n - 1)
        if isinstance(self.kernel_sizes, int):
            self.kernel_sizes = (self.kernel_sizes,) * n
        self.strides = tuple(to_3tuple(s, f"strides[{i}]") for i, s in enumerate(self.strides))
        self.kernel_sizes = tuple(to_3tuple(k, f"kernel_sizes[{i}]") for i, k in enumerate(self.kernel_sizes))
        self.n_blocks_per_stage = tuple(int(b) for b in self.n_blocks_per_stage)
        self.n_conv_per_stage_decoder = tuple(int(c) for c in self.n_conv_per_stage_decoder)
        for fname, want in (
            ("strides", n),
            ("kernel_sizes", n),
            ("n_blocks_per_stage", n),
            ("n_conv_per_stage_decoder", n - 1),
        ):
            got = len(getattr(self, fname))
            if got != want:
                raise ValueError(
                    f"{fname}: expected {want} entries for {n} stages "
                    f"(features_per_stage={self.features_per_stage}), got {got}"
                )
        for fname in ("features_per_stage", "n_blocks_per_stage", "n_conv_per_stage_decoder"):
            if any(v < 1 for v in getattr(self, fname)):
                raise ValueError(f"{fname}: every entry must be >= 1, got {getattr(self, fname)}")
        if any(k % 2 == 0 for ks in self.kernel_sizes for k in ks):
            raise ValueError(f"kernel_sizes: must be odd (same padding), got {self.kernel_sizes}")
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be >= 1, got {self.in_channels} and {self.num_classes}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {self.norm!r}")
        if self.nonlin not in NONLINS:
            raise ValueError(f"nonlin: expected one of {NONLINS}, got {self.nonlin!r}")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        """Number of encoder stages (resolutions)."""
        return len(self.features_per_stage)

    @property
    def total_stride(self) -> Triple:
        """Downsampling from the input to the bottleneck, per axis (voxels)."""
        return triple(math.prod(s[a] for s in self.strides) for a in range(3))

    def stage_strides(self) -> list[Triple]:
        """Cumulative stride of each encoder stage's output relative to the input, per axis."""
        out: list[Triple] = []
        acc: Triple = (1, 1, 1)
        for s in self.strides:
            acc = triple(a * b for a, b in zip(acc, s, strict=True))
            out.append(acc)
        return out

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return to_jsonable_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResEncUNetConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error that names them."""
        return from_dict_strict(cls, d)

    def to_json(self, indent: int | None = 2) -> str:
        """The configuration as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ResEncUNetConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> ResEncUNetConfig:
        """A copy with some fields changed (validated); unknown field names raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config override(s) {unknown}; known: {sorted(known)}")
        d = self.to_dict()
        d.update(overrides)
        return ResEncUNetConfig.from_dict(d)


#: Named presets. ``resenc_l`` is the paper's backbone (nnU-Net's ResEnc-L at a 160^3 patch).
CONFIGS: dict[str, ResEncUNetConfig] = {
    "resenc_l": ResEncUNetConfig(name="resenc_l"),
    # Small 5-stage networks for CPU demos ("small") and tests ("tiny"): total stride 16, so a
    # 32^3 input gives a 2^3 bottleneck.
    "small": ResEncUNetConfig(
        features_per_stage=(16, 32, 64, 128, 160),
        strides=(1, 2, 2, 2, 2),
        n_blocks_per_stage=(1, 2, 2, 2, 2),
        kernel_sizes=(3, 3, 3, 3, 3),
        n_conv_per_stage_decoder=(1, 1, 1, 1),
        name="small",
    ),
    "tiny": ResEncUNetConfig(
        features_per_stage=(8, 16, 32, 64, 64),
        strides=(1, 2, 2, 2, 2),
        n_blocks_per_stage=(1, 1, 1, 1, 1),
        kernel_sizes=(3, 3, 3, 3, 3),
        n_conv_per_stage_decoder=(1, 1, 1, 1),
        name="tiny",
    ),
}


def get_config(name: str) -> ResEncUNetConfig:
    """Return a copy of the named preset (``resenc_l``, ``small``, ``tiny``)."""
    try:
        return CONFIGS[name].replace()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; available: {sorted(CONFIGS)}") from None
