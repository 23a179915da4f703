"""Block-sparse execution of the masked encoder: masked stages cost what they compute.

The masked-dense ("dense") engine, ``encoder(x, stage_keeps(...))``, runs every convolution over
the whole patch and zeroes the masked blocks afterwards, so 75-90 % masking saves nothing. This
module computes the same numbers on the *visible blocks only*:

* the visible cells of the keep grid (1 = visible, 0 = masked) are listed once per forward
  (:class:`BlockLayout`); every stage whose cells are still at least ``min_block_edge`` voxels
  wide keeps its features as a batch of blocks, shape (N_visible, C, e, e, e);
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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from s3d._triple import Triple, to_3tuple, triple
from s3d.nn.blocks import BasicBlockD, ConvNormAct, StackedResidualBlocks
from s3d.nn.masked import stage_keeps

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


@dataclass
class BlockLayout:
    """Where the visible blocks of a keep grid sit, shared by every block-layout stage.

    Attributes:
        batch_size: B.
        grid: keep-grid shape (gd, gh, gw), cells per axis.
        cell_index: (N,) int64 flat index of each visible cell in the (B, gd, gh, gw) grid, ascending.
        batch_index: (N,) int64 sample of each visible block.
        cell_coords: (N, 3) int64 grid coordinates of each visible block.
        blocks_per_sample: (B,) visible blocks per sample (float32, for norm statistics).
        slot_grid: (B, gd + 2, gh + 2, gw + 2) int64 block number of every cell, -1 where masked or
            in the one-cell border.
    """

    batch_size: int
    grid: Triple
    cell_index: torch.Tensor
    batch_index: torch.Tensor
    cell_coords: torch.Tensor
    blocks_per_sample: torch.Tensor
    slot_grid: torch.Tensor
    _halo_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_blocks(self) -> int:
        """N, the number of visible blocks in the batch."""
        return int(self.cell_index.numel())

    @classmethod
    def from_keep(cls, keep_grid: torch.Tensor) -> BlockLayout:
        """Build the layout of a keep grid (B, 1, gd, gh, gw), bool or 0/1, 1 = visible.

        Example:
            >>> lay = BlockLayout.from_keep(torch.tensor([1, 0, 0, 1.]).view(1, 1, 1, 2, 2))
            >>> lay.n_blocks, lay.cell_index.tolist()
            (2, [0, 3])
        """
        if keep_grid.dim() != 5 or keep_grid.shape[1] != 1:
            raise ValueError(
                f"keep_grid: expected (B, 1, gd, gh, gw) (1 = visible), got {tuple(keep_grid.shape)}")
        b, _, gd, gh, gw = keep_grid.shape
        vis = (keep_grid != 0).reshape(-1)
        cell_index = torch.nonzero(vis).reshape(-1)
        n = cell_index.numel()
        g = gd * gh * gw
        batch_index = cell_index // g
        rem = cell_index % g
        coords = torch.stack((rem // (gh * gw), (rem // gw) % gh, rem % gw), dim=1)
        slot = torch.full((b, gd + 2, gh + 2, gw + 2), -1, dtype=torch.long, device=keep_grid.device)
        slot[batch_index, coords[:, 0] + 1, coords[:, 1] + 1, coords[:, 2] + 1] = torch.arange(
            n, device=keep_grid.device)
        per_sample = torch.zeros(b, dtype=torch.float32, device=keep_grid.device).index_add_(
            0, batch_index, torch.ones(n, dtype=torch.float32, device=keep_grid.device))
        return cls(int(b), (int(gd), int(gh), int(gw)), cell_index, batch_index, coords, per_sample, slot)

    # ---- gather / scatter between layouts ----------------------------------------------------------
    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, C, D, H, W) -> visible blocks (N, C, D/gd, H/gh, W/gw)."""
        b, c = x.shape[:2]
        (gd, gh, gw), size = self.grid, x.shape[2:]
        e = (size[0] // gd, size[1] // gh, size[2] // gw)
        cells = x.reshape(b, c, gd, e[0], gh, e[1], gw, e[2]).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return cells.reshape(b * gd * gh * gw, c, *e).index_select(0, self.cell_index)

    def to_dense(self, blocks: torch.Tensor) -> torch.Tensor:
        """Visible blocks (N, C, ed, eh, ew) -> dense (B, C, gd*ed, gh*eh, gw*ew), zeros where masked."""
        (gd, gh, gw), (_n, c, *e) = self.grid, blocks.shape
        cells = blocks.new_zeros((self.batch_size * gd * gh * gw, c, *e))
        cells = cells.index_copy(0, self.cell_index, blocks)
        cells = cells.reshape(self.batch_size, gd, gh, gw, c, *e).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return cells.reshape(self.batch_size, c, gd * e[0], gh * e[1], gw * e[2])

    def halo_index(self, edge: Triple, lo: Triple, hi: Triple) -> torch.Tensor:
        """Row indices (N * Pd * Ph * Pw,) that gather every block with a halo, P = e + lo + hi per axis.

        Rows refer to the blocks' voxels flattened channels-last, (N * ed * eh * ew) rows, plus
        one zero row at the end that stands for masked or out-of-volume neighbours.
        """
        key = (edge, lo, hi)
        if key in self._halo_cache:
            return self._halo_cache[key]
        if any(a > e or b > e for a, b, e in zip(lo, hi, edge, strict=True)):
            raise ValueError(f"halo {lo}/{hi} wider than the block edge {edge}")
        dev = self.cell_index.device
        offs, locs = [], []
        for e, a, b in zip(edge, lo, hi, strict=True):
            p = torch.arange(-a, e + b, device=dev)
            offs.append(torch.div(p, e, rounding_mode="floor"))
            locs.append(p - offs[-1] * e)
        c = self.cell_coords
        nb = self.slot_grid[
            self.batch_index.view(-1, 1, 1, 1),
            (c[:, 0] + 1).view(-1, 1, 1, 1) + offs[0].view(1, -1, 1, 1),
            (c[:, 1] + 1).view(-1, 1, 1, 1) + offs[1].view(1, 1, -1, 1),
            (c[:, 2] + 1).view(-1, 1, 1, 1) + offs[2].view(1, 1, 1, -1),
        ]
        ed, eh, ew = edge
        local = locs[0].view(-1, 1, 1) * (eh * ew) + locs[1].view(1, -1, 1) * ew + locs[2].view(1, 1, -1)
        zero_row = self.n_blocks * ed * eh * ew
        rows = torch.where(nb >= 0, nb * (ed * eh * ew) + local.unsqueeze(0), zero_row).reshape(-1)
        self._halo_cache[key] = rows
        return rows

    def gather_halo(self, blocks: torch.Tensor, lo: Triple, hi: Triple) -> torch.Tensor:
        """Blocks (N, C, ed, eh, ew) -> blocks with their neighbours' voxels around them.

        Args:
            blocks: visible blocks of this layout.
            lo, hi: halo width (voxels) before and after the block, per axis (each <= the edge).

        Returns:
            (N, C, ed + lo_d + hi_d, ...), zeros where the neighbour is masked or outside; a
            channels-last view (no copy beyond the gather itself).
        """
        n, c, *e = blocks.shape
        edge = (e[0], e[1], e[2])
        rows = blocks.permute(0, 2, 3, 4, 1).reshape(-1, c)
        rows = torch.cat((rows, rows.new_zeros(1, c)), dim=0)
        p = [a + b + d for a, b, d in zip(edge, lo, hi, strict=True)]
        out = rows.index_select(0, self.halo_index(edge, lo, hi))
        return out.view(n, p[0], p[1], p[2], c).permute(0, 4, 1, 2, 3).contiguous()

    def segment_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Per-block values (N, ...) -> per-sample sums (B, ...)."""
        return v.new_zeros((self.batch_size, *v.shape[1:])).index_add(0, self.batch_index, v)


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
def block_plan(encoder: nn.Module, block_size: int | Sequence[int], min_block_edge: int) -> list[bool]:
    """Which of stem + stages run in block layout (True) for this input and block size.

    A layer runs in blocks when its output block edge is >= ``min_block_edge`` voxels on every
    axis, its input edge divides by its stride, and every earlier layer ran in blocks.

    Example:
        >>> from s3d import build_resenc_unet
        >>> enc = build_resenc_unet("tiny").encoder
        >>> block_plan(enc, 16, 8)  # stem, stages 0..4 for 16^3 mask cells
        [True, True, True, False, False, False]
    """
    edge = list(to_3tuple(block_size, "block_size"))
    ok = min(edge) >= min_block_edge
    plan = [ok]
    for stage in encoder.stages:
        stride = stage.blocks[0].conv1.conv.stride
        ok = ok and all(e % s == 0 for e, s in zip(edge, stride, strict=True))
        edge = [e // s if e % s == 0 else 0 for e, s in zip(edge, stride, strict=True)]
        ok = ok and min(edge) >= max(1, min_block_edge)
        plan.append(ok)
    return plan


def block_encoder_forward(
    encoder: nn.Module,
    x: torch.Tensor,
    keep_grid: torch.Tensor,
    block_size: int | Sequence[int],
    coarse: str = "pool",
    min_block_edge: int | None = None,
) -> list[torch.Tensor]:
    """Masked encoder features computed on the visible blocks only ("blocks" engine).

    Returns exactly what ``encoder(x, stage_keeps(keep_grid, x.shape[2:], strides, coarse))``
    returns (the masked-dense reference), to float rounding.

    Args:
        encoder: a :class:`s3d.nn.resenc_unet.ResidualEncoder` with InstanceNorm (its own
            parameters are used, so gradients land on them).
        x: input (B, C, D, H, W); masked voxels need not be zero (they are never read).
        keep_grid: (B, 1, D/bs, H/bs, W/bs) block grid, bool or 0/1, 1 = visible, 0 = masked.
        block_size: edge of a keep-grid cell at the input resolution, voxels (int or 3 ints).
        coarse: policy for stages coarser than the grid (``"pool"`` or ``"ones"``), see
            :func:`s3d.nn.masked.expand_keep`; those stages always run masked-dense.
        min_block_edge: smallest block edge (voxels, at a stage's output resolution) that runs in
            block layout; ``None`` = :data:`DEFAULT_MIN_BLOCK_EDGE` for ``x``'s device.

    Returns:
        One feature map per stage, highest resolution first, each (B, C_s, D_s, H_s, W_s), exactly 0
        at masked positions.

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
    size = tuple(x.shape[2:])
    want = (x.shape[0], 1, *(s // b for s, b in zip(size, bs, strict=True)))
    if tuple(keep_grid.shape) != want or any(s % b for s, b in zip(size, bs, strict=True)):
        raise ValueError(
            f"keep_grid: expected the block grid {want} (1 = visible) of input {tuple(x.shape)} with "
            f"block_size {bs}, got {tuple(keep_grid.shape)}"
        )
    if min_block_edge is None:
        min_block_edge = default_min_block_edge(x.device)
    strides = [tuple(int(a) for a in s) for s in _cumulative_strides(encoder)]
    keeps = stage_keeps(keep_grid, size, strides, coarse)
    plan = block_plan(encoder, bs, min_block_edge)
    if not plan[0]:
        return encoder(x, keeps)
    layout = BlockLayout.from_keep(keep_grid)
    h = layout.to_blocks(x)
    for cna in encoder.stem.convs:
        h = block_conv_norm_act(cna, h, layout)
    feats: list[torch.Tensor] = []
    dense: torch.Tensor | None = None
    for s, stage in enumerate(encoder.stages):
        if plan[s + 1]:
            if encoder.checkpointing and torch.is_grad_enabled() and h.requires_grad:
                h = checkpoint(block_stage, stage, h, layout, use_reentrant=False)
            else:
                h = block_stage(stage, h, layout)
            feats.append(layout.to_dense(h))
        else:
            if dense is None:
                dense = feats[-1] if feats else layout.to_dense(h)
            if encoder.checkpointing and torch.is_grad_enabled() and dense.requires_grad:
                dense = checkpoint(stage, dense, keeps[s + 1], use_reentrant=False)
            else:
                dense = stage(dense, keeps[s + 1])
            feats.append(dense)
    return feats


def _cumulative_strides(encoder: nn.Module) -> list[Triple]:
    out: list[Triple] = []
    acc: Triple = (1, 1, 1)
    for stage in encoder.stages:
        st = stage.blocks[0].conv1.conv.stride
        acc = triple(a * b for a, b in zip(acc, st, strict=True))
        out.append(acc)
    return out
