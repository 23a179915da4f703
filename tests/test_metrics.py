"""Dice, NSD and empty-mask policies against DeepMind's surface-distance and analytic cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from s3d.metrics import EmptyPolicy, dice, nsd, surfel_area_table, surfels

ndimage = pytest.importorskip("scipy.ndimage")


def blob(shape, seed, sigma=3.0, level=0.05):
    """A smooth random binary mask with several components."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > level


def sphere(shape, center, radius_mm, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing, strict=True)) <= radius_mm**2


SPACINGS = [(1.0, 1.0, 1.0), (0.7, 1.2, 2.5), (3.0, 0.5, 0.5)]


@pytest.fixture(scope="module")
def sd():
    return pytest.importorskip("surface_distance")


def _their_code(code: int, kernel: np.ndarray) -> int:
    corners = list(itertools.product((0, 1), repeat=3))
    return sum(int(kernel[corners[b]]) for b in range(8) if code >> b & 1)


@pytest.mark.numerical
@pytest.mark.parametrize("spacing", SPACINGS)
def test_surfel_area_table_equals_reference(sd, spacing):
    from surface_distance import lookup_tables

    theirs = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    ours = surfel_area_table(spacing)
    kernel = lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL
    # float64 vs surface-distance's table: a few products and sums of O(1) values, ~10 eps64
    np.testing.assert_allclose(ours, [theirs[_their_code(c, kernel)] for c in range(256)], atol=1e-12)


def test_surfel_area_of_flat_faces():
    # a single voxel: 6 faces, each split over 4 corners; the 8 corners each carry one triangle
    # (sqrt(3)/8 at unit spacing) -> marching cubes approximates the cube by an octahedron
    area = surfel_area_table((2.0, 3.0, 5.0))
    assert area[0] == 0 and area[255] == 0
    # two voxels filling one face of the cell along axis 0: a flat quad of 1 x 1 voxel faces
    face = sum(1 << b for b, c in enumerate(itertools.product((0, 1), repeat=3)) if c[0] == 0)
    assert area[face] == pytest.approx(3.0 * 5.0)


@pytest.mark.numerical
@pytest.mark.parametrize("method", ["edt", "offsets"])
@pytest.mark.parametrize("spacing", SPACINGS[:2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_and_nsd_equal_reference_on_random_blobs(sd, spacing, seed, method):
    shape = (36, 40, 32)
    ref = blob(shape, seed)
    pred = blob(shape, seed + 100) | ndimage.binary_erosion(ref, iterations=2)
    assert ref.any() and pred.any() and (ref ^ pred).any()
    dist = sd.compute_surface_distances(ref, pred, spacing)
    # float64 ratios of integer counts: ~1e-16
    assert dice(pred, ref) == pytest.approx(sd.compute_dice_coefficient(ref, pred), abs=1e-12)
    for tau in (0.5, 1.0, 2.0, 3.7, 6.0):
        expected = sd.compute_surface_dice_at_tolerance(dist, tau)
        ours = nsd(pred, ref, spacing, tau, method=method)
        # float64 sums of <= 1e4 surfel areas (<= 1e4 eps64 = 2e-12 relative); distances are compared
        # with tau on the same float64 distance transform as the reference's
        assert abs(ours - expected) < 1e-9
    assert nsd(pred, ref, spacing, 6.0) == nsd(pred, ref, spacing, 6.0, method="edt")  # auto -> edt


@pytest.mark.numerical
def test_surfel_distances_equal_reference(sd):
    ref, pred = blob((30, 28, 26), 5), blob((30, 28, 26), 6)
    theirs = sd.compute_surface_distances(ref, pred, (1.2, 0.9, 2.0))
    d_ref, a_ref, d_pred, a_pred = surfels(pred, ref, (1.2, 0.9, 2.0))
    for ours, key in ((d_ref, "distances_gt_to_pred"), (d_pred, "distances_pred_to_gt")):
        np.testing.assert_allclose(np.sort(ours), theirs[key], atol=1e-9)  # float64 distances < 100 mm: ~1e-14
    assert a_ref.sum() == pytest.approx(theirs["surfel_areas_gt"].sum(), abs=1e-9)
    assert a_pred.sum() == pytest.approx(theirs["surfel_areas_pred"].sum(), abs=1e-9)


@pytest.mark.numerical
def test_mask_touching_the_volume_border_equals_reference(sd):
    ref = np.zeros((20, 20, 20), bool)
    ref[:8, 5:15, 12:] = True
    pred = np.roll(ref, 2, axis=1)
    dist = sd.compute_surface_distances(ref, pred, (1.0, 2.0, 1.5))
    assert nsd(pred, ref, (1.0, 2.0, 1.5), 2.0) == pytest.approx(
        sd.compute_surface_dice_at_tolerance(dist, 2.0), abs=1e-9)  # float64 area sums, as above


def test_dice_formula_and_ignore_region():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 10, 12, 14)) > 0.5, rng.random((3, 10, 12, 14)) > 0.6
    expected = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice(a, b) == pytest.approx(expected, abs=1e-12)  # float64 ratio of integer counts: ~1e-16
    valid = rng.random(a.shape) > 0.3
    av, bv = a[valid], b[valid]
    assert dice(a, b, valid=valid) == pytest.approx(2 * (av & bv).sum() / (av.sum() + bv.sum()), abs=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.8, 2.0)])
def test_sphere_against_itself_is_one(spacing):
    m = sphere((32, 40, 24), (16, 20, 12), 9.0, spacing)
    assert dice(m, m) == 1.0
    assert nsd(m, m, spacing, 0.0) == 1.0
    assert nsd(m, m, spacing, 2.0) == 1.0


def test_sphere_shifted_beyond_tau_is_zero():
    ref = sphere((48, 24, 24), (12, 12, 12), 5.0)
    pred = np.roll(ref, 16, axis=0)
    # voxels 7..17 and 23..33 along axis 0; the surfaces lie on voxel boundaries 17.5 and 22.5: 5 mm apart
    assert nsd(pred, ref, (1.0, 1.0, 1.0), 2.0) == 0.0
    assert nsd(pred, ref, (1.0, 1.0, 1.0), 4.9) == 0.0
    assert nsd(pred, ref, (1.0, 1.0, 1.0), 5.0) > 0.0
    assert nsd(pred, ref, (2.0, 1.0, 1.0), 9.9) == 0.0  # 10 mm apart at 2 mm spacing
    assert dice(pred, ref) == 0.0


def test_nsd_uses_spacing():
    """A box shifted by one voxel along an axis of 3 mm spacing: every surfel is within 3 mm."""
    ref = np.zeros((12, 12, 12), bool)
    ref[3:7, 3:8, 2:9] = True
    pred = np.roll(ref, 1, axis=0)
    assert nsd(pred, ref, (3.0, 1.0, 1.0), 3.0) == 1.0
    assert nsd(pred, ref, (3.0, 1.0, 1.0), 2.9) < 1.0
    assert nsd(pred, ref, (1.0, 1.0, 1.0), 1.0) == 1.0  # same voxels at 1 mm spacing


@pytest.mark.parametrize(
    "policy, both_empty, ref_empty",
    [("nan", math.nan, 0.0), ("one", 1.0, 0.0), ("zero", 0.0, 0.0), ("ignore_empty_ref", math.nan, math.nan)],
)
def test_empty_policies(policy, both_empty, ref_empty):
    empty = np.zeros((8, 8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    for metric in (lambda p, r, e: dice(p, r, e), lambda p, r, e: nsd(p, r, (1, 1, 1), 2.0, e)):
        np.testing.assert_equal(metric(empty, empty, policy), both_empty)
        np.testing.assert_equal(metric(full, empty, policy), ref_empty)  # false positives only
        assert metric(empty, full, policy) == 0.0  # missed structure
    assert EmptyPolicy(policy).value == policy


def test_default_policy_is_nnunet():
    empty = np.zeros((4, 4, 4), bool)
    assert math.isnan(dice(empty, empty)) and math.isnan(nsd(empty, empty, (1, 1, 1)))


def test_bad_input_is_named():
    m = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="policy 'sometimes'"):
        dice(m, m, "sometimes")
    with pytest.raises(ValueError, match="binary mask"):
        dice(np.full((4, 4, 4), 2), m)
    with pytest.raises(ValueError, match="shape"):
        dice(m, np.zeros((4, 4, 5), bool))
    m[1, 1, 1] = True
    with pytest.raises(ValueError, match="spacing_mm"):
        nsd(m, m, (1.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        nsd(m, m, (1.0, 1.0, 1.0), method="kdtree")
