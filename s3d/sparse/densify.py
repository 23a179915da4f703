"""Densification between the sparse encoder and the dense decoder (SparK, Table 1a of the paper).

The sparse encoder leaves exact zeros at masked positions of every skip. Before the decoder
sees a skip, each stage s may apply, in this order:

1. ``densify_norm``: InstanceNorm without affine over the visible voxels only;
2. ``mask_token``: fill masked positions with a learnable per-stage token (C,), trunc-normal
   init, std 0.02, truncated at +-0.02 as in SparK/nnssl;
3. ``densify``: a 3x3x3 conv (with bias, He init) on every stage except the highest
   resolution (stage 0), as the paper's text and the released code do.

Each piece is a flag, so Table 1a's rows are configurations of :class:`Densifier`.
Mask polarity: ``keep`` holds 1 for visible voxels and 0 for masked ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from s3d.nn.masked import masked_instance_norm


class Densifier(nn.Module):
    """Per-stage mask tokens and densification convs for a U-Net encoder's skips.

    Args:
        channels: channels of each encoder stage, highest resolution first.
        mask_token: fill masked positions with a learnable per-stage token.
        densify: 3x3x3 conv on every stage except the highest resolution.
        densify_norm: masked InstanceNorm (no affine) first; ``None`` means "on when
            ``mask_token`` or ``densify`` is on" (the released code normalises only then).
        eps: epsilon of the masked norm.

    Attributes:
        mask_tokens: ``ParameterList`` of (1, C_s, 1, 1, 1) tokens (empty without ``mask_token``).
        densify_convs: ``ModuleList`` with ``Identity`` at stage 0 and a ``Conv3d(C_s, C_s, 3)``
            at every other stage (empty without ``densify``).

    Example:
        >>> d = Densifier((8, 16))
        >>> skips = [torch.zeros(1, 8, 8, 8, 8), torch.zeros(1, 16, 4, 4, 4)]
        >>> keeps = [torch.ones(1, 1, 8, 8, 8), torch.ones(1, 1, 4, 4, 4)]
        >>> [t.shape[1] for t in d(skips, keeps)]
        [8, 16]
    """

    def __init__(
        self,
        channels: Sequence[int],
        mask_token: bool = True,
        densify: bool = True,
        densify_norm: bool | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.use_mask_token = bool(mask_token)
        self.use_densify = bool(densify)
        self.use_norm = bool(mask_token or densify) if densify_norm is None else bool(densify_norm)
        self.eps = float(eps)
        self.mask_tokens = nn.ParameterList()
        if self.use_mask_token:
            for c in self.channels:
                token = nn.Parameter(torch.zeros(1, c, 1, 1, 1))
                nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
                self.mask_tokens.append(token)
        self.densify_convs = nn.ModuleList()
        if self.use_densify:
            for s, c in enumerate(self.channels):
                if s == 0:
                    self.densify_convs.append(nn.Identity())
                    continue
                conv = nn.Conv3d(c, c, kernel_size=3, padding=1, bias=True)
                nn.init.kaiming_normal_(conv.weight, a=1e-2)
                nn.init.zeros_(conv.bias)
                self.densify_convs.append(conv)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, mask_token={self.use_mask_token}, densify={self.use_densify}, "
                f"densify_norm={self.use_norm}")

    def forward(self, skips: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Densify every skip.

        Args:
            skips: encoder features, highest resolution first, each (B, C_s, D_s, H_s, W_s).
            keeps: keep masks at the same resolutions, each (B, 1, D_s, H_s, W_s), 1 = visible.

        Returns:
            Dense features of the same shapes, for the decoder.
        """
        if len(skips) != len(self.channels) or len(keeps) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} skips and keeps, "
                             f"got {len(skips)} and {len(keeps)}")
        out = []
        for s, (x, keep) in enumerate(zip(skips, keeps, strict=False)):
            k = keep.to(x.dtype)
            if self.use_norm:
                x = masked_instance_norm(x, keep, None, None, self.eps)
            if self.use_mask_token:
                # x * k also clears masked positions when the encoder ran dense (Table 1a "Base").
                x = x * k + self.mask_tokens[s].to(x.dtype) * (1 - k)
            if self.use_densify:
                x = self.densify_convs[s](x)
            out.append(x)
        return out
