"""Scan, filters, manifest, resumable preprocessing and chunked storage (s3d.data.scan / store)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tolerance import assert_yardstick

from s3d.data.scan import ScanFilters, check_header, prepare, read_manifest, scan, training_cases
from s3d.data.store import open_volume, random_crop_start, read_crop, save_volume

SMALL = ScanFilters(min_file_bytes=0, min_fov_mm=30.0)  # tiny test images


def _nii(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_zooms(tuple(spacing) + tuple(1.0 for _ in data.shape[3:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _head(shape, rng: np.random.Generator, border: int = 3) -> np.ndarray:
    """Random positive 'anatomy' surrounded by a zero border (so crop_to_nonzero has work to do)."""
    data = np.zeros(shape, np.float32)
    inner = tuple(slice(border, n - border) for n in shape)
    data[inner] = rng.gamma(2.0, 50.0, size=[n - 2 * border for n in shape]).astype(np.float32)
    return data


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    _nii(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", _head((40, 44, 36), rng))
    _nii(root / "sub-02" / "anat" / "sub-02_T2w.nii.gz", _head((40, 40, 20), rng), spacing=(1.0, 1.0, 2.5))
    _nii(root / "sub-03" / "anat" / "sub-03_FLAIR.nii", _head((36, 36, 36), rng), spacing=(1.5, 1.5, 1.5))
    _nii(root / "bad" / "tinyfov_T1w.nii.gz", _head((64, 64, 10), rng))
    _nii(root / "bad" / "thick_T1w.nii.gz", _head((64, 64, 10), rng), spacing=(1.0, 1.0, 8.0))
    _nii(root / "bad" / "fourd_T1w.nii.gz", rng.random((60, 60, 60, 3)).astype(np.float32))
    _nii(root / "bad" / "nan_T1w.nii.gz", np.full((60, 60, 60), np.nan, np.float32))
    _nii(root / "bad" / "const_T1w.nii.gz", np.full((60, 60, 60), 7.0, np.float32))
    _nii(root / "bad" / "sub-09_bold.nii.gz", _head((60, 60, 60), rng))
    good = _nii(root / "bad" / "trunc_T1w.nii.gz", _head((60, 60, 60), rng))
    raw = gzip.decompress(good.read_bytes())
    good.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])  # truncated gzip stream
    (root / "bad" / "notes_T1w.txt").write_text("not an image")
    (root / "bad" / "brain_T1w.mha").write_bytes(b"\x00" * 100)
    return root


EXPECTED_REASONS = {  # case id: (status, rule, reason)
    "bad__tinyfov_T1w": ("rejected", "fov", "field of view 10.0 mm < 30.0 mm on axis 2"),
    "bad__thick_T1w": ("rejected", "spacing", "spacing 8 mm > 6.5 mm on axis 2"),
    "bad__fourd_T1w": ("rejected", "4d", "4D image with 3 volumes"),
    "bad__nan_T1w": ("rejected", "nonfinite", "NaN or inf"),
    "bad__const_T1w": ("rejected", "constant", "constant"),
    "bad__sub-09_bold": ("rejected", "modality", "modality 'bold' not in the allow-list"),
    "bad__trunc_T1w": ("failed", "unreadable", "cannot read voxel data"),
    "bad__notes_T1w.txt": ("rejected", "format", "not a NIfTI file"),
    "bad__brain_T1w.mha": ("rejected", "format", "not a NIfTI file"),
}


def test_prepare_manifest_reasons_and_resume(raw_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    m = prepare(raw_folder, out, SMALL, workers=0, progress=False)
    by_id = {e["case_id"]: e for e in m["entries"]}
    assert len(by_id) == 3 + len(EXPECTED_REASONS)
    for cid, (status, rule, reason) in EXPECTED_REASONS.items():
        assert by_id[cid]["status"] == status, (cid, by_id[cid])
        assert by_id[cid]["rule"] == rule, (cid, by_id[cid])
        assert reason in by_id[cid]["reason"], (cid, by_id[cid]["reason"])
    assert {by_id[c]["dataset"] for c in EXPECTED_REASONS} == {"bad"}  # the top-level folder
    assert by_id["sub-01__anat__sub-01_T1w"]["dataset"] == "sub-01"
    assert all(e["rule"] == "" for e in m["entries"] if e["status"] == "ok")
    ok = {e["case_id"] for e in m["entries"] if e["status"] == "ok"}
    assert ok == {"sub-01__anat__sub-01_T1w", "sub-02__anat__sub-02_T2w", "sub-03__anat__sub-03_FLAIR"}
    assert m["counts"] == {"ok": 3, "rejected": 8, "failed": 1, "processed": 3, "skipped": 0}
    # the manifest on disk is the returned one; subjects come from the BIDS path
    assert read_manifest(out) == json.loads(json.dumps(m))
    assert sorted(c["subject"] for c in training_cases(m, out)) == ["sub-01", "sub-02", "sub-03"]
    # shapes: 1 mm isotropic after cropping the 3-voxel zero border
    assert by_id["sub-01__anat__sub-01_T1w"]["preprocessed_shape"] == [34, 38, 30]
    assert by_id["sub-02__anat__sub-02_T2w"]["preprocessed_shape"] == [34, 34, 35]  # 14 slices x 2.5 mm
    assert by_id["sub-03__anat__sub-03_FLAIR"]["preprocessed_shape"] == [45, 45, 45]  # 30 x 1.5 mm
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cases").iterdir()}
    m2 = prepare(raw_folder, out, SMALL, workers=0, progress=False)
    assert m2["counts"]["processed"] == 0 and m2["counts"]["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").iterdir()} == mtimes


@pytest.mark.numerical
@pytest.mark.parametrize("store", ["b2nd", "npy"])
def test_preprocessed_values_match_numpy_reference(raw_folder: Path, tmp_path: Path, store: str) -> None:
    out = tmp_path / "prep"
    prepare(raw_folder, out, SMALL, workers=0, progress=False, store=store)
    data = np.asarray(nib.load(str(raw_folder / "sub-01/anat/sub-01_T1w.nii.gz")).dataobj, np.float64)
    crop = data[3:-3, 3:-3, 3:-3]  # the nonzero box (1 mm already: no resampling)
    ref = (crop - crop.mean()) / crop.std()
    vol = open_volume(out / "cases" / f"sub-01__anat__sub-01_T1w.{store}")
    assert isinstance(vol, np.memmap) == (store == "npy")
    # float32 z-score vs the float64 formula; yardstick: a plain float32 z-score
    c32 = crop.astype(np.float32)
    assert_yardstick(float(np.abs(vol[0] - ref).max()), float(np.abs((c32 - c32.mean()) / c32.std() - ref).max()),
                     "z-score")


def test_split_4d_and_size_filter(raw_folder: Path) -> None:
    entries = scan(raw_folder, ScanFilters(min_file_bytes=0, min_fov_mm=30.0, split_4d=True))
    ids = [e.case_id for e in entries if e.case_id.startswith("bad__fourd")]
    assert ids == ["bad__fourd_T1w_t000", "bad__fourd_T1w_t001", "bad__fourd_T1w_t002"]
    assert all(e.status == "ok" for e in entries if e.case_id in ids)
    big = scan(raw_folder, ScanFilters(min_file_bytes=10**9))
    nifti = [e for e in big if e.path.endswith((".nii", ".nii.gz"))]
    assert nifti and all(e.status == "rejected" and "file size" in e.reason for e in nifti)


def test_csv_source_with_modality_column(raw_folder: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "list.csv"
    p1 = raw_folder / "sub-01/anat/sub-01_T1w.nii.gz"
    p2 = raw_folder / "bad/sub-09_bold.nii.gz"
    csv_path.write_text(f"path,modality,subject\n{p1},dwi,A\n{p2},T1w,B\n")
    entries = {e.subject: e for e in scan(csv_path, SMALL)}
    assert entries["A"].status == "rejected" and "dwi" in entries["A"].reason
    assert entries["B"].status == "ok"


def test_list_file_paths_are_relative_to_the_list_folder(raw_folder: Path, tmp_path: Path, monkeypatch) -> None:
    from s3d.data.scan import list_source

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "raw").symlink_to(raw_folder)
    listing = lists / "files.txt"
    listing.write_text("# relative to this file's folder\nraw/sub-01/anat/sub-01_T1w.nii.gz\n"
                       f"../lists/raw/sub-02/anat/sub-02_T2w.nii.gz\n{raw_folder / 'bad/thick_T1w.nii.gz'}\n"
                       "raw/sub-09/missing_T1w.nii.gz\n")
    monkeypatch.chdir(raw_folder / "bad")  # the working directory plays no part
    rows = list_source(listing)
    assert [r["path"] for r in rows] == [str(lists / "raw/sub-01/anat/sub-01_T1w.nii.gz"),
                                         str(lists / "raw/sub-02/anat/sub-02_T2w.nii.gz"),
                                         str(raw_folder / "bad/thick_T1w.nii.gz"),
                                         str(lists / "raw/sub-09/missing_T1w.nii.gz")]
    assert [r["dataset"] for r in rows] == ["raw", "raw", ".", "raw"]
    entries = scan(listing, SMALL)
    assert entries[0].case_id == "raw__sub-01__anat__sub-01_T1w" and entries[0].status == "ok"
    assert entries[2].case_id.endswith("bad__thick_T1w") and entries[2].rule == "spacing"
    assert (entries[3].status, entries[3].rule) == ("failed", "missing")
    csv_path = lists / "files.csv"  # a CSV 'dataset' column wins
    csv_path.write_text("path,dataset\nraw/sub-01/anat/sub-01_T1w.nii.gz,OpenNeuro-1\n")
    assert list_source(csv_path)[0]["dataset"] == "OpenNeuro-1"
    listing.write_text("sub-01/anat/sub-01_T1w.nii.gz\n")  # relative to the CWD: not found from the list
    with pytest.raises(ValueError, match="none of its 1 path.*resolved against the list file's folder"):
        list_source(listing)


def test_check_header_paper_thresholds() -> None:
    f = ScanFilters()
    assert check_header((50, 100, 100), (1.0, 1.0, 1.0), f) == ""
    assert check_header((49, 100, 100), (1.0, 1.0, 1.0), f).startswith("field of view 49.0 mm")
    assert check_header((100, 100, 20), (1.0, 1.0, 6.5), f) == ""
    assert check_header((100, 100, 20), (1.0, 1.0, 6.6), f).startswith("spacing 6.6 mm")


def test_crop_equals_region_of_full_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    full = rng.standard_normal((2, 37, 41, 29)).astype(np.float32)
    path = save_volume(tmp_path / "v.npy", full)
    vol = open_volume(path)
    for _ in range(20):
        start = random_crop_start(vol.shape[1:], (16, 16, 16), rng)
        crop = read_crop(vol, start, (16, 16, 16))
        region = full[:, start[0]:start[0] + 16, start[1]:start[1] + 16, start[2]:start[2] + 16]
        assert np.array_equal(crop, region)
    # a crop larger than the volume is the volume, zero-padded around it at the random offset
    start = random_crop_start(vol.shape[1:], (48, 48, 48), rng)
    assert all(-(48 - n) <= s <= 0 for s, n in zip(start, vol.shape[1:], strict=True))
    big = read_crop(vol, start, (48, 48, 48))
    inner = tuple(slice(-s, -s + n) for s, n in zip(start, vol.shape[1:], strict=True))
    assert np.array_equal(big[(slice(None), *inner)], full)
    # the same values (plus zeros) summed in float64 in another order: ~n eps64 ~ 1e-11 relative
    assert big.sum(dtype=np.float64) == pytest.approx(full.sum(dtype=np.float64), rel=1e-6)
    assert np.count_nonzero(big) == np.count_nonzero(full)


def test_store_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected a \\(C, D, H, W\\)"):
        save_volume(tmp_path / "a.npy", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="stored as .b2nd or .npy"):
        save_volume(tmp_path / "a.npz", np.zeros((1, 4, 4, 4)))
    for name in ("broken.npy", "broken.b2nd"):
        (tmp_path / name).write_bytes(b"garbage")
        with pytest.raises(ValueError, match=name):
            open_volume(tmp_path / name)
