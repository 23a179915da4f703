"""Block-sparse execution of the masked encoder: masked stages cost what they compute.

The masked-dense ("dense") engine, ``encoder(x, plan.keeps)``, runs every convolution over
the whole patch and zeroes the masked blocks afterwards, so 75-90 % masking saves nothing. This
module computes the same numbers on the *visible blocks only*:

* the visible cells of the keep grid (1 = visible, 0 = masked) are listed once per forward (the
  plan's :class:`~s3d.sparse.layout.BlockLayout`, ``plan.layout``); every stage whose cells are still
  at least ``min_block_edge`` voxels wide keeps its features as a batch of blocks, shape (N_visible, C, e, e, e);
* a k x k x k conv gathers each block with a ``(k - 1) / 2``-voxel halo from its neighbours (zeros
  where the neighbour is masked or outside the volume) with one ``index_select`` and runs a
  padding-free ``F.conv3d`` on the batch of blocks; strided convs need only the low-side halo;
* the ResNet-D skip (average pool + 1x1x1 conv + norm), residual adds and activations work per
  block; masked InstanceNorm takes per-sample statistics over that sample's visible blocks with
  segment sums (``index_add``), no Python loop over blocks;
* the first stage whose block edge falls below ``min_block_edge`` (or stops dividing by the
  stride) and every stage after it run the module's own masked-dense forward;
* every stage's output is scattered back to the dense layout (B, C, D, H, W), zeros at masked
  positions, because the decoder's skips are dense.

The module's own parameters are used through ``torch.nn.functional`` (one parameter per weight),
and every gather/scatter is differentiable, so autograd, autocast and ``torch.compile`` work.
Mask polarity: 1 (True) = visible, 0 (False) = masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from s3d._triple import to_3tuple
from s3d.nn.blocks import BasicBlockD, ConvNormAct, StackedResidualBlocks
from s3d.sparse.layout import BlockLayout
from s3d.sparse.plan import MaskPlan

#: Smallest block edge (voxels, at a stage's output resolution) that still runs in block layout;
#: coarser stages run masked-dense. CPU: measured (docs/block_engine.md) with ResEnc-L at 128^3,
#: 32^3 cells, 75 % masking, full pre-training step: edge 4 gave 1.68x (process CPU time) vs 1.61x
#: for 8 and 1.51x for 16; at 64^3/16^3 cells and on tiny, 4 and 8 were within noise of each
#: other. CUDA: NOT measured yet (no GPU was available); 8 is a FLOP-based choice, because at edge
#: 4 the halo makes a block cost (6/4)^3 = 3.4x its voxels, which loses to dense whenever more
#: than ~30 % of the cells are visible. Measure with benchmarks/sparse_engine.py --device cuda.
DEFAULT_MIN_BLOCK_EDGE: dict[str, int] = {"cpu": 4, "cuda": 8}


def default_min_block_edge(device: torch.device | str) -> int:
    """The measured crossover block edge (voxels) for ``device``'s type (8 where unmeasured)."""
    return DEFAULT_MIN_BLOCK_EDGE.get(torch.device(device).type, 8)


# ---- layers in block layout -------------------------------------------------------------------------
def block_conv(conv: nn.Conv3d, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``conv`` on visible blocks (N, C_in, e, e, e) -> (N, C_out, e/stride, ...), masked-dense exact."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if isinstance(p, str) or any(pa != (ka - 1) // 2 for pa, ka in zip(p, k, strict=True)):
        raise NotImplementedError(f"block engine: conv padding must be (k-1)/2 on every axis, got {p}")
    if any(e % sa for e, sa in zip(x.shape[2:], s, strict=True)):
        raise ValueError(f"block edge {tuple(x.shape[2:])} not divisible by the conv stride {s}")
    lo = tuple(p)
    hi = tuple(max(0, ka - sa - pa) for ka, sa, pa in zip(k, s, p, strict=True))
    xin = x if not any(lo + hi) else layout.gather_halo(x, lo, hi)  # type: ignore[arg-type]
    y = F.conv3d(xin, conv.weight, conv.bias, s, 0, conv.dilation, conv.groups)
    return y


def block_instance_norm(
    x: torch.Tensor,
    layout: BlockLayout,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Masked InstanceNorm in block layout: per-sample, per-channel statistics over visible blocks.

    Same formula as :func:`s3d.nn.masked.masked_instance_norm` (two passes, biased variance,
    statistics in fp32 for half/bfloat16/fp32 inputs and in fp64 for fp64, output in ``x``'s dtype).

    Args:
        x: visible blocks (N, C, e, e, e).
        layout: the :class:`BlockLayout` the blocks belong to.
        weight, bias: (C,) affine parameters or ``None``.
        eps: added to the variance.

    Example:
        >>> lay = BlockLayout.from_keep(torch.ones(1, 1, 1, 1, 2))
        >>> y = block_instance_norm(torch.randn(2, 3, 4, 4, 4), lay, None, None, 1e-5)
        >>> round(float(y[:, 0].mean()), 4) == 0.0
        True
    """
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    vox = float(x.shape[2] * x.shape[3] * x.shape[4])
    n = (layout.blocks_per_sample * vox).clamp_min(1.0).unsqueeze(1)  # (B, 1)
    bi = layout.batch_index
    mean = layout.segment_sum(xf.sum(dim=(2, 3, 4))) / n  # (B, C)
    centred = xf - mean.index_select(0, bi)[:, :, None, None, None]
    var = layout.segment_sum(centred.square().sum(dim=(2, 3, 4))) / n
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(xf.dtype)
    y = centred * scale.index_select(0, bi)[:, :, None, None, None]
    if bias is not None:
        y = y + bias.to(xf.dtype)[:, None, None, None]
    return y.to(dtype)


def _activation(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.LeakyReLU):
        return F.leaky_relu(x, m.negative_slope)
    if isinstance(m, nn.ReLU):
        return F.relu(x)
    if isinstance(m, nn.GELU):
        return F.gelu(x, approximate=m.approximate)
    return m(x)


def _norm(m: nn.Module, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    if not isinstance(m, nn.InstanceNorm3d):
        raise NotImplementedError(f"block engine supports norm='instance' only, got {type(m).__name__}")
    return block_instance_norm(x, layout, m.weight, m.bias, m.eps)


def block_conv_norm_act(m: ConvNormAct, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """:class:`s3d.nn.blocks.ConvNormAct` in block layout."""
    y = _norm(m.norm, block_conv(m.conv, x, layout), layout)
    return y if m.nonlin is None else _activation(m.nonlin, y)


def block_basic_block(m: BasicBlockD, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """:class:`s3d.nn.blocks.BasicBlockD` (ResNet-D) in block layout."""
    residual = x
    if m.skip is not None:
        for op in m.skip:
            if isinstance(op, ConvNormAct):
                residual = block_conv_norm_act(op, residual, layout)
            elif isinstance(op, nn.AvgPool3d):
                residual = F.avg_pool3d(residual, op.kernel_size, op.stride, op.padding, op.ceil_mode,
                                        op.count_include_pad, op.divisor_override)
            else:
                raise NotImplementedError(f"block engine: unsupported skip op {type(op).__name__}")
    out = block_conv_norm_act(m.conv2, block_conv_norm_act(m.conv1, x, layout), layout)
    return _activation(m.nonlin2, out + residual)


def block_stage(m: StackedResidualBlocks, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """An encoder stage (stack of residual blocks) in block layout."""
    for blk in m.blocks:
        x = block_basic_block(blk, x, layout)
    return x


# ---- the engine ---------------------------------------------------------------------------------------
def layer_plan(cell: Sequence[int], stage_strides: Sequence[Sequence[int]], min_block_edge: int) -> list[bool]:
    """Which of stem + stages run in block layout (True) for mask cells of ``cell`` voxels.

    A layer runs in blocks when its output block edge (``cell / stage stride``) is >= ``min_block_edge``
    voxels on every axis and a whole number of voxels, and every earlier layer ran in blocks.

    Args:
        cell: the mask cell at the input resolution, voxels (``MaskPlan.cell``).
        stage_strides: cumulative stride of every encoder stage (``ResEncUNetConfig.stage_strides()``).
        min_block_edge: the crossover edge, voxels.

    Example:
        >>> layer_plan((16, 16, 16), [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)], 4)
        [True, True, True, True, False]
    """
    ok = min(cell) >= min_block_edge
    plan = [ok]
    for stride in stage_strides:
        ok = ok and all(c % s == 0 for c, s in zip(cell, stride, strict=True))
        ok = ok and min(c // s for c, s in zip(cell, stride, strict=True)) >= max(1, min_block_edge)
        plan.append(ok)
    return plan


def block_plan(encoder: nn.Module, block_size: int | Sequence[int], min_block_edge: int) -> list[bool]:
    """:func:`layer_plan` of ``encoder`` (its config's stage strides) for mask cells of ``block_size`` voxels.

    Example:
        >>> from s3d import build_resenc_unet
        >>> enc = build_resenc_unet("tiny").encoder
        >>> block_plan(enc, 16, 8)  # stem, stages 0..4 for 16^3 mask cells
        [True, True, True, False, False, False]
    """
    return layer_plan(to_3tuple(block_size, "block_size"), encoder.config.stage_strides(), min_block_edge)


def blocks_engine(encoder: nn.Module, x: torch.Tensor, plan: MaskPlan, *, min_block_edge: int | None = None
                  ) -> list[torch.Tensor]:
    """The "blocks" encoder engine: masked encoder features computed on the visible blocks only.

    Returns what ``encoder(x, plan.keeps)`` (the masked-dense reference) returns, to float rounding.
    Stages in block layout run on ``plan.layout``; the first stage whose cells are narrower than
    ``min_block_edge`` and every stage after it run the encoder's own masked-dense forward on
    ``plan.keeps``. Nothing is derived from the mask here: the plan holds it.

    Args:
        encoder: a :class:`s3d.nn.resenc_unet.ResidualEncoder` with InstanceNorm (its own parameters
            are used, so gradients land on them).
        x: input (B, C, D, H, W); masked voxels need not be zero (they are never read).
        plan: the forward's :class:`~s3d.sparse.plan.MaskPlan` (1 = visible).
        min_block_edge: smallest block edge (voxels, at a stage's output resolution) that runs in
            block layout; ``None`` = :data:`DEFAULT_MIN_BLOCK_EDGE` for ``x``'s device.

    Returns:
        One feature map per stage, highest resolution first, each (B, C_s, D_s, H_s, W_s), exactly 0
        at masked positions.
    """
    if min_block_edge is None:
        min_block_edge = default_min_block_edge(x.device)
    in_blocks = layer_plan(plan.cell, plan.stage_strides, min_block_edge)
    if not in_blocks[0]:
        return encoder(x, plan.keeps)
    layout = plan.layout
    h = layout.to_blocks(x)
    for cna in encoder.stem.convs:
        h = block_conv_norm_act(cna, h, layout)
    feats: list[torch.Tensor] = []
    dense: torch.Tensor | None = None
    for s, stage in enumerate(encoder.stages):
        if in_blocks[s + 1]:
            if encoder.checkpointing and torch.is_grad_enabled() and h.requires_grad:
                h = checkpoint(block_stage, stage, h, layout, use_reentrant=False)
            else:
                h = block_stage(stage, h, layout)
            feats.append(layout.to_dense(h))
        else:
            if dense is None:
                dense = feats[-1] if feats else layout.to_dense(h)
            if encoder.checkpointing and torch.is_grad_enabled() and dense.requires_grad:
                dense = checkpoint(stage, dense, plan.keeps[s + 1], use_reentrant=False)
            else:
                dense = stage(dense, plan.keeps[s + 1])
            feats.append(dense)
    return feats


def block_encoder_forward(
    encoder: nn.Module,
    x: torch.Tensor,
    keep_grid: torch.Tensor,
    block_size: int | Sequence[int],
    coarse: str = "pool",
    min_block_edge: int | None = None,
) -> list[torch.Tensor]:
    """:func:`blocks_engine` for a keep grid: builds the :class:`~s3d.sparse.plan.MaskPlan`, then runs it.

    Returns exactly what ``encoder(x, stage_keeps(keep_grid, x.shape[2:], strides, coarse))`` returns
    (the masked-dense reference), to float rounding.

    Args:
        encoder: a :class:`s3d.nn.resenc_unet.ResidualEncoder` with InstanceNorm.
        x: input (B, C, D, H, W).
        keep_grid: (B, 1, D/bs, H/bs, W/bs) block grid, bool or 0/1, 1 = visible, 0 = masked.
        block_size: edge of a keep-grid cell at the input resolution, voxels (int or 3 ints); checked
            against the grid.
        coarse: policy for stages coarser than the grid (``"pool"`` or ``"ones"``), see
            :func:`s3d.nn.masked.expand_keep`; those stages always run masked-dense.
        min_block_edge: as in :func:`blocks_engine`.

    Example:
        >>> from s3d import build_resenc_unet
        >>> enc = build_resenc_unet("tiny").encoder
        >>> keep = torch.rand(2, 1, 4, 4, 4) < 0.25
        >>> feats = block_encoder_forward(enc, torch.randn(2, 1, 64, 64, 64), keep, 16)
        >>> [tuple(f.shape[1:]) for f in feats][:2]
        [(8, 64, 64, 64), (16, 32, 32, 32)]
    """
    if x.dim() != 5:
        raise ValueError(f"x: expected (B, C, D, H, W), got {tuple(x.shape)}")
    bs = to_3tuple(block_size, "block_size")
    want = (x.shape[0], 1, *(s // b for s, b in zip(x.shape[2:], bs, strict=True)))
    if tuple(keep_grid.shape) != want or any(s % b for s, b in zip(x.shape[2:], bs, strict=True)):
        raise ValueError(
            f"keep_grid: expected the block grid {want} (1 = visible) of input {tuple(x.shape)} with "
            f"block_size {bs}, got {tuple(keep_grid.shape)}"
        )
    plan = MaskPlan.build(keep_grid, x.shape[2:], encoder.config.stage_strides(), coarse)
    return blocks_engine(encoder, x, plan, min_block_edge=min_block_edge)
