"""s3d.augment: the one augmentation module, against nnU-Net's own transforms (a file batchgeneratorsv2
wrote, tests/augment_reference.py), torch.rot90 / torch.flip / scipy, and closed forms.

One test per transform checks its draws over many samples (rates within 4 sigma of the configured
probability, ranges, distribution), its exactness at the "off" value and its formula or reference.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import EPS32, sum_bound

from s3d.augment import Augment, AugmentConfig, AugmentParams, apply, sampling_matrices
from s3d.augment.intensity import add_noise, adjust_brightness, adjust_contrast, adjust_gamma, intensity_transform
from s3d.augment.resolution import gaussian_blur, gaussian_kernels, kernel_radius, simulate_low_resolution
from s3d.augment.spatial import _sampling_grid, mirror, rotate_and_scale

REFERENCE = Path(__file__).parent / "data" / "augment_bgv2.npz"
N = 20000  # samples per statistics test


def _params(b: int, c: int = 1, **fields) -> AugmentParams:
    p = AugmentParams.identity(b, c)
    for k, v in fields.items():
        dtype = torch.bool if k == "flip" else torch.float64
        setattr(p, k, torch.tensor(v, dtype=dtype))
    return p


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rate_ok(on: torch.Tensor, p: float) -> bool:
    """The fraction of True in ``on`` is within 4 binomial standard errors of ``p``."""
    n = on.numel()
    return abs(on.double().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def _mean_ok(v: torch.Tensor, lo: float, hi: float) -> bool:
    """Values in [lo, hi] whose mean is within 4 standard errors of the uniform mean (lo + hi) / 2."""
    se = (hi - lo) / math.sqrt(12 * v.numel())
    return bool(v.min() >= lo and v.max() <= hi) and abs(v.mean().item() - (lo + hi) / 2) <= 4 * se


def _split_ok(f: torch.Tensor, lo: float, hi: float) -> bool:
    """nnU-Net's BGContrast factors: half below 1 (uniform on [lo, 1]), half above (uniform on [1, hi])."""
    return _rate_ok(f < 1, 0.5) and _mean_ok(f[f < 1], lo, 1.0) and _mean_ok(f[f > 1], 1.0, hi)


def _draw(**on) -> AugmentParams:
    return AugmentConfig(**on).sample(N, _gen(11), channels=2)


def _ref() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE))


# ---- rounding bounds for float32 results (tests/tolerance.py: no tolerance is read off one machine) ----
U32 = EPS32 / 2  # float32 unit roundoff: one correctly rounded operation errs by <= u x |result|


def _interp_atol(x: torch.Tensor | np.ndarray, n_max: int, roundings: int = 10) -> float:
    """Bound on a float32 trilinear resampling's error: every source coordinate carries <= ``roundings``
    roundings of at most u x n_max voxels (the grid's products and sums, normalising and unnormalising);
    a coordinate error delta moves a trilinear value by <= 2 max|x| delta per axis; the 8-tap weighted
    sum adds <= 8 u max|x|."""
    delta = roundings * U32 * n_max
    return (3 * 2 * delta + 8 * U32) * float(np.abs(np.asarray(x)).max())


def _near_ties(scores: np.ndarray, margin: float) -> np.ndarray:
    """Voxels whose two highest scores (axis 0) are within ``margin``: where rounding may pick either."""
    top = np.sort(scores, 0)
    return top[-1] - top[-2] <= margin


def _linear_label_scores(y: torch.Tensor, p: AugmentParams, values) -> np.ndarray:
    """float64 scores of linear label resampling, (1 + len(values), D, H, W): the outside (padded as a
    label below all others, then 0), then each label's trilinearly resampled one-hot map."""
    grid = _sampling_grid(sampling_matrices(p), tuple(y.shape[1:]))

    def sample(v: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.grid_sample(v[None, None].double(), grid, mode="bilinear",
                                               padding_mode="zeros", align_corners=True)[0, 0].numpy()

    return np.stack([1 - sample(torch.ones(y.shape[1:]))] + [sample((y[0] == v).double()) for v in values])


# ---- draws: order, reproducibility, pre-training --------------------------------------------------------
@pytest.mark.numerical
def test_pretraining_spatial_draws_are_those_of_earlier_versions() -> None:
    """Pre-training runs are reproducible across versions: seed 1, batch 6 gave these values before the
    nnU-Net transforms were added (s3d main at 3e9fa41)."""
    p = AugmentConfig.pretraining().sample(6, _gen(1), channels=1)
    angles = [[-0.04093192646384729, 0.21819961399814808, 0.08354150028444246], [0.0] * 3, [0.0] * 3,
              [-0.4005992255873125, 0.146858415691056, -0.3175452929083399], [0.0] * 3,
              [0.5232840912029314, 0.4112661878154597, 0.39449997022644867]]
    assert p.angles.tolist() == angles
    assert p.scale.tolist() == [1.0, 0.999885258749897, 1.230433172345884, 1.0, 1.0, 1.0]
    assert p.flip.int().tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]]
    ident = AugmentParams.identity(6)
    for f in ("noise_sd", "blur_sigma", "brightness", "contrast", "lowres_scale", "gamma_inverted", "gamma"):
        assert torch.equal(getattr(p, f), getattr(ident, f)), f
    # the spatial draws of a seed do not depend on the intensity settings
    full = AugmentConfig().sample(6, _gen(1), channels=3)
    assert torch.equal(full.angles, p.angles) and torch.equal(full.scale, p.scale) and torch.equal(full.flip, p.flip)


def test_draws_are_replayable_and_augment_is_deterministic() -> None:
    a, b = AugmentConfig().sample(500, _gen(3), channels=2), AugmentConfig().sample(500, _gen(3), channels=2)
    for f in dataclasses.fields(AugmentParams):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, f.name
    x = torch.randn(4, 2, 16, 16, 16, generator=_gen(4))
    y = torch.randint(0, 3, (4, 16, 16, 16), generator=_gen(5))
    xa, ya = Augment()(x, _gen(6), labels=y)
    params = AugmentConfig().sample(4, _gen(6), channels=2)
    xr, yr = apply(x, params, labels=y)  # replay from the recorded parameters
    assert torch.equal(xa, xr) and torch.equal(ya, yr)


def test_identity_is_exact() -> None:
    x = torch.randn(3, 2, 12, 10, 8, generator=_gen(0))
    x[0, 0, 0, 0, :2] = torch.tensor([-0.0, 0.0])  # signed zeros survive too
    y = torch.randint(0, 3, (3, 12, 10, 8), generator=_gen(1))
    xa, ya = apply(x, AugmentParams.identity(3, 2), labels=y)
    assert torch.equal(xa, x) and torch.equal(ya, y) and torch.equal(xa.view(-1).signbit(), x.view(-1).signbit())
    xo, yo = Augment(AugmentConfig.off())(x, _gen(2), labels=y)
    assert torch.equal(xo, x) and torch.equal(yo, y)


def test_apply_runs_the_transforms_in_nnunets_order() -> None:
    """rotation/scale, noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, mirroring."""
    x = torch.randn(2, 2, 12, 12, 12, dtype=torch.float64, generator=_gen(0))
    y = torch.randint(0, 3, (2, 12, 12, 12), generator=_gen(1))
    p = AugmentConfig(**{f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}
                      ).sample(2, _gen(2), channels=2)
    got, got_y = apply(x, p, labels=y)
    ref, ref_y = rotate_and_scale(x, p, y)
    ref = add_noise(ref, p.noise_sd, p.noise_seed)
    ref = adjust_contrast(adjust_brightness(gaussian_blur(ref, p.blur_sigma), p.brightness), p.contrast)
    ref = adjust_gamma(adjust_gamma(simulate_low_resolution(ref, p.lowres_scale), p.gamma_inverted, invert=True),
                       p.gamma)
    assert torch.equal(got, mirror(ref, p.flip)) and torch.equal(got_y, mirror(ref_y, p.flip))
    assert torch.equal(intensity_transform(x, p), adjust_gamma(adjust_gamma(simulate_low_resolution(
        adjust_contrast(adjust_brightness(gaussian_blur(add_noise(x, p.noise_sd, p.noise_seed), p.blur_sigma),
                                          p.brightness), p.contrast), p.lowres_scale), p.gamma_inverted,
        invert=True), p.gamma))


# ---- rotation and scaling ---------------------------------------------------------------------------------
def test_rotation_and_scale_draws() -> None:
    p = _draw()
    rot = (p.angles != 0).any(1)
    assert _rate_ok(rot, 0.2) and bool(((p.angles != 0).all(1) == rot).all())  # all three axes at once
    assert _mean_ok(p.angles[rot].flatten(), -math.radians(30), math.radians(30))
    assert _rate_ok(p.scale != 1, 0.2) and _mean_ok(p.scale[p.scale != 1], 0.7, 1.4)
    assert torch.corrcoef(torch.stack([rot.double(), (p.scale != 1).double()]))[0, 1].abs() < 4 / math.sqrt(N)


@pytest.mark.numerical
@pytest.mark.parametrize("axis,dims", [(0, (3, 4)), (1, (2, 4)), (2, (2, 3))])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_rotation_by_multiples_of_90_matches_rot90(axis: int, dims: tuple[int, int], k: int, mode: str) -> None:
    x = torch.randn(1, 2, 10, 10, 10, dtype=torch.float64, generator=_gen(k))
    y = torch.randint(0, 4, (1, 10, 10, 10), generator=_gen(10 + k))
    angles = [[0.0, 0.0, 0.0]]
    angles[0][axis] = k * math.pi / 2
    xa, ya = apply(x, _params(1, 2, angles=angles), labels=y, label_interpolation=mode)
    # rot90 samples exactly on the grid: float64 rounding of the sampling matrix only (snapped to 0/+-1);
    # the float64 version of _interp_atol is ~4e-14 x max|x|
    torch.testing.assert_close(xa, torch.rot90(x, k, dims=dims), rtol=0, atol=1e-12)
    assert torch.equal(ya, torch.rot90(y, k, dims=[d - 1 for d in dims]))  # labels move with the image


@pytest.mark.numerical
def test_rotation_in_float32_on_even_and_odd_sizes() -> None:
    x = torch.randn(2, 1, 9, 12, 12, generator=_gen(0))
    xa, _ = apply(x, _params(2, angles=[[math.pi / 2, 0, 0], [0, 0, 0]]))
    # float32 grid coordinates: within the resampling bound (a wrong angle or axis is off by O(1))
    torch.testing.assert_close(xa[0], torch.rot90(x[0], 1, dims=(2, 3)), rtol=0, atol=_interp_atol(x, 12))
    assert torch.equal(xa[1], x[1])  # untouched sample of the same batch


@pytest.mark.numerical
def test_rotation_and_scale_match_nnunet() -> None:
    """batchgeneratorsv2's SpatialTransform with nnU-Net's settings (labels: one-hot, linear, argmax, outside
    padded with -1 then set to 0). Its angles (a0, a1, a2) about axes 0, 1, 2 are s3d's (-a0, a1, -a2): its
    rotation about axis 1 turns the other way, and it maps input to output (s3d output to input)."""
    ref = _ref()
    x, y = torch.from_numpy(ref["image"])[None], torch.from_numpy(ref["seg"]).long()
    for i in range(3):
        a = ref[f"spatial{i}_angles"]
        p = _params(1, 2, angles=[[-a[0], a[1], -a[2]]], scale=[float(ref[f"spatial{i}_scale"])])
        xa, ya = apply(x, p, labels=y)
        # two float32 resamplings of the same transform: each within the resampling bound
        np.testing.assert_allclose(xa[0].numpy(), ref[f"spatial{i}_image"], rtol=0, atol=2 * _interp_atol(x, 12))
        # labels may differ only where the two highest scores are within both implementations' score
        # errors: ours (float32, the resampling bound for maps in [0, 1]) and batchgeneratorsv2's float16
        # (unit roundoff 2^-11 on each of the 8 taps and the sum: 16 x 2^-11)
        margin = 2 * (_interp_atol(np.ones(1), 12) + 16 * 2.0**-11)
        differ = ya.numpy()[0] != ref[f"spatial{i}_seg"][0]
        near = _near_ties(_linear_label_scores(y, p, range(4)), margin)
        assert not (differ & ~near).any(), (i, int(differ.sum()), int(near.sum()))
        assert near.mean() < 0.05, i  # the check above is not vacuous
        _, yn = apply(x, p, labels=y, label_interpolation="nearest")
        assert (yn.numpy() != ref[f"spatial{i}_seg"]).mean() > 0.02  # the comparison can tell them apart


@pytest.mark.numerical
def test_rotation_and_scale_match_scipy_affine_transform() -> None:
    """A 30 deg rotation + scale 1.3 equals scipy's linear affine_transform with the same matrix; nearest
    labels equal scipy's order-0 transform; linear labels the argmax of scipy's order-1 one-hot maps."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(1, 1, 11, 13, 12, dtype=torch.float64, generator=_gen(0))
    y = torch.randint(0, 3, (1, 11, 13, 12), generator=_gen(1))
    p = _params(1, angles=[[math.radians(30), math.radians(-10), 0.0]], scale=[1.3])
    m = sampling_matrices(p)[0].numpy()
    centre = (np.array(x.shape[2:]) - 1) / 2

    def scipy_affine(v: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(v, m, offset=centre - m @ centre, order=order, mode="grid-constant", cval=0)

    xa, ya = apply(x, p, labels=y, label_interpolation="nearest")
    # float64 (the resampling bound with eps64 instead of eps32 is ~1e-13 x max|x|)
    np.testing.assert_allclose(xa[0, 0].numpy(), scipy_affine(x[0, 0].numpy(), 1), rtol=0, atol=1e-10)
    # nearest labels may differ only where a source coordinate is within float64 rounding (1e-12 voxels
    # here) of a half-way point, where the two may round either way
    src = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in x.shape[2:]], indexing="ij"), -1) - centre
    src = src @ m.T + centre
    half_way = (np.abs(src - np.floor(src) - 0.5) < 1e-12).any(-1)
    assert not ((ya[0].numpy() != scipy_affine(y[0].numpy(), 0)) & ~half_way).any()
    _, yl = apply(x, p, labels=y)
    yn = y[0].numpy()
    scores = np.stack([scipy_affine(np.ones_like(yn, dtype=float), 1) * -1 + 1]  # the outside, label 0
                      + [scipy_affine((yn == v).astype(float), 1) for v in range(3)])
    ref_l = np.array([0, 0, 1, 2])[scores.argmax(0)]
    # linear labels: may differ only at float64 near-ties of the scores
    assert not ((yl[0].numpy() != ref_l) & ~_near_ties(scores, 1e-12)).any()


@pytest.mark.numerical
def test_linear_labels_with_any_values_and_in_chunks() -> None:
    """Labels need not be 0..K-1: values -2, 0, 3, 7, 9 resample like scipy's one-hot maps (the outside a
    label below all others, then 0), and resampling 2 labels per grid_sample call changes nothing."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from s3d.augment.spatial import _resample_labels_linear

    vals = np.array([-2, 0, 3, 7, 9])
    y = torch.from_numpy(vals[np.random.default_rng(0).integers(0, 5, (1, 11, 12, 13))])
    p = _params(1, angles=[[math.radians(25), 0.0, math.radians(-40)]], scale=[1.2])
    m = sampling_matrices(p)[0].numpy()
    centre = (np.array(y.shape[1:]) - 1) / 2
    grid = _sampling_grid(sampling_matrices(p), tuple(y.shape[1:]))
    got = _resample_labels_linear(y, grid, torch.float64)
    assert torch.equal(got, _resample_labels_linear(y, grid, torch.float64, chunk=2))

    def scipy_affine(v: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(v, m, offset=centre - m @ centre, order=1, mode="grid-constant", cval=0)

    scores = np.stack([1 - scipy_affine(np.ones(y.shape[1:]))] + [scipy_affine((y[0].numpy() == v) * 1.0)
                                                                   for v in vals])
    ref = np.r_[0, vals][scores.argmax(0)]
    # float64: may differ only at near-ties of the scores (within float64 rounding)
    assert not ((got[0].numpy() != ref) & ~_near_ties(scores, 1e-12)).any()
    assert set(np.unique(got.numpy())) <= set(vals) | {0}


def test_rotation_of_a_non_cubic_patch_is_rigid_in_voxels() -> None:
    """Regression: a rotation in normalised coordinates shears a non-cubic patch. Our grid reads the input
    at M (p - c) + c in voxels: distances between sampled points equal distances between output voxels."""
    size = (16, 32, 48)
    p = _params(1, angles=[[math.radians(30.0), math.radians(20.0), 0.0]])
    grid = _sampling_grid(sampling_matrices(p), size)[0]  # (D, H, W, 3) as (x, y, z), align_corners=True
    n = torch.tensor([size[2], size[1], size[0]], dtype=torch.float64)
    vox = (grid + 1) * (n - 1) / 2  # normalised -> voxel coordinates (x, y, z) of the sampled points
    out = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in size], indexing="ij"),
                      -1).flip(-1)
    a, b = (0, 0, 0), (5, 9, 13)
    # float64 throughout: a few roundings of coordinates <= 48, ~1e-13; a shear moves it by > 1
    assert abs((vox[a] - vox[b]).norm().item() - (out[a] - out[b]).norm().item()) < 1e-9


@pytest.mark.numerical
def test_labels_stay_aligned_with_a_label_valued_image() -> None:
    """For a binary label map, linear label resampling is 'the interpolated label image > 1/2' (away from
    the patch border), so it agrees with the trilinearly resampled label-valued image."""
    spatial = dataclasses.replace(AugmentConfig.off(), p_rotation=1.0, p_scale=1.0)
    yb = torch.zeros(4, 16, 16, 16, dtype=torch.long)
    yb[:, 4:12, 3:13, 5:11] = 1
    xa, ya = Augment(spatial)(yb[:, None].float(), _gen(3), labels=yb)
    assert not torch.equal(ya, yb)
    # they may differ only where the interpolated label image is within float32 rounding of 1/2
    near_half = (xa[:, 0] - 0.5).abs() <= 2 * _interp_atol(np.ones(1), 16)
    assert not (((xa[:, 0] > 0.5).long() != ya) & ~near_half).any()
    _, yn = Augment(dataclasses.replace(spatial, label_interpolation="nearest"))(yb[:, None].float(), _gen(3),
                                                                                 labels=yb)
    # nearest labels differ from it along label boundaries (geometry, not rounding): a few voxels in 1000
    assert ((xa[:, 0] > 0.5).long() == yn).float().mean() > 0.97


# ---- mirroring ----------------------------------------------------------------------------------------
def test_mirror_draws() -> None:
    p = _draw()
    assert all(_rate_ok(p.flip[:, a], 0.5) for a in range(3))
    assert _rate_ok(p.flip.all(1), 0.125)  # axes independent


@pytest.mark.parametrize("pattern", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)])
def test_flips_match_torch_flip_for_images_and_labels(pattern: tuple[int, int, int]) -> None:
    x = torch.randn(2, 1, 6, 7, 8, generator=_gen(0))
    y = torch.randint(0, 3, (2, 6, 7, 8), generator=_gen(1))
    xa, ya = apply(x, _params(2, flip=[list(pattern), [0, 0, 0]]), labels=y)
    dims = [a + 1 for a in range(3) if pattern[a]]  # per sample: (C, D, H, W) -> D is dim 1
    assert torch.equal(xa[0], torch.flip(x[0], dims=dims)) and torch.equal(xa[1], x[1])
    assert torch.equal(ya[0], torch.flip(y[0], dims=[d - 1 for d in dims])) and torch.equal(ya[1], y[1])


# ---- Gaussian noise ---------------------------------------------------------------------------------------
def test_noise() -> None:
    p = _draw()
    on = p.noise_sd > 0
    assert _rate_ok(on, 0.1) and _mean_ok(p.noise_sd[on], 0.0, 0.1)  # the sd is drawn (nnU-Net's "variance")
    x = torch.randn(3, 2, 32, 32, 32, generator=_gen(0))
    xn = add_noise(x, torch.tensor([0.0, 0.08, 0.0], dtype=torch.float64), seed=7)
    assert torch.equal(xn[0], x[0]) and torch.equal(xn[2], x[2])
    field = (xn[1] - x[1]).double()
    # 2 x 32^3 draws: sd of the estimated sd 0.08 / sqrt(2 n) = 2.2e-4; 4 sigma = 9e-4 (fp32 adds ~1e-8)
    assert abs(field.std().item() - 0.08) < 9e-4 and abs(field.mean().item()) < 4 * 0.08 / math.sqrt(field.numel())
    # each channel its own field: correlation within 4 / sqrt(n)
    assert abs(torch.corrcoef(field.view(2, -1))[0, 1].item()) < 4 / math.sqrt(32**3)


# ---- Gaussian blur --------------------------------------------------------------------------------------
def test_blur_draws() -> None:
    p = _draw()
    on = (p.blur_sigma > 0).all(-1)
    assert bool(((p.blur_sigma > 0).any(-1) == on).all())  # a blurred channel has a sigma on every axis
    assert _rate_ok(on, 0.2 * 0.5)
    sample_on = on.any(1)  # among samples picked (p 0.2), each channel with p 0.5: P(any of 2) = 0.75
    assert _rate_ok(sample_on, 0.2 * 0.75) and _rate_ok(on[sample_on].all(1), 1 / 3)
    s = p.blur_sigma[on]  # (n, 3): sigma per channel and axis, U(0.5, 1), axes independent
    assert _mean_ok(s.flatten(), 0.5, 1.0)
    assert torch.corrcoef(s.T)[0, 1:].abs().max() < 4 / math.sqrt(s.shape[0])


def _nnunet_kernel_size(sigma: float) -> int:
    """batchgeneratorsv2's rule (gaussian_blur.py, _compute_kernel_size with truncate=6): the odd number
    nearest to 6 sigma + 0.5, Python-rounded first and moved up when it was even and not above."""
    n = sigma * 6 + 0.5
    r = round(n)
    return r if r % 2 == 1 else (r + 1 if n - r >= 0 else r - 1)


def test_blur_kernel_is_nnunets_truncated_gaussian() -> None:
    sigmas = torch.linspace(0.3, 2.5, 221, dtype=torch.float64)
    assert [2 * r + 1 for r in kernel_radius(sigmas).tolist()] == [_nnunet_kernel_size(float(s)) for s in sigmas]
    k = gaussian_kernels(torch.tensor([0.5, 1.0], dtype=torch.float64))
    t = np.arange(-3, 4)
    ref = np.exp(-t**2 / 2.0) / np.exp(-t**2 / 2.0).sum()
    # float64: exp and a 7-term normalisation of values <= 0.4, ~10 eps64 x 0.4 = 9e-16
    np.testing.assert_allclose(k[1].numpy(), ref, rtol=0, atol=1e-15)
    ref_half = np.exp(-t[2:5]**2 / 0.5) / np.exp(-t[2:5]**2 / 0.5).sum()
    np.testing.assert_allclose(k[0].numpy(), np.r_[0, 0, ref_half, 0, 0], rtol=0, atol=1e-15)


@pytest.mark.numerical
def test_blur_of_a_delta_is_the_normalised_kernel() -> None:
    x = torch.zeros(1, 2, 15, 15, 15)
    x[0, 0, 7, 7, 7] = 1.0
    sig = (0.6, 0.9, 1.0)
    out = gaussian_blur(x, torch.tensor([[sig, (0.0, 0.0, 0.0)]], dtype=torch.float64))
    assert torch.equal(out[0, 1], x[0, 1])  # sigma 0: untouched

    def k1(s: float) -> np.ndarray:
        r = int(math.floor(3 * s + 0.25))
        t = np.arange(-7, 8)
        w = np.exp(-t**2 / (2 * s * s)) * (np.abs(t) <= r)
        return w / w.sum()

    ref = np.einsum("i,j,k->ijk", k1(sig[0]), k1(sig[1]), k1(sig[2]))
    # float32: three kernel taps, each rounded once from float64, multiplied (two roundings); sums of
    # exact zeros add nothing: <= 5 u relative; tolerance 8 u
    np.testing.assert_allclose(out[0, 0].numpy(), ref, rtol=8 * U32, atol=0)


@pytest.mark.numerical
def test_blur_matches_scipy_and_nnunet() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(1, 1, 5, 11, 12, dtype=torch.float64, generator=_gen(0))
    sig = [0.5, 0.8, 1.0]
    out = gaussian_blur(x, torch.tensor([[sig]], dtype=torch.float64))[0, 0].numpy()
    ref = x[0, 0].numpy()
    for axis, s in enumerate(sig):  # separable, reflect padding (scipy's "mirror")
        kernel = gaussian_kernels(torch.tensor([s], dtype=torch.float64))[0].numpy()
        ref = ndimage.correlate1d(ref, kernel, axis=axis, mode="mirror")
    # float64: 3 passes of <= 7 taps with positive weights summing to 1: <= 24 eps64 max|x| = 2e-14
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)
    r = _ref()
    got = gaussian_blur(torch.from_numpy(r["image"])[None], torch.tensor([[[0.5, 0.8, 1.0], [0.95, 0.6, 0.7]]]))
    # float32, positive weights summing to 1, each rounded once: ours 3 passes of <= 7 taps (<= 3 x (7 + 1)
    # u max|x|), batchgeneratorsv2's conv3d sums up to 7^3 products (<= (343 + 3) u max|x|)
    atol = (3 * 8 + 346) * U32 * float(np.abs(r["image"]).max())
    np.testing.assert_allclose(got[0].numpy(), r["blur"], rtol=0, atol=atol)


# ---- brightness ---------------------------------------------------------------------------------------
@pytest.mark.numerical
def test_brightness() -> None:
    p = _draw()
    on = p.brightness != 1
    assert _rate_ok(on.any(1), 0.15) and bool((on.all(1) == on.any(1)).all())  # per sample, every channel
    assert _split_ok(p.brightness[on], 0.75, 1.25)
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64, generator=_gen(0))
    out = adjust_brightness(x, torch.tensor([[1.2, 1.0], [1.0, 0.8]], dtype=torch.float64))
    assert torch.equal(out[0, 0], x[0, 0] * 1.2) and torch.equal(out[0, 1], x[0, 1]) and torch.equal(out[1, 0], x[1, 0])
    r = _ref()
    got = adjust_brightness(torch.from_numpy(r["image"])[None], torch.tensor([[0.9, 1.1]], dtype=torch.float64))
    np.testing.assert_array_equal(got[0].numpy(), r["brightness"])  # one correctly rounded product: identical


def test_uniform_factors_when_not_split() -> None:
    p = AugmentConfig(p_brightness=1.0, factor_split=False).sample(N, _gen(1), channels=1)
    assert _mean_ok(p.brightness.flatten(), 0.75, 1.25) and _rate_ok(p.brightness < 1, 0.5)
    g = AugmentConfig(p_gamma=1.0, factor_split=False).sample(N, _gen(1), channels=1).gamma.flatten()
    assert _mean_ok(g, 0.7, 1.5) and _rate_ok(g < 1, 0.3 / 0.8)  # split would put half below 1
    above = AugmentConfig(p_gamma=1.0, gamma=(1.2, 1.5)).sample(N, _gen(1)).gamma.flatten()
    assert _mean_ok(above, 1.2, 1.5)  # lo >= 1: nnU-Net's BGContrast draws U(lo, hi)


# ---- contrast -----------------------------------------------------------------------------------------
@pytest.mark.numerical
def test_contrast() -> None:
    p = _draw()
    on = p.contrast != 1
    assert _rate_ok(on.any(1), 0.15) and bool((on.all(1) == on.any(1)).all())
    assert _split_ok(p.contrast[on], 0.75, 1.25)
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64, generator=_gen(0))
    out = adjust_contrast(x, torch.tensor([[1.25, 1.0], [1.0, 1.0]], dtype=torch.float64))
    mean = x[0, 0].mean()
    ref = ((x[0, 0] - mean) * 1.25 + mean).clamp(x[0, 0].min(), x[0, 0].max())
    # float64: a 512-term mean and two roundings, <= 512 eps64 max|x| ~ 5e-13
    torch.testing.assert_close(out[0, 0], ref, rtol=0, atol=1e-12)
    assert torch.equal(out[0, 1], x[0, 1]) and torch.equal(out[1], x[1])
    r = _ref()
    got = adjust_contrast(torch.from_numpy(r["image"])[None], torch.tensor([[0.8, 1.2]], dtype=torch.float64))
    # float32, both (x - mean) f + mean = f x + (1 - f) mean: the n-term mean errs by <= n eps32 max|x|
    # (weighted by |1 - f| <= 0.2), the rest by <= 4 u (f max|x| + |mean|) <= 8 u max|x|; twice (both)
    n, mx = r["image"][0].size, float(np.abs(r["image"]).max())
    np.testing.assert_allclose(got[0].numpy(), r["contrast"], rtol=0, atol=2 * (0.2 * sum_bound(n, torch.float32, mx)
                                                                               + 8 * U32 * mx))


# ---- low resolution -----------------------------------------------------------------------------------
def test_lowres_draws() -> None:
    p = _draw()
    on = p.lowres_scale != 1
    assert _rate_ok(on, 0.25 * 0.5) and _rate_ok(on.any(1), 0.25 * 0.75)
    assert _mean_ok(p.lowres_scale[on], 0.5, 1.0)


def _zoom_axis(v: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Nearest-exact from n to m voxels along ``axis``, then linear back to n (half-pixel centres, clamped):
    the formulas of torch's 'nearest-exact' and 'trilinear' (align_corners=False), in float64."""
    n = v.shape[axis]
    down = np.take(v, np.minimum(np.floor((np.arange(m) + 0.5) * n / m).astype(int), n - 1), axis=axis)
    src = np.maximum((np.arange(n) + 0.5) * m / n - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), m - 1)
    i1 = np.minimum(i0 + 1, m - 1)
    w = (src - i0).reshape([-1 if a == axis else 1 for a in range(v.ndim)])
    return np.take(down, i0, axis=axis) * (1 - w) + np.take(down, i1, axis=axis) * w


@pytest.mark.numerical
def test_lowres_follows_its_formula_and_matches_nnunet() -> None:
    x = torch.randn(1, 2, 12, 10, 9, dtype=torch.float64, generator=_gen(0))
    out = simulate_low_resolution(x, torch.tensor([[0.6, 1.0]], dtype=torch.float64))
    assert torch.equal(out[0, 1], x[0, 1])
    ref = x[0, 0].numpy()
    for axis, n in enumerate(x.shape[2:]):
        ref = _zoom_axis(ref, axis, round(n * 0.6))  # 7, 6, 5 voxels
    # float64 trilinear: the resampling bound with eps64, ~1e-14 x max|x|
    np.testing.assert_allclose(out[0, 0].numpy(), ref, rtol=0, atol=1e-12)
    const = simulate_low_resolution(torch.full((1, 1, 13, 11, 9), 2.7), torch.tensor([[0.55]]))
    # a constant stays constant: weights summing to 1 times c, an 8-term sum: <= 11 u c (+ c's own rounding)
    assert (const - 2.7).abs().max() <= 12 * U32 * 2.7
    r = _ref()
    got = simulate_low_resolution(torch.from_numpy(r["image"])[None], torch.tensor([[0.5, 0.73]]))
    # nearest-exact copies exactly; the trilinear upsampling: the resampling bound (4 roundings per
    # coordinate), for both implementations
    np.testing.assert_allclose(got[0].numpy(), r["lowres"], rtol=0, atol=2 * _interp_atol(r["image"], 12, 4))


# ---- gamma, inverted gamma -----------------------------------------------------------------------------
def _gamma_ref(v: torch.Tensor, g: float, invert: bool) -> torch.Tensor:
    lo, hi = v.min(), v.max()
    u = (v - lo) / (hi - lo)
    y = lo + (hi - lo) * ((1 - (1 - u) ** g) if invert else u**g)
    return (y - y.mean()) / y.std() * v.std() + v.mean()  # mean and std retained


@pytest.mark.numerical
@pytest.mark.parametrize("invert,p_on", [(False, 0.3), (True, 0.1)])
def test_gamma(invert: bool, p_on: float) -> None:
    p = _draw()
    g = p.gamma_inverted if invert else p.gamma
    on = g != 1
    assert _rate_ok(on.any(1), p_on) and bool((on.all(1) == on.any(1)).all())
    assert _split_ok(g[on], 0.7, 1.5)
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64, generator=_gen(0))
    out = adjust_gamma(x, torch.tensor([[1.0, 1.0], [0.7, 1.0]], dtype=torch.float64), invert=invert)
    # float64: the means and stds of x and y (4 sums of 512 terms, entering relative to std ~ 1) and ~10
    # roundings of values <= max|x|
    mx = float(x[1, 0].abs().max())
    atol = 4 * sum_bound(512, torch.float64, mx) + 10 * torch.finfo(torch.float64).eps * mx
    torch.testing.assert_close(out[1, 0], _gamma_ref(x[1, 0], 0.7, invert), rtol=0, atol=atol)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1, 1], x[1, 1])
    r = _ref()
    got = adjust_gamma(torch.from_numpy(r["image"])[None], torch.tensor([[0.75, 1.4]]), invert=invert)
    # float32, both: min/max exact; the power and rescaling ~10 roundings (10 u max|x|); the means and stds
    # of x and y (4 n-term sums, <= n eps32 max|x| each, relative to std ~ 1); twice (both implementations)
    n, mx = r["image"][0].size, float(np.abs(r["image"]).max())
    atol = 2 * (4 * sum_bound(n, torch.float32, mx) + 10 * U32 * mx)
    np.testing.assert_allclose(got[0].numpy(), r["gamma_inverted" if invert else "gamma"], rtol=0, atol=atol)


# ---- errors ---------------------------------------------------------------------------------------------
def test_bad_params_and_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="params"):
        apply(torch.zeros(2, 1, 4, 4, 4), AugmentParams.identity(3))
    with pytest.raises(ValueError, match="labels"):
        apply(torch.zeros(2, 1, 4, 4, 4), AugmentParams.identity(2), labels=torch.zeros(2, 4, 4, 5, dtype=torch.long))
    for bad, match in [({"p_gamma": 1.5}, "p_gamma"), ({"label_interpolation": "cubic"}, "label_interpolation"),
                       ({"lowres_scale": (0.5, 1.5)}, "lowres_scale"), ({"noise_sd": (-0.1, 0.1)}, "noise_sd"),
                       ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"), ({"gamma": (1.5, 0.7)}, "gamma")]:
        with pytest.raises(ValueError, match=match):
            AugmentConfig(**bad)
