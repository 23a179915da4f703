"""Primus modules: patch embedding, the EVA transformer (timm's ``EvaBlock``), the patch decoder, the network.

State-dict keys and shapes equal dynamic-network-architectures 0.4.4's ``Primus`` (``mask_token``,
``down_projection.proj.*``, ``up_projection.decode.*``, ``eva.pos_embed``, ``eva.blocks.N.*``,
``eva.norm.*``), so nnU-Net's Primus trainers and nnssl's checkpoints load into it and it loads theirs.

The transformer blocks are timm's ``EvaBlock`` (imported when a network is built, so ``import s3d``
does not import timm). The 3D rotary table is computed here (:func:`rope_table`) rather than by timm's
``RotaryEmbeddingCat``, whose layout changed in timm 1.0.17 (DNA's Primus fails to build from then on);
the table equals what DNA's Primus used under timm 1.0.16 (tests/test_primus.py checks it against a
file written by the reference).

Token order: tokens are the patch grid flattened in C order, ``(D, H, W)`` with W fastest, as DNA's
``rearrange("b c w h d -> b (w h d) c")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from s3d.nn.primus.config import PrimusConfig

#: RoPE frequency base (timm's ``temperature``).
ROPE_TEMPERATURE = 10000.0


class LayerNormNd(nn.Module):
    """LayerNorm over the channel axis of a (B, C, ...) tensor (DNA's ``LayerNormNd``, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each voxel's channel vector: (x - mean) / sqrt(biased var + eps) * weight + bias."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class PatchEmbed(nn.Module):
    """A strided conv (kernel = stride = patch): (B, C, D, H, W) -> (B, embed_dim, D/pd, H/ph, W/pw)."""

    def __init__(self, patch: Sequence[int], in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=tuple(patch), stride=tuple(patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features (B, embed_dim, d, h, w)."""
        return self.proj(x)


def decoder_channels(embed_dim: int, num_classes: int, n_stages: int) -> list[int]:
    """Channels of DNA's ``PatchDecode``: ``embed_dim`` shrinking geometrically to ``2 * num_classes``.

    Stage i has ``embed_dim / r**i`` rounded to a multiple of 8 (at least 8), with
    ``r = (embed_dim / (2 num_classes)) ** (1 / n_stages)``; the last entry is ``num_classes``.

    Example:
        >>> decoder_channels(864, 2, 3)
        [864, 144, 24, 2]
    """
    ratio = (embed_dim / (2 * num_classes)) ** (1 / n_stages)
    widths = [embed_dim / ratio ** (i + 1) for i in range(n_stages)]
    channels = [embed_dim] + [int(max(8, round((w + 1e-6) / 8) * 8)) for w in widths]
    channels[-1] = num_classes
    return channels


def decoder_strides(patch: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per-stage upsampling of DNA's ``PatchDecode``: ``log2(max(patch))`` stages of 2 or 1 per axis.

    Example:
        >>> decoder_strides((4, 4, 2))
        [(2, 2, 1), (2, 2, 2)]
    """
    n_stages = int(round(math.log2(max(patch))))
    strides = [tuple(2 if (p // 2**n) % 2 == 0 and p >= 2 ** (n + 1) else 1 for p in patch) for n in range(n_stages)]
    return [(s[0], s[1], s[2]) for s in strides[::-1]]


class PatchDecode(nn.Module):
    """Transposed convs from the token grid back to voxels: (B, E, d, h, w) -> (B, num_classes, D, H, W).

    Each stage but the last is ConvTranspose3d -> :class:`LayerNormNd` -> GELU (``decode.i.0/1``); the
    last is a bare ConvTranspose3d (``decode.{n-1}``), the segmentation head.
    """

    def __init__(self, patch: Sequence[int], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        strides = decoder_strides(patch)
        channels = decoder_channels(embed_dim, num_classes, len(strides))
        stages: list[nn.Module] = []
        for i, stride in enumerate(strides):
            up = nn.ConvTranspose3d(channels[i], channels[i + 1], kernel_size=stride, stride=stride)
            last = i == len(strides) - 1
            stages.append(up if last else nn.Sequential(up, LayerNormNd(channels[i + 1]), nn.GELU()))
        self.decode = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, D, H, W) for token features (B, E, d, h, w)."""
        return self.decode(x)


def rope_table(grid: Sequence[int], head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 3D rotary table of DNA's Primus: (N, 2 * head_dim) = [sin | cos] per token.

    Each axis gets ``head_dim / 6`` frequencies ``f_k = 10000 ** (-k / (head_dim / 6))``; token
    (i, j, l) has angles ``(i f_k, j f_k, l f_k)``, concatenated axis by axis and each repeated twice
    (interleaved pairs, rotated by timm's ``apply_rot_embed_cat``). Computed in float64, then cast.

    Args:
        grid: tokens per axis (d, h, w).
        head_dim: width of one attention head (divisible by 6).
        dtype: dtype of the returned table.

    Example:
        >>> rope_table((2, 3, 4), 24).shape
        torch.Size([24, 48])
    """
    if head_dim % 6:
        raise ValueError(f"head_dim {head_dim} is not divisible by 6 (3 axes x sin/cos pairs)")
    n_bands = head_dim // 6
    bands = ROPE_TEMPERATURE ** (-torch.arange(n_bands, dtype=torch.float64) / n_bands)
    axes = [torch.arange(n, dtype=torch.float64) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    angles = (coords[:, :, None] * bands).reshape(coords.shape[0], -1).repeat_interleave(2, dim=-1)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def _eva_block(cfg: PrimusConfig, drop_path: float) -> nn.Module:
    from s3d._timm import quiet_timm_import

    with quiet_timm_import():
        from timm.models.eva import EvaBlock

    return EvaBlock(
        dim=cfg.embed_dim, num_heads=cfg.eva_numheads, qkv_bias=True, qkv_fused=False, mlp_ratio=cfg.mlp_ratio,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=cfg.scale_attn_inner, proj_drop=cfg.proj_drop_rate,
        attn_drop=cfg.attn_drop_rate, drop_path=drop_path, norm_layer=nn.LayerNorm, init_values=cfg.init_values,
        num_prefix_tokens=0,
    )


class PrimusEncoder(nn.Module):
    """The EVA transformer over tokens (DNA's ``Eva``; keys ``pos_embed``, ``blocks.N.*``, ``norm.*``).

    Holds the absolute position embedding (1, N, E) and the rotary table (N, 2 head_dim, a
    non-persistent buffer) of the training patch's N tokens.
    """

    def __init__(self, cfg: PrimusConfig) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim)) if cfg.use_abs_pos_embed else None
        rope = rope_table(cfg.grid, cfg.head_dim) if cfg.use_rot_pos_emb else None
        self.register_buffer("rope", rope, persistent=False)
        depth = cfg.eva_depth  # stochastic depth rising linearly over the blocks, as np.linspace(0, rate, depth)
        rates = [cfg.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(_eva_block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.checkpointing = False

    def forward(self, tokens: torch.Tensor, keep_index: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer features of ``tokens``, position embeddings added here.

        Args:
            tokens: (B, K, E) patch tokens; K = N (all tokens of the training patch, in grid order) or,
                with ``keep_index``, the visible tokens only.
            keep_index: optional (B, K) long tensor: the grid index (0..N-1) of each row of ``tokens``;
                the position embeddings of those tokens are used, so the encoder attends over the
                visible tokens alone (its cost falls with the masked fraction).

        Returns:
            (B, K, E) features after the final LayerNorm.
        """
        rope = self.rope
        if keep_index is None:
            if self.pos_embed is not None:
                tokens = tokens + self.pos_embed
        else:
            if self.pos_embed is not None:
                index = keep_index[:, :, None].expand(-1, -1, tokens.shape[-1])
                tokens = tokens + self.pos_embed.expand(tokens.shape[0], -1, -1).gather(1, index)
            if rope is not None:
                rope = rope[keep_index][:, None]  # (B, 1, K, 2 head_dim): broadcast over heads
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled() and tokens.requires_grad:
                tokens = checkpoint(block, tokens, rope=rope, use_reentrant=False)
            else:
                tokens = block(tokens, rope=rope)
        return self.norm(tokens)


class Primus(nn.Module):
    """Primus (Wald et al. 2025, arXiv:2503.01835): a 3D ViT segmentation network.

    Build it with :func:`s3d.build_primus`. ``forward(x)`` takes x: (B, in_channels, D, H, W) with
    (D, H, W) = ``config.input_shape`` (the training patch) and returns logits
    (B, num_classes, D, H, W).

    Attributes:
        down_projection: :class:`PatchEmbed` (the stem: one strided conv).
        up_projection: :class:`PatchDecode` (the decoder; its last conv is the head).
        eva: :class:`PrimusEncoder` (the transformer).
        mask_token: (1, 1, E) buffer of zeros, as in DNA's Primus (a token-masking pre-training puts
            its own learnt token in the masked positions).
    """

    def __init__(self, config: PrimusConfig) -> None:
        super().__init__()
        self.config = config
        self.down_projection = PatchEmbed(config.patch_embed_size, config.in_channels, config.embed_dim)
        self.up_projection = PatchDecode(config.patch_embed_size, config.embed_dim, config.num_classes)
        self.eva = PrimusEncoder(config)
        self.mask_token: torch.Tensor
        self.register_buffer("mask_token", torch.zeros(1, 1, config.embed_dim))

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing per transformer block (less memory, about one extra encoder forward)."""
        return self.eva.checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self.eva.checkpointing = bool(value)

    @property
    def deep_supervision(self) -> bool:
        """Always ``False``: Primus has one output resolution."""
        return False

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value:
            raise ValueError("Primus has no deep supervision (one output resolution); use deep_supervision=False")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, *config.input_shape)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a 5D tensor (B, C, D, H, W), got {shape}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channel(s), got {x.shape[1]} in shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) != cfg.input_shape:
            raise ValueError(
                f"Primus takes inputs of its training patch {cfg.input_shape} (voxels; the position embedding has one "
                f"entry per {cfg.patch_embed_size} token of it), got {tuple(x.shape[2:])}; crop or pad to "
                f"{cfg.input_shape}, predict with a sliding window of that size, or rebuild / load the model with "
                "input_shape= the size you need (the position embedding is then interpolated)"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, E) of x (B, C, D, H, W), in grid (C) order, without position embeddings."""
        return self.down_projection(x).flatten(2).transpose(1, 2)

    def restore(self, tokens: torch.Tensor, keep_index: torch.Tensor, mask_token: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Put visible-token features back on the full grid, ``mask_token`` at the other positions.

        Args:
            tokens: (B, K, E) features of the visible tokens.
            keep_index: (B, K) long grid indices of those tokens.
            mask_token: (1, 1, E) token for the masked positions; default ``self.mask_token`` (zeros).

        Returns:
            (B, N, E) in grid order.
        """
        fill = self.mask_token if mask_token is None else mask_token
        b, _, e = tokens.shape
        full = fill.to(tokens.dtype).expand(b, self.config.num_tokens, e).clone()
        return full.scatter(1, keep_index[:, :, None].expand(-1, -1, e), tokens)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, D, H, W) from full-grid token features (B, N, E)."""
        b, _, e = tokens.shape
        return self.up_projection(tokens.transpose(1, 2).reshape(b, e, *self.config.grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, D, H, W) for x (B, in_channels, D, H, W) of size ``config.input_shape``."""
        self.check_input(x)
        return self.decode(self.eva(self.embed(x)))
