"""Random block masks for sparse MAE pre-training.

A mask lives on a coarse *block grid*: one cell per ``block_size``^3 voxels of the input.
Mask polarity everywhere in s3d: ``keep`` holds 1 (True) for visible cells and 0 (False) for
masked ones, as in SparK and nnssl.

Two grids are in use for a 160^3 patch and the 6-stage ResEnc-L (total stride 32):

- ``block_size=32`` (the paper's text, the default): a 5^3 grid aligned with the 5^3 bottleneck;
  every encoder stage, the bottleneck included, sees the mask by nearest upsampling.
- ``block_size=16`` (the authors' released nnssl code): a 10^3 grid, finer than the 5^3
  bottleneck. A stage coarser than the grid then needs a policy (``coarse`` in
  :func:`s3d.nn.masked.stage_keeps`): ``"ones"`` leaves it unmasked as nnssl does, ``"pool"`` marks
  a bottleneck voxel visible when any cell under it is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from s3d._triple import to_3tuple, triple

MaskRatio = float | tuple[float, float] | Sequence[float]


def check_mask_ratio(mask_ratio: MaskRatio) -> tuple[float, float]:
    """Validate ``mask_ratio`` and return it as ``(lo, hi)`` (``lo == hi`` for a fixed ratio).

    Args:
        mask_ratio: fraction of cells to mask, a float in (0, 1), or ``(lo, hi)`` with
            0 < lo <= hi < 1 for a ratio drawn uniformly from [lo, hi].

    Example:
        >>> check_mask_ratio((0.6, 0.9))
        (0.6, 0.9)
    """
    if isinstance(mask_ratio, int | float) and not isinstance(mask_ratio, bool):
        lo = hi = float(mask_ratio)
    else:
        try:
            lo, hi = (float(v) for v in mask_ratio)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"mask_ratio: expected a float or (lo, hi), got {mask_ratio!r}") from None
    if not (0.0 < lo <= hi < 1.0):
        raise ValueError(f"mask_ratio: expected 0 < lo <= hi < 1 (fraction masked), got {mask_ratio!r}")
    return lo, hi


def block_grid_size(input_size: Sequence[int], block_size: int | Sequence[int]) -> tuple[int, int, int]:
    """Cells per axis of the block grid for an input of ``input_size`` voxels.

    Raises ``ValueError`` naming the axis when a size is not a multiple of the block size.

    Example:
        >>> block_grid_size((160, 160, 160), 32)
        (5, 5, 5)
    """
    size = to_3tuple(input_size, "input_size")
    bs = to_3tuple(block_size, "block_size")
    bad = [a for a in range(3) if size[a] % bs[a] != 0 or size[a] < bs[a]]
    if bad:
        raise ValueError(
            f"input size {size} is not a multiple of block_size {bs} on axis/axes {bad}; "
            "crop or pad the patch, or choose a block size that divides it"
        )
    return triple(s // b for s, b in zip(size, bs, strict=True))


def masked_cell_counts(
    batch: int,
    n_cells: int,
    mask_ratio: MaskRatio,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Number of masked cells per sample: ``round(ratio * n_cells)``, clamped to [1, n_cells - 1].

    The clamp keeps at least one visible and one masked cell in every sample (only matters for
    grids of a few cells). A ratio range draws one ratio per sample (``per_sample=True``) or one
    for the whole batch (the released nnssl code).

    Returns:
        int64 tensor (batch,) on the generator's device (CPU without a generator).

    Example:
        >>> masked_cell_counts(2, 125, 0.75).tolist()
        [94, 94]
    """
    lo, hi = check_mask_ratio(mask_ratio)
    if n_cells < 2:
        raise ValueError(f"a block grid of {n_cells} cell(s) cannot hold both visible and masked cells")
    dev = generator.device if generator is not None else torch.device("cpu")
    draws = batch if per_sample else 1
    if hi > lo:
        u = torch.rand(draws, generator=generator, device=dev, dtype=torch.float64)
        ratio = lo + (hi - lo) * u
    else:
        ratio = torch.full((draws,), lo, device=dev, dtype=torch.float64)
    counts = torch.round(ratio * n_cells).long().clamp(1, n_cells - 1)
    return counts.expand(batch).clone()


def sample_block_mask(
    batch: int,
    input_size: Sequence[int],
    block_size: int | Sequence[int] = 32,
    mask_ratio: MaskRatio = 0.75,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample a random block keep-mask (1 = visible, 0 = masked) on the block grid.

    Each sample masks exactly ``round(ratio * n_cells)`` cells chosen by a random permutation
    (the ratio rounded once, so the realised ratio is within half a cell of the drawn ratio).
    Randomness comes only from ``generator`` (or the global RNG), drawn on the generator's
    device, so the same seed gives the same mask whatever ``device`` the result goes to.

    Args:
        batch: number of samples B.
        input_size: spatial size (D, H, W) of the input patch, voxels.
        block_size: edge of one mask cell, voxels (an int or 3 ints). 32 is the paper's text
            (5^3 grid at 160^3), 16 the released nnssl code (10^3 grid); see the module docstring.
        mask_ratio: fraction of cells masked: fixed (``0.75``) or drawn from U[lo, hi] (``(0.6, 0.9)``).
        per_sample: draw the ratio per sample (True) or once per batch (False, as nnssl).
            Positions are always drawn per sample.
        generator: optional ``torch.Generator`` for reproducible masks.
        device: where the returned mask lives (default: the generator's device, else CPU).

    Returns:
        bool tensor (B, 1, D/bs, H/bs, W/bs), True = visible.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> keep = sample_block_mask(2, (160, 160, 160), 32, 0.75, generator=g)
        >>> keep.shape, int((~keep[0]).sum())
        (torch.Size([2, 1, 5, 5, 5]), 94)
    """
    if batch < 1:
        raise ValueError(f"batch: expected >= 1, got {batch}")
    grid = block_grid_size(input_size, block_size)
    n_cells = grid[0] * grid[1] * grid[2]
    counts = masked_cell_counts(batch, n_cells, mask_ratio, per_sample, generator)
    dev = counts.device
    # rank[b, i] = position of cell i in a random permutation of sample b; the first
    # counts[b] positions of the permutation are masked.
    scores = torch.rand(batch, n_cells, generator=generator, device=dev)
    rank = scores.argsort(dim=1).argsort(dim=1)
    keep = rank >= counts[:, None]
    keep = keep.view(batch, 1, *grid)
    return keep if device is None else keep.to(device)


def realised_mask_ratio(keep: torch.Tensor) -> torch.Tensor:
    """Fraction of masked cells per sample of a keep grid (B, 1, d, h, w) (1 = visible).

    Example:
        >>> realised_mask_ratio(torch.tensor([1, 0, 0, 0]).view(1, 1, 1, 2, 2).bool())
        tensor([0.7500])
    """
    return 1.0 - keep.flatten(1).float().mean(dim=1)
