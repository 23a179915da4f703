"""NIfTI I/O with geometry, atomic writes, and the preprocessing primitives against references."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from tolerance import assert_yardstick

from s3d._fs import atomic_path
from s3d.data.io import case_id, read_header, read_nifti, write_nifti
from s3d.data.preprocess import (
    anisotropic_axis,
    crop_to_nonzero,
    resample_image,
    resample_seg,
    shape_for_spacing,
    zscore,
)


def test_write_read_round_trip_keeps_geometry(tmp_path) -> None:
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    data = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    path = tmp_path / "case_0000.nii.gz"
    write_nifti(path, data, affine)
    back, header = read_nifti(path)
    np.testing.assert_array_equal(back, data)
    # NIfTI stores the affine in float32: one rounding, <= 2^-24 = 6e-8 relative
    np.testing.assert_allclose(header.affine, affine, rtol=5e-7)
    assert header.spacing_mm == pytest.approx((0.8, 0.9, 3.0))
    assert header.fov_mm == pytest.approx((4.8, 6.3, 15.0))
    h = read_header(path)
    assert h.shape == (6, 7, 5)
    # nibabel itself reads the same affine
    np.testing.assert_allclose(nib.load(str(path)).affine, affine, rtol=5e-7)  # as above
    assert case_id(path) == "case_0000"


def test_write_like_copies_header_fields(tmp_path) -> None:
    src = tmp_path / "in.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"scanner X"
    nib.save(img, str(src))
    out = tmp_path / "pred.nii.gz"
    write_nifti(out, np.ones((4, 4, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]), like=src)
    back = nib.load(str(out))
    assert back.header["descrip"].tobytes().startswith(b"scanner X")
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_corrupt_and_wrong_files_name_the_path(tmp_path) -> None:
    good = tmp_path / "good.nii.gz"
    write_nifti(good, np.ones((20, 20, 20), np.float32), np.eye(4))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="trunc.nii.gz"):
        read_nifti(truncated)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not a NIfTI"):
        read_nifti(other)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_nifti(tmp_path / "missing.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        read_header(garbage)


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "ckpt.safetensors"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_atomic_path_gives_new_files_the_usual_permissions(tmp_path) -> None:
    import os
    import stat

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        reference = tmp_path / "b.json"
        reference.write_text("{}")  # what open() gives
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o644
        os.chmod(tmp_path / "a.json", 0o600)
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("[]")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600  # an existing file keeps its mode
    finally:
        os.umask(umask)


@pytest.mark.numerical
def test_crop_to_nonzero_and_zscore() -> None:
    img = np.zeros((2, 10, 10, 10), np.float32)
    img[0, 2:5, 3:7, 4:9] = 1.0
    img[1, 6, 6, 6] = 2.0
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[3, 4, 5] = 1
    cropped, cseg, bbox = crop_to_nonzero(img, seg)
    assert bbox == (slice(2, 7), slice(3, 7), slice(4, 9))
    assert cropped.shape == (2, 5, 4, 5) and cseg.sum() == 1
    rng = np.random.default_rng(1)
    x = rng.normal(5, 3, size=(2, 8, 8, 8)).astype(np.float32)
    z = zscore(x)
    # the z-scored channels' mean and std (measured in float64) are off from 0 and 1 by float32 rounding:
    # yardstick, a plain float32 z-score of the same channels
    plain = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / x.std(axis=(1, 2, 3), keepdims=True)
    for stat, want in ((lambda v: v.astype(np.float64).mean(axis=(1, 2, 3)), 0.0),
                       (lambda v: v.astype(np.float64).std(axis=(1, 2, 3)), 1.0)):
        assert_yardstick(float(np.abs(stat(z) - want).max()), float(np.abs(stat(plain) - want).max()), "z-score")
    with pytest.raises(ValueError, match="channel 1 is constant"):
        zscore(np.stack([x[0], np.ones_like(x[0])]))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="channel 0 contains NaN"):
        zscore(bad)


def test_resampling_against_formulas() -> None:
    pytest.importorskip("scipy")
    assert shape_for_spacing((100, 100, 30), (1.0, 1.0, 5.0), (1.0, 1.0, 1.0)) == (100, 100, 150)
    assert anisotropic_axis((0.5, 0.5, 4.0)) == 2 and anisotropic_axis((1, 1, 2.5)) is None
    # linear resampling of a linear ramp stays a linear ramp in the interior (grid_mode: voxel centres)
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 4, 4))[None].copy()
    up = resample_image(ramp, (32, 4, 4), order=1)[0, :, 0, 0]
    centres = (np.arange(32) + 0.5) / 2 - 0.5  # output voxel centres in input voxel coordinates
    # float32 linear interpolation of values <= 15 with slope 1: a few roundings of the source coordinate
    # and of the 2-tap sum, <= 8 u x 16 = 7.6e-6
    np.testing.assert_allclose(up[2:-2], centres[2:-2], atol=1e-5)
    # labels resample like nnU-Net's resize_segmentation: per-label linear interpolation, >= 0.5 wins.
    # Slabs whose borders fall on voxel edges scale exactly (a border voxel's weight is 0.25 or 0.75).
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2:6] = 1
    seg[:, 1:3] = 2
    up_seg = resample_seg(seg, (16, 16, 16))
    expected = np.zeros((16, 16, 16), np.uint8)
    expected[4:12] = 1
    expected[:, 2:6] = 2
    np.testing.assert_array_equal(up_seg, expected)
    # anisotropic: nearest along the thick axis keeps slices intact
    vol = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
    out = resample_image(vol, (8, 8, 8), order=3, separate_axis=2)
    np.testing.assert_allclose(out[0, :, :, 0], out[0, :, :, 1])
