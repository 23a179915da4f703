"""Where the visible cells of a keep grid sit (:class:`BlockLayout`), and moving features between the dense
layout (B, C, D, H, W) and the batch of visible blocks (N, C, e, e, e).

A :class:`~s3d.sparse.plan.MaskPlan` builds its layout once, on first use (``plan.layout``); the
block engine (:mod:`s3d.sparse.block_engine`) runs every block-layout stage on it. Mask polarity:
1 (True) = visible (:mod:`s3d.sparse.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from s3d._triple import Triple


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
