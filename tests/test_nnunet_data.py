"""nnU-Net raw datasets: validation (all problems at once), spec round trip, preprocessing, inverse, cache."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tolerance import assert_yardstick

pytest.importorskip("scipy")

from s3d.data.io import write_nifti  # noqa: E402
from s3d.data.nnunet import (  # noqa: E402
    DatasetError,
    PreprocessingSpec,
    cache_dir_for,
    cached_cases,
    load_cached_case,
    preprocess_case,
    preprocess_dataset,
    preprocess_training_case,
    read_dataset_json,
    restore_geometry,
    validate_dataset,
)


def make_sphere_dataset(root: Path, n: int = 4, size: int = 32, channels: int = 2, seed: int = 0,
                        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """A tiny nnU-Net v2 raw dataset: a bright sphere (label 1) in noise, ``channels`` channels."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    for i in range(n):
        c = rng.uniform(10, size - 10, 3)
        r = rng.uniform(4, 7)
        sphere = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
        for ch in range(channels):
            img = rng.normal(0, 1, (size,) * 3).astype(np.float32) + 3.0 * sphere * (1 + ch)
            write_nifti(root / "imagesTr" / f"case{i:03d}_{ch:04d}.nii.gz", img, affine)
        write_nifti(root / "labelsTr" / f"case{i:03d}.nii.gz", sphere.astype(np.uint8), affine)
    meta = {"channel_names": {str(c): f"mod{c}" for c in range(channels)},
            "labels": {"background": 0, "sphere": 1}, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_read_dataset_json(tmp_path) -> None:
    ds = read_dataset_json(make_sphere_dataset(tmp_path / "ds", n=2))
    assert ds.channel_names == ("mod0", "mod1")
    assert ds.labels == {"background": 0, "sphere": 1}
    assert ds.cases == ["case000", "case001"]
    assert ds.num_classes == 2
    assert ds.image_paths("case001")[1].name == "case001_0001.nii.gz"


def test_validation_reports_every_problem_with_file_names(tmp_path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=6)
    img = root / "imagesTr"
    # 1: a missing channel file
    (img / "case000_0001.nii.gz").unlink()
    # 2: a label value not in dataset.json
    seg = np.zeros((32, 32, 32), np.uint8)
    seg[5, 5, 5] = 3
    write_nifti(root / "labelsTr" / "case001.nii.gz", seg, np.eye(4))
    # 3: image/label shape mismatch
    write_nifti(img / "case002_0000.nii.gz", np.ones((30, 32, 32), np.float32), np.eye(4))
    # 4: affine mismatch
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    write_nifti(img / "case003_0001.nii.gz", np.ones((32, 32, 32), np.float32), shifted)
    # 5: NaNs
    bad = np.ones((32, 32, 32), np.float32)
    bad[0, 0, :3] = np.nan
    write_nifti(img / "case004_0000.nii.gz", bad, np.eye(4))
    # 6: an image without label
    write_nifti(img / "orphan_0000.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(DatasetError) as info:
        validate_dataset(root)
    problems = info.value.problems
    text = str(info.value)
    expected = {
        "case000_0001.nii.gz": "missing",
        "case001.nii.gz": "[3]",
        "case002_0000.nii.gz": "shape",
        "case003_0001.nii.gz": "affine",
        "case004_0000.nii.gz": "3 NaN",
        "orphan_0000.nii.gz": "without label",
    }
    for name, word in expected.items():
        hits = [p for p in problems if name in p]
        assert hits and any(word in h for h in hits), (name, problems)
        assert name in text
    assert len(problems) == len(expected)


def test_dataset_json_problems_are_listed(tmp_path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    meta = {"labels": {"background": 0, "x": "one"}, "file_ending": ".mha"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as info:
        read_dataset_json(root)
    text = str(info.value)
    for word in ("channel_names", "numTraining", "'x'", ".mha"):
        assert word in text


def test_spec_json_round_trip(tmp_path) -> None:
    spec = PreprocessingSpec(target_spacing_mm=(1.5, 1.0, 1.0), channel_names=("T1", "T2"),
                             labels={"background": 0, "a": 1, "b": 2}, patch_size=(64, 64, 32))
    assert PreprocessingSpec.from_json(spec.to_json()) == spec
    spec.save(tmp_path / "preprocessing.json")
    assert PreprocessingSpec.load(tmp_path / "preprocessing.json") == spec
    assert spec.num_classes == 3
    # the cache key ignores the patch size but not the spacing
    assert spec.cache_key() == PreprocessingSpec(**{**spec.__dict__, "patch_size": None}).cache_key()
    iso = PreprocessingSpec(**{**spec.__dict__, "target_spacing_mm": (1, 1, 1)})
    assert spec.cache_key() != iso.cache_key()
    with pytest.raises(ValueError, match="unknown PreprocessingSpec keys"):
        PreprocessingSpec.from_dict({**spec.to_dict(), "spacing": 1})


@pytest.mark.numerical
def test_preprocess_and_restore_geometry(tmp_path) -> None:
    rng = np.random.default_rng(1)
    shape, spacing = (24, 40, 36), (2.0, 1.0, 0.8)
    affine = np.diag([*spacing, 1.0])
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    box = (slice(3, 21), slice(5, 35), slice(4, 30))   # nonzero region, smooth so resampling keeps stats
    smooth = 5 + 2 * np.sin(zz / 3.0) + np.cos(yy / 4.0) + 0.1 * xx
    img[box] = smooth[box] + rng.normal(0, 0.01, (18, 30, 26))
    seg = np.zeros(shape, np.int16)
    seg[((zz - 12) * 2.0) ** 2 + (yy - 20) ** 2 + ((xx - 17) * 0.8) ** 2 <= 8.0**2] = 1
    write_nifti(tmp_path / "c_0000.nii.gz", img, affine)
    write_nifti(tmp_path / "c.nii.gz", seg, affine)
    spec = PreprocessingSpec(channel_names=("CT",), labels={"background": 0, "ball": 1})
    x, props = preprocess_case([tmp_path / "c_0000.nii.gz"], spec)
    # crop = the nonzero box; resampled shape = cropped extent in mm at 1 mm
    assert props["bbox"] == [[3, 21], [5, 35], [4, 30]]
    assert props["original_shape"] == list(shape)
    assert x.shape == (1, 36, 30, round(26 * 0.8))
    assert x.dtype == np.float32
    # z-scored, then cubic resampling moves the statistics (by ~1e-4 here: interpolation, not rounding)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    # without resampling the result is exactly the z-scored crop (numpy reference)
    write_nifti(tmp_path / "iso_0000.nii.gz", img, np.eye(4))
    xi, _ = preprocess_case([tmp_path / "iso_0000.nii.gz"], spec)
    crop = img[box].astype(np.float64)
    ref, c32 = (crop - crop.mean()) / crop.std(), crop.astype(np.float32)
    # against this float64 reference; yardstick: a plain float32 z-score
    assert_yardstick(float(np.abs(xi[0] - ref).max()), float(np.abs((c32 - c32.mean()) / c32.std() - ref).max()),
                     "z-score")
    x2, s2, props2 = preprocess_training_case([tmp_path / "c_0000.nii.gz"], tmp_path / "c.nii.gz", spec)
    np.testing.assert_array_equal(x, x2)
    assert s2.shape == x.shape[1:]
    # labels back to the original grid: same shape, background outside the crop, sphere recovered
    back = restore_geometry(s2, props2)
    assert back.shape == shape
    inter = int(((back == 1) & (seg == 1)).sum())
    assert 2 * inter / (int((back == 1).sum()) + int((seg == 1).sum())) > 0.9
    # probabilities: one-hot in, (K, D, H, W) out, class 0 = 1 outside the crop, argmax = labels
    probs = np.stack([s2 == 0, s2 == 1]).astype(np.float32)
    pb = restore_geometry(probs, props2)
    assert pb.shape == (2, *shape)
    assert (pb[0, :3] == 1).all() and (pb[1, :3] == 0).all()
    agree = (pb.argmax(0) == seg).mean()
    assert agree > 0.98
    with pytest.raises(ValueError, match="expected shape"):
        restore_geometry(s2[:-1], props2)


def test_cache_is_reused_and_atomic(tmp_path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=2)
    ds = validate_dataset(root)
    spec = PreprocessingSpec.from_dataset(ds)
    cache = preprocess_dataset(ds, spec, progress=False)
    assert cache == cache_dir_for(root, spec)
    files = sorted(cache.iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    assert not [p for p in files if p.name.startswith(".")]      # no temp files left behind
    again = preprocess_dataset(ds, spec, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps
    data, seg, props, locs = load_cached_case(cache, "case000")
    ref, ref_seg, _ = preprocess_training_case(ds.image_paths("case000"), ds.label_path("case000"), spec)
    np.testing.assert_array_equal(data, ref)
    np.testing.assert_array_equal(seg, ref_seg)
    assert (seg[locs[:, 1], locs[:, 2], locs[:, 3]] == locs[:, 0]).all()
    assert len(locs) == int((ref_seg == 1).sum())
    assert cached_cases(ds, spec) == ["case000", "case001"]
    # a changed source file invalidates that case only
    lab = ds.label_path("case001")
    seg1 = np.asarray(nib.load(str(lab)).dataobj)
    seg1[:2] = 0
    write_nifti(lab, seg1, nib.load(str(lab)).affine)
    assert cached_cases(ds, spec) == ["case000"]
    preprocess_dataset(ds, spec, progress=False)
    assert (cache / "case000.json").stat().st_mtime_ns == stamps["case000.json"]
    assert (cache / "case001.json").stat().st_mtime_ns != stamps["case001.json"]
