"""s3d.augment: the one augmentation module, against torch.rot90 / torch.flip / scipy and formulas."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from s3d.augment import Augment, AugmentConfig, AugmentParams, apply, sampling_matrices
from s3d.augment.spatial import _sampling_grid


def _params(b: int, c: int = 1, **fields) -> AugmentParams:
    p = AugmentParams.identity(b, c)
    for k, v in fields.items():
        dtype = torch.bool if k == "flip" else torch.float64
        setattr(p, k, torch.tensor(v, dtype=dtype))
    return p


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identity_is_exact() -> None:
    x = torch.randn(3, 2, 12, 10, 8, generator=_gen(0))
    y = torch.randint(0, 3, (3, 12, 10, 8), generator=_gen(1))
    xa, ya = apply(x, AugmentParams.identity(3, 2), labels=y)
    assert torch.equal(xa, x) and torch.equal(ya, y)
    xo, yo = Augment(AugmentConfig.off())(x, _gen(2), labels=y)
    assert torch.equal(xo, x) and torch.equal(yo, y)


@pytest.mark.parametrize("axis,dims", [(0, (3, 4)), (1, (2, 4)), (2, (2, 3))])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_multiples_of_90_matches_rot90(axis: int, dims: tuple[int, int], k: int) -> None:
    x = torch.randn(1, 2, 10, 10, 10, dtype=torch.float64, generator=_gen(k))
    y = torch.randint(0, 4, (1, 10, 10, 10), generator=_gen(10 + k))
    angles = [[0.0, 0.0, 0.0]]
    angles[0][axis] = k * math.pi / 2
    xa, ya = apply(x, _params(1, 2, angles=angles), labels=y)
    # rot90 samples exactly on the grid: float64 rounding of the sampling matrix only (snapped to 0/+-1)
    torch.testing.assert_close(xa, torch.rot90(x, k, dims=dims), rtol=0, atol=1e-12)
    assert torch.equal(ya, torch.rot90(y, k, dims=[d - 1 for d in dims]))  # labels move with the image


def test_rotation_in_float32_on_even_and_odd_sizes() -> None:
    x = torch.randn(2, 1, 9, 12, 12, generator=_gen(0))
    xa, _ = apply(x, _params(2, angles=[[math.pi / 2, 0, 0], [0, 0, 0]]))
    # fp32 grid coordinates: measured max error 1.5e-6 against rot90 on this input; 1e-5 is ~6x that
    torch.testing.assert_close(xa[0], torch.rot90(x[0], 1, dims=(2, 3)), rtol=0, atol=1e-5)
    assert torch.equal(xa[1], x[1])  # untouched sample of the same batch


@pytest.mark.parametrize("pattern", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)])
def test_flips_match_torch_flip_for_images_and_labels(pattern: tuple[int, int, int]) -> None:
    x = torch.randn(2, 1, 6, 7, 8, generator=_gen(0))
    y = torch.randint(0, 3, (2, 6, 7, 8), generator=_gen(1))
    xa, ya = apply(x, _params(2, flip=[list(pattern), [0, 0, 0]]), labels=y)
    dims = [a + 1 for a in range(3) if pattern[a]]  # per sample: (C, D, H, W) -> D is dim 1
    assert torch.equal(xa[0], torch.flip(x[0], dims=dims)) and torch.equal(xa[1], x[1])
    assert torch.equal(ya[0], torch.flip(y[0], dims=[d - 1 for d in dims])) and torch.equal(ya[1], y[1])


def test_rotation_and_scale_match_scipy_affine_transform() -> None:
    """A 30 deg rotation + scale 1.3 equals scipy's linear affine_transform with the same matrix; the
    labels equal scipy's nearest-neighbour (order 0) transform."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(1, 1, 11, 13, 12, dtype=torch.float64, generator=_gen(0))
    y = torch.randint(0, 3, (1, 11, 13, 12), generator=_gen(1))
    p = _params(1, angles=[[math.radians(30), math.radians(-10), 0.0]], scale=[1.3])
    xa, ya = apply(x, p, labels=y)
    m = sampling_matrices(p)[0].numpy()
    centre = (np.array(x.shape[2:]) - 1) / 2
    ref = ndimage.affine_transform(x[0, 0].numpy(), m, offset=centre - m @ centre, order=1,
                                   mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(xa[0, 0].numpy(), ref, rtol=0, atol=1e-10)  # float64: measured 6.1e-15
    ref_y = ndimage.affine_transform(y[0].numpy(), m, offset=centre - m @ centre, order=0,
                                     mode="grid-constant", cval=0)
    # measured: 0 voxels differ; nearest-neighbour ties at exact half-way points could round either way
    # on another CPU, so allow 0.5 % of the voxels
    assert (ya[0].numpy() != ref_y).mean() < 0.005


def test_rotation_of_a_non_cubic_patch_is_rigid_in_voxels() -> None:
    """Regression: a rotation in normalised coordinates shears a non-cubic patch. Our grid reads the input
    at M (p - c) + c in voxels: distances between sampled points equal distances between output voxels."""
    size = (16, 32, 48)
    p = _params(1, angles=[[math.radians(30.0), math.radians(20.0), 0.0]])
    m = sampling_matrices(p)
    grid = _sampling_grid(m, size)[0]  # (D, H, W, 3) as (x, y, z), align_corners=True
    n = torch.tensor([size[2], size[1], size[0]], dtype=torch.float64)
    vox = (grid + 1) * (n - 1) / 2  # normalised -> voxel coordinates (x, y, z) of the sampled points
    out = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in size], indexing="ij"),
                      -1).flip(-1)
    a, b = (0, 0, 0), (5, 9, 13)
    # float64 throughout: measured |difference| 3.6e-15
    assert abs((vox[a] - vox[b]).norm().item() - (out[a] - out[b]).norm().item()) < 1e-9


def test_sampling_is_reproducible_and_respects_probabilities() -> None:
    cfg = AugmentConfig()
    a = cfg.sample(4000, _gen(3), channels=2)
    b = cfg.sample(4000, _gen(3), channels=2)
    for f in dataclasses.fields(AugmentParams):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, f.name
    # 4000 draws: the standard error of a rate p is sqrt(p (1 - p) / n) <= 0.008; 4 sigma = 0.03
    rates = {"rotation": ((a.angles != 0).any(1), 0.2), "scale": (a.scale != 1, 0.2), "mirror": (a.flip, 0.5),
             "brightness": (a.brightness != 1, 0.15), "contrast": (a.contrast != 1, 0.15),
             "gamma": (a.gamma != 1, 0.3), "noise": (a.noise_sd > 0, 0.1)}
    for name, (on, p) in rates.items():
        assert abs(on.double().mean().item() - p) < 0.03, name
    assert a.angles.abs().max() <= math.radians(30) and 0.7 <= a.scale.min() and a.scale.max() <= 1.4
    assert 0.75 <= a.brightness.min() and a.brightness.max() <= 1.25 and a.gamma.max() <= 1.5
    assert a.noise_sd.max() ** 2 <= 0.1
    # the spatial draws of a seed do not depend on the intensity settings (pre-training == paper's)
    pre = AugmentConfig.pretraining().sample(4000, _gen(3), channels=2)
    assert torch.equal(pre.angles, a.angles) and torch.equal(pre.scale, a.scale) and torch.equal(pre.flip, a.flip)
    assert (pre.brightness == 1).all() and (pre.gamma == 1).all() and (pre.noise_sd == 0).all()
    x = torch.randn(4, 1, 16, 16, 16, generator=_gen(4))
    aug = Augment()
    assert torch.equal(aug(x, _gen(5)), aug(x, _gen(5)))


def test_intensity_transforms_follow_their_formulas() -> None:
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64, generator=_gen(0))
    bright = apply(x, _params(2, 2, brightness=[[1.2, 1.0], [1.0, 0.8]]))[0]
    assert torch.equal(bright[0, 0], x[0, 0] * 1.2) and torch.equal(bright[0, 1], x[0, 1])
    c = apply(x, _params(2, 2, contrast=[[1.25, 1.0], [1.0, 1.0]]))[0][0, 0]
    mean = x[0, 0].mean()
    ref = ((x[0, 0] - mean) * 1.25 + mean).clamp(x[0, 0].min(), x[0, 0].max())
    torch.testing.assert_close(c, ref, rtol=0, atol=1e-12)  # float64: measured 0
    g = apply(x, _params(2, 2, gamma=[[1.0, 1.0], [0.7, 1.0]]))[0][1, 0]
    lo, hi = x[1, 0].min(), x[1, 0].max()
    ref = ((x[1, 0] - lo) / (hi - lo)) ** 0.7 * (hi - lo) + lo
    ref = (ref - ref.mean()) / ref.std() * x[1, 0].std() + x[1, 0].mean()  # mean and std retained
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-12)  # float64: measured 2.2e-15
    noisy = apply(torch.zeros(1, 1, 32, 32, 32), _params(1, noise_sd=[0.5]))[0]
    assert abs(noisy.std().item() - 0.5) < 0.02  # 32^3 draws: sd of the estimate 0.5/sqrt(2n) = 0.002; got 0.5006


def test_labels_stay_aligned_with_a_label_valued_image() -> None:
    spatial = dataclasses.replace(AugmentConfig.off(), p_rotation=1.0, p_scale=1.0)
    yb = torch.zeros(4, 16, 16, 16, dtype=torch.long)
    yb[:, 4:12, 3:13, 5:11] = 1
    xa, ya = Augment(spatial)(yb[:, None].float(), _gen(3), labels=yb)
    assert not torch.equal(ya, yb)
    # trilinear vs nearest differ only at the box boundary: measured agreement 0.997 on this draw
    assert ((xa[:, 0] > 0.5).long() == ya).float().mean() > 0.97


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ValueError, match="params"):
        apply(torch.zeros(2, 1, 4, 4, 4), AugmentParams.identity(3))
    with pytest.raises(ValueError, match="labels"):
        apply(torch.zeros(2, 1, 4, 4, 4), AugmentParams.identity(2), labels=torch.zeros(2, 4, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="p_gamma"):
        AugmentConfig(p_gamma=1.5)
