"""The mask plan: one keep mask, expanded once per forward, handed unchanged to every engine and layer.

**Mask polarity, once for all of s3d:** a keep mask (``keep``, ``mask``, ``keep_grid``, ``keeps``)
holds 1 (True) where a voxel or cell is *visible* to the encoder and 0 (False) where it is *masked*
(hidden, and reconstructed by the MAE loss), as in SparK and nnssl. Every other docstring that takes
a mask says "1 = visible" and refers here.

The way down, from the wrapper to the layers:

1. :class:`~s3d.sparse.wrapper.SparseMAEWrapper` (or ``ResEncUNet.forward(x, mask=)``) builds one
   :class:`MaskPlan` per forward with :meth:`MaskPlan.build`: the boolean grid, the cell size in voxels,
   the network's stage strides (from its config) and the per-stage keep masks;
2. an encoder engine (:data:`s3d.sparse.wrapper.ENGINES`) is called as ``engine(encoder, x, plan)``;
3. the masked-dense engine runs ``encoder(x, plan.keeps)``, every stage takes its own
   ``plan.keeps[s + 1]``; the block engine runs the stages whose cells are wide enough on
   ``plan.layout`` (built lazily, once per plan) and the others on ``plan.keeps``;
4. the densifier takes ``plan.keeps[1:]`` and the loss ``plan.keeps[0]``.

Nothing below the plan derives the cell size, the strides or the keeps again. A second model family
(e.g. a ViT whose encoder sees only the visible tokens) takes the same plan: its tokens are the grid's
cells (``plan.layout.cell_index`` lists the visible ones per batch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from s3d._triple import Triple, to_3tuple, triple
from s3d.nn.masked import stage_keeps
from s3d.sparse.layout import BlockLayout

COARSE_POLICIES = ("pool", "ones")


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """One keep mask and everything derived from it, computed once per forward (1 = visible).

    Build it with :meth:`build`; engines and layers read it and never change it.

    Attributes:
        grid: bool (B, 1, gd, gh, gw) keep grid, True = visible, on the input's device.
        cell: voxels per grid cell along (D, H, W) at the input resolution (``input_size / grid``).
        input_size: (D, H, W) of the network input, voxels.
        stage_strides: cumulative stride of every encoder stage (``ResEncUNetConfig.stage_strides()``).
        coarse: what a stage coarser than the grid sees: ``"pool"`` (visible if any cell under it is
            visible) or ``"ones"`` (never masked), :func:`s3d.nn.masked.expand_keep`.
        keeps: float32 0/1 keep masks ``(input (B, 1, D, H, W), stage 0, stage 1, ...)``.

    Example:
        >>> from s3d.nn.config import get_config
        >>> grid = torch.tensor([1, 0, 0, 1], dtype=torch.bool).view(1, 1, 1, 2, 2)
        >>> plan = MaskPlan.build(grid, (32, 64, 64), get_config("tiny").stage_strides())
        >>> plan.cell, [tuple(k.shape[2:]) for k in plan.keeps[:3]], plan.layout.n_blocks
        ((32, 32, 32), [(32, 64, 64), (32, 64, 64), (16, 32, 32)], 2)
    """

    grid: torch.Tensor
    cell: Triple
    input_size: Triple
    stage_strides: tuple[Triple, ...]
    coarse: str
    keeps: tuple[torch.Tensor, ...]

    @classmethod
    def build(cls, grid: torch.Tensor, input_size: Sequence[int], stage_strides: Sequence[Sequence[int]],
              coarse: str = "pool") -> MaskPlan:
        """The plan of keep grid ``grid`` for an input of ``input_size`` voxels (the one place it is derived).

        Args:
            grid: (B, 1, gd, gh, gw) keep grid, bool or 0/1 (any nonzero value is visible), on any grid
                that tiles the input (each input size a multiple of the grid's); e.g. the
                (B, 1, D/32, H/32, W/32) block grid or a full-resolution (B, 1, D, H, W) mask.
            input_size: (D, H, W) of the network input, voxels.
            stage_strides: cumulative stride of every encoder stage, from the network's config.
            coarse: ``"pool"`` or ``"ones"`` (see the class docstring).

        Raises:
            ValueError: a grid that is not (B, 1, d, h, w) or does not tile the input, naming both shapes.
        """
        size = to_3tuple(input_size, "input_size")
        if coarse not in COARSE_POLICIES:
            raise ValueError(f"coarse: expected one of {COARSE_POLICIES}, got {coarse!r}")
        if grid.dim() != 5 or grid.shape[1] != 1:
            raise ValueError(f"mask: expected a keep grid (B, 1, d, h, w) (1 = visible), got {tuple(grid.shape)}")
        g = triple(int(n) for n in grid.shape[2:])
        if any(s % n for s, n in zip(size, g, strict=True)):
            raise ValueError(f"mask: a keep grid of spatial shape {g} does not tile the input {size} (each input "
                             "size must be a multiple of the grid's)")
        grid = grid if grid.dtype == torch.bool else grid != 0
        strides = tuple(triple(int(a) for a in s) for s in stage_strides)
        keeps = tuple(stage_keeps(grid, size, strides, coarse))
        return cls(grid, triple(s // n for s, n in zip(size, g, strict=True)), size, strides, coarse, keeps)

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.grid.shape[0])

    @functools.cached_property
    def layout(self) -> BlockLayout:
        """Where the visible cells sit (:class:`~s3d.sparse.layout.BlockLayout`), built on first use."""
        return BlockLayout.from_keep(self.grid)

    def masked_fraction(self) -> float:
        """Fraction of masked cells over the whole batch (a host sync)."""
        return 1.0 - float(self.grid.float().mean())
