"""Building blocks of the ResEnc U-Net: conv-norm-act, the ResNet-D basic block, stacks of them.

Every block takes an optional ``keep`` mask (1 = visible, 0 = masked) at its *output*
resolution. With a mask the block behaves as a SparK-style masked-dense layer: the conv
output is re-masked, InstanceNorm statistics come from visible voxels only, and masked
voxels leave the block as exact zeros. Without a mask it is the ordinary dense layer.
Attribute names follow dynamic-network-architectures so state-dict keys match nnU-Net's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from s3d.nn.config import ResEncUNetConfig, Triple
from s3d.nn.masked import masked_instance_norm


class LayerType(NamedTuple):
    """A layer the config names: its class, and the dotted name nnU-Net/nnssl plans import it by."""

    cls: type[nn.Module]
    import_path: str


#: The norm/activation factory's table (MONAI-style: a name and its keyword arguments make the layer):
#: ``ResEncUNetConfig.norm`` / ``.nonlin`` -> :class:`LayerType`. :func:`make_norm` and :func:`make_nonlin`
#: build layers from it; :func:`s3d.hub.nnssl.adaptation_plan` writes its ``import_path`` into plans.
NORM_LAYERS: dict[str, LayerType] = {
    "instance": LayerType(nn.InstanceNorm3d, "torch.nn.modules.instancenorm.InstanceNorm3d"),
    "batch": LayerType(nn.BatchNorm3d, "torch.nn.modules.batchnorm.BatchNorm3d"),
}
ACTIVATIONS: dict[str, LayerType] = {
    "leaky_relu": LayerType(nn.LeakyReLU, "torch.nn.LeakyReLU"),
    "relu": LayerType(nn.ReLU, "torch.nn.ReLU"),
    "gelu": LayerType(nn.GELU, "torch.nn.GELU"),
}


def norm_kwargs(cfg: ResEncUNetConfig) -> dict[str, Any]:
    """Keyword arguments of the norm layer besides the channel count (DNA's ``norm_op_kwargs``)."""
    return {"eps": cfg.norm_eps, "affine": cfg.norm_affine}


def nonlin_kwargs(cfg: ResEncUNetConfig) -> dict[str, Any]:
    """Keyword arguments of the activation (DNA's ``nonlin_kwargs``); GELU has no ``inplace``.

    Example:
        >>> from s3d.nn.config import get_config
        >>> nonlin_kwargs(get_config("tiny"))
        {'inplace': True, 'negative_slope': 0.01}
    """
    if cfg.nonlin == "gelu":
        return {}
    return {"inplace": True, **({"negative_slope": cfg.negative_slope} if cfg.nonlin == "leaky_relu" else {})}


def make_norm(cfg: ResEncUNetConfig, channels: int) -> nn.Module:
    """The norm layer named by ``cfg.norm`` (:data:`NORM_LAYERS`) for ``channels`` channels."""
    return NORM_LAYERS[cfg.norm].cls(channels, **norm_kwargs(cfg))


def make_nonlin(cfg: ResEncUNetConfig) -> nn.Module:
    """The activation named by ``cfg.nonlin`` (:data:`ACTIVATIONS`)."""
    return ACTIVATIONS[cfg.nonlin].cls(**nonlin_kwargs(cfg))


def apply_norm(norm: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Run ``norm`` densely, or over visible voxels only when ``keep`` is given."""
    if keep is None:
        return norm(x)
    if not isinstance(norm, nn.InstanceNorm3d):
        raise NotImplementedError(
            f"masked (sparse) forward supports norm='instance' only, this network uses {type(norm).__name__}"
        )
    return masked_instance_norm(x, keep, norm.weight, norm.bias, norm.eps)


class ConvNormAct(nn.Module):
    """Conv3d -> norm -> optional activation (nnU-Net's ``ConvDropoutNormReLU`` without dropout)."""

    def __init__(
        self,
        cfg: ResEncUNetConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple,
        stride: Triple = (1, 1, 1),
        bias: bool | None = None,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=tuple((k - 1) // 2 for k in kernel_size),
            bias=cfg.conv_bias if bias is None else bias,
        )
        self.norm = make_norm(cfg, out_channels)
        self.nonlin = make_nonlin(cfg) if act else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_in, D, H, W); keep: (B, 1, D', H', W') at the output resolution or None."""
        x = apply_norm(self.norm, self.conv(x), keep)
        if self.nonlin is not None:
            x = self.nonlin(x)
        return x


class StackedConvBlocks(nn.Module):
    """``n`` ConvNormAct layers; the first may be strided (nnU-Net's ``StackedConvBlocks``)."""

    def __init__(
        self,
        cfg: ResEncUNetConfig,
        n: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple,
        first_stride: Triple = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvNormAct(cfg, in_channels if i == 0 else out_channels, out_channels, kernel_size,
                        first_stride if i == 0 else (1, 1, 1))
            for i in range(n)
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x, keep)
        return x


class BasicBlockD(nn.Module):
    """ResNet-D basic block: conv-norm-act, conv-norm, plus skip, act.

    The skip is identity, or ``AvgPool3d(stride)`` when strided, followed by a 1x1x1 conv
    (no bias) + norm when the channel count changes (``skip.0`` / ``skip.1`` as in nnU-Net).
    """

    def __init__(
        self,
        cfg: ResEncUNetConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple,
        stride: Triple,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cfg, in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvNormAct(cfg, out_channels, out_channels, kernel_size, act=False)
        self.nonlin2 = make_nonlin(cfg)
        ops: list[nn.Module] = []
        if any(s != 1 for s in stride):
            ops.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:
            ops.append(ConvNormAct(cfg, in_channels, out_channels, (1, 1, 1), bias=False, act=False))
        self.skip = nn.Sequential(*ops) if ops else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_in, D, H, W); keep: mask at the output resolution (1 = visible) or None."""
        residual = x
        if self.skip is not None:
            for op in self.skip:
                if isinstance(op, ConvNormAct):
                    residual = op(residual, keep)
                else:
                    residual = op(residual)
                    if keep is not None:
                        residual = residual * keep.to(residual.dtype)
        out = self.conv2(self.conv1(x, keep), keep)
        return self.nonlin2(out + residual)


class StackedResidualBlocks(nn.Module):
    """An encoder stage: ``n`` BasicBlockD, the first one strided."""

    def __init__(
        self,
        cfg: ResEncUNetConfig,
        n: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple,
        first_stride: Triple,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BasicBlockD(cfg, in_channels if i == 0 else out_channels, out_channels, kernel_size,
                        first_stride if i == 0 else (1, 1, 1))
            for i in range(n)
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, keep)
        return x
