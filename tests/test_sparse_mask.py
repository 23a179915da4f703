"""Block-mask sampling: exact counts, ratio ranges, per-sample vs per-batch, seeding, grid shapes."""

from __future__ import annotations

import doctest

import pytest
import torch

import s3d.sparse.mask as mask_mod
from s3d.nn.masked import stage_keeps
from s3d.sparse import block_grid_size, realised_mask_ratio, sample_block_mask


def test_doctests() -> None:
    assert doctest.testmod(mask_mod).failed == 0


@pytest.mark.parametrize("ratio", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_fixed_ratio_exact_count_and_within_one_cell(ratio: float) -> None:
    g = torch.Generator().manual_seed(1)
    keep = sample_block_mask(4, (160, 160, 160), 32, ratio, generator=g)
    assert keep.shape == (4, 1, 5, 5, 5) and keep.dtype == torch.bool
    n_masked = (~keep).flatten(1).sum(1)
    assert n_masked.tolist() == [round(ratio * 125)] * 4  # rounded once, every sample the same
    assert (realised_mask_ratio(keep) - ratio).abs().max() <= 1 / 125


def test_range_per_sample_and_per_batch() -> None:
    g = torch.Generator().manual_seed(0)
    keep = sample_block_mask(64, (160, 160, 160), 16, (0.6, 0.9), per_sample=True, generator=g)
    assert keep.shape == (64, 1, 10, 10, 10)
    r = realised_mask_ratio(keep)
    assert r.min() >= 0.6 - 1 / 1000 and r.max() <= 0.9 + 1 / 1000
    assert len(set(r.tolist())) > 10  # a ratio per sample
    keep_b = sample_block_mask(8, (160, 160, 160), 16, (0.6, 0.9), per_sample=False, generator=g)
    counts = (~keep_b).flatten(1).sum(1)
    assert len(set(counts.tolist())) == 1  # one ratio for the batch...
    assert len({tuple(k.flatten().tolist()) for k in keep_b}) == 8  # ...but positions per sample


def test_same_seed_same_mask_and_device_independent() -> None:
    a = sample_block_mask(3, (64, 64, 64), 16, (0.6, 0.9), generator=torch.Generator().manual_seed(7))
    b = sample_block_mask(3, (64, 64, 64), 16, (0.6, 0.9), generator=torch.Generator().manual_seed(7),
                          device="cpu")
    c = sample_block_mask(3, (64, 64, 64), 16, (0.6, 0.9), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_positions_are_uniform() -> None:
    # Every cell is masked with probability ~ratio (a permutation, not a fixed pattern).
    g = torch.Generator().manual_seed(0)
    keep = sample_block_mask(4000, (64, 64, 64), 32, 0.75, generator=g)  # 8 cells, 6 masked each
    p = (~keep).float().mean(0).flatten()
    # each cell is masked with probability 0.75: the mean of 4000 draws has standard deviation
    # sqrt(0.75 * 0.25 / 4000) = 6.8e-3; 0.03 is ~4.4 of them (a fixed pattern is off by 0.25)
    assert torch.allclose(p, torch.full_like(p, 0.75), atol=0.03)


def test_at_least_one_visible_and_one_masked() -> None:
    keep = sample_block_mask(16, (64, 32, 32), 32, 0.9, generator=torch.Generator().manual_seed(0))
    n_vis = keep.flatten(1).sum(1)
    assert n_vis.min() >= 1 and n_vis.max() <= 1  # 2 cells: round(1.8) = 2 -> clamped to 1 masked


@pytest.mark.parametrize(
    "bad", [dict(mask_ratio=1.0), dict(mask_ratio=0.0), dict(mask_ratio=(0.9, 0.6)), dict(block_size=48)]
)
def test_bad_arguments(bad: dict) -> None:
    kw = dict(batch=2, input_size=(160, 160, 160), block_size=32, mask_ratio=0.75) | bad
    with pytest.raises(ValueError):
        sample_block_mask(**kw)


def test_grid_error_names_axis() -> None:
    with pytest.raises(ValueError, match="axis"):
        block_grid_size((160, 150, 160), 32)


@pytest.mark.parametrize("coarse", ["pool", "ones"])
def test_stage_keeps_shapes_block16_vs_resenc_l(coarse: str) -> None:
    """Released-code grid (16^3 cells at 160^3): the 5^3 bottleneck is coarser than the 10^3 grid."""
    keep = sample_block_mask(2, (160, 160, 160), 16, 0.75, generator=torch.Generator().manual_seed(0))
    strides = [(1,) * 3] + [(2**i,) * 3 for i in range(1, 6)]
    keeps = stage_keeps(keep, (160, 160, 160), strides, coarse)
    assert [k.shape[2] for k in keeps] == [160, 160, 80, 40, 20, 10, 5]
    # finer stages repeat each cell: the 10^3 stage equals the grid, the input is the 16^3 upsampling
    assert torch.equal(keeps[5], keep.float())
    assert torch.equal(keeps[0], keep.float().repeat_interleave(16, 2).repeat_interleave(16, 3)
                       .repeat_interleave(16, 4))
    bottleneck = keeps[6]
    if coarse == "ones":
        assert bool((bottleneck == 1).all())
    else:  # visible iff any of the 2x2x2 cells under it is visible
        ref = keep.float().view(2, 1, 5, 2, 5, 2, 5, 2).amax(dim=(3, 5, 7))
        assert torch.equal(bottleneck, ref)


def test_stage_keeps_block32_aligned() -> None:
    keep = sample_block_mask(1, (160, 160, 160), 32, 0.75, generator=torch.Generator().manual_seed(0))
    strides = [(1,) * 3] + [(2**i,) * 3 for i in range(1, 6)]
    keeps = stage_keeps(keep, (160, 160, 160), strides, "ones")
    assert torch.equal(keeps[-1], keep.float())  # 32^3 cells == bottleneck voxels, never "ones"
    # a mean of 0/1 values: exact sum, one float32 rounding (<= 6e-8 relative); approx's rel=1e-6
    assert all(float(1 - k.mean()) == pytest.approx(94 / 125) for k in keeps)
