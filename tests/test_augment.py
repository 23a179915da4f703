"""Batched affine augmentation (s3d.data.augment) against torch.rot90 / torch.flip / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s3d.data.augment import AffineParams, AugmentConfig, BatchAugment, apply_affine, sampling_matrices


def _params(b: int, angles=None, scale=None, flip=None) -> AffineParams:
    p = AffineParams.identity(b)
    if angles is not None:
        p.angles = torch.tensor(angles, dtype=torch.float64)
    if scale is not None:
        p.scale = torch.tensor(scale, dtype=torch.float64)
    if flip is not None:
        p.flip = torch.tensor(flip, dtype=torch.bool)
    return p


def test_identity_is_exact() -> None:
    x = torch.randn(3, 2, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_affine(x, AffineParams.identity(3)), x)


@pytest.mark.parametrize("axis,dims", [(0, (3, 4)), (1, (2, 4)), (2, (2, 3))])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_multiples_of_90_matches_rot90(axis: int, dims: tuple[int, int], k: int) -> None:
    x = torch.randn(1, 2, 10, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    angles = [[0.0, 0.0, 0.0]]
    angles[0][axis] = k * math.pi / 2
    y = apply_affine(x, _params(1, angles=angles))
    # fp64 resampling at exact grid points: max error measured 4.4e-15; tolerance 5e-14 (~10x)
    torch.testing.assert_close(y, torch.rot90(x, k, dims=dims), rtol=0, atol=5e-14)


def test_rotation_in_float32_on_even_and_odd_sizes() -> None:
    x = torch.randn(2, 1, 9, 12, 12, generator=torch.Generator().manual_seed(2))
    y = apply_affine(x, _params(2, angles=[[math.pi / 2, 0, 0], [0, 0, 0]]))
    # fp32: max error measured 1.2e-6 (|x| <= 3.7); tolerance 1e-5 (~8x)
    torch.testing.assert_close(y[0], torch.rot90(x[0], 1, dims=(2, 3)), rtol=0, atol=1e-5)
    assert torch.equal(y[1], x[1])  # untouched sample of the same batch


@pytest.mark.parametrize("pattern", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)])
def test_flips_match_torch_flip(pattern: tuple[int, int, int]) -> None:
    x = torch.randn(2, 1, 6, 7, 8, generator=torch.Generator().manual_seed(3))
    y = apply_affine(x, _params(2, flip=[list(pattern), [0, 0, 0]]))
    dims = [2 + a - 1 for a in range(3) if pattern[a]]  # per sample: (C, D, H, W) -> D is dim 1
    assert torch.equal(y[0], torch.flip(x[0], dims=dims))
    assert torch.equal(y[1], x[1])


def test_scale_matches_scipy_affine_transform() -> None:
    """A 30 deg rotation + scale 1.3 equals scipy's linear affine_transform with the same matrix."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(1, 1, 11, 13, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    p = _params(1, angles=[[math.radians(30), math.radians(-10), 0.0]], scale=[1.3])
    y = apply_affine(x, p)[0, 0].numpy()
    m = sampling_matrices(p)[0].numpy()
    centre = (np.array(x.shape[2:]) - 1) / 2
    ref = ndimage.affine_transform(x[0, 0].numpy(), m, offset=centre - m @ centre, order=1,
                                   mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-13)  # fp64: measured 7.8e-15; ~13x


def test_sampling_is_reproducible_and_respects_probabilities() -> None:
    cfg = AugmentConfig()
    a = cfg.sample(4000, torch.Generator().manual_seed(3))
    b = cfg.sample(4000, torch.Generator().manual_seed(3))
    assert torch.equal(a.angles, b.angles) and torch.equal(a.flip, b.flip)
    rotated = (a.angles != 0).any(dim=1).double().mean().item()
    scaled = (a.scale != 1).double().mean().item()
    # 4000 draws: standard deviation sqrt(0.2 * 0.8 / 4000) = 6.3e-3 (rotated, scaled) and
    # sqrt(0.25 / 12000) = 4.6e-3 (flips); 0.03 is > 4.7 of them (measured 0.213, 0.198, 0.493)
    assert abs(rotated - 0.2) < 0.03 and abs(scaled - 0.2) < 0.03
    assert abs(a.flip.double().mean().item() - 0.5) < 0.03
    assert a.angles.abs().max() <= math.radians(30) and 0.7 <= a.scale.min() and a.scale.max() <= 1.4
    x = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    aug = BatchAugment()
    assert torch.equal(aug(x, torch.Generator().manual_seed(5)), aug(x, torch.Generator().manual_seed(5)))


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ValueError, match="params"):
        apply_affine(torch.zeros(2, 1, 4, 4, 4), AffineParams.identity(3))
