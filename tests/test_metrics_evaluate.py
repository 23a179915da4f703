"""Folder evaluation and the ``s3d evaluate`` command on small NIfTI files."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from s3d.cli import main
from s3d.metrics import dice, evaluate_case, evaluate_folder, load_labels, nsd

pytest.importorskip("scipy.ndimage")

# nnU-Net: the ignore label is one above the last class
LABELS = {"background": 0, "left": 1, "right": 2, "both": [1, 2], "ignore": 3}
SPACING = (1.5, 1.0, 2.0)


def _affine(shift=0.0):
    a = np.diag([*SPACING, 1.0])
    a[:3, 3] = [10.0 + shift, -5.0, 3.0]
    return a


def _save(path, seg, affine):
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), str(path))


def _case(seed):
    rng = np.random.default_rng(seed)
    ref = np.zeros((20, 24, 16), np.uint8)
    ref[3:9, 4:12, 3:10] = 1
    ref[11:17, 10:20, 5:13] = 2
    ref[0:2, :, :] = 3  # ignore region
    pred = ref.copy()
    pred[pred == 3] = 0
    pred[rng.random(ref.shape) > 0.9] = 0
    pred[np.roll(ref == 2, int(rng.integers(1, 3)), axis=1)] = 2
    pred[0, 0, 0] = 1  # a false positive inside the ignore region must not count
    return pred, ref


@pytest.fixture()
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for i in range(4):
        pred, ref = _case(i)
        _save(ref_dir / f"case_{i:03d}.nii.gz", ref, _affine())
        _save(pred_dir / f"case_{i:03d}.nii.gz", pred, _affine(shift=2.0 if i == 2 else 0.0))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    return pred_dir, ref_dir, tmp_path / "dataset.json"


def test_evaluate_case_matches_binary_metrics():
    pred, ref = _case(0)
    res = evaluate_case(pred, ref, LABELS, SPACING, tau_mm={"left": 1.0, "right": 2.0, "both": 3.0})
    valid = ref != 3
    for name, values, tau in (("left", [1], 1.0), ("right", [2], 2.0), ("both", [1, 2], 3.0)):
        p, r = np.isin(pred, values) & valid, np.isin(ref, values) & valid
        assert res[name]["dice"] == dice(p, r)
        assert res[name]["nsd"] == nsd(p, r, SPACING, tau)
        assert res[name]["n_ref"] == r.sum()
    assert 0.5 < res["left"]["dice"] < 1.0
    assert set(res) == {"left", "right", "both"}


def test_load_labels_errors(tmp_path):
    assert load_labels(LABELS).ignore_label == 3
    (tmp_path / "d.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="no 'labels'"):
        load_labels(tmp_path / "d.json")
    with pytest.raises(ValueError, match="'a'"):
        load_labels({"background": 0, "a": "one"})


def test_evaluate_folder_reports_mismatched_affine_and_evaluates_the_rest(folders, tmp_path):
    pred_dir, ref_dir, labels = folders
    out = tmp_path / "eval"
    res = evaluate_folder(pred_dir, ref_dir, labels, tau_mm=2.0, out_dir=out, progress=False)
    assert list(res.errors) == ["case_002"] and "affine" in res.errors["case_002"]
    assert sorted(res.per_case) == ["case_000", "case_001", "case_003"]
    for case in res.per_case:  # same numbers as evaluating the arrays directly
        pred = np.asarray(nib.load(str(pred_dir / f"{case}.nii.gz")).dataobj)
        ref = np.asarray(nib.load(str(ref_dir / f"{case}.nii.gz")).dataobj)
        assert res.per_case[case] == evaluate_case(pred, ref, LABELS, SPACING, 2.0)
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 9 and {r["case"] for r in rows} == set(res.per_case)
    summary = json.loads((out / "summary.json").read_text())
    left = np.mean([res.per_case[c]["left"]["dice"] for c in res.per_case])
    assert summary["mean"]["left"]["dice"] == pytest.approx(left)
    fg = np.mean([summary["mean"][n]["nsd"] for n in ("left", "right", "both")])
    assert summary["foreground_mean"]["nsd"] == pytest.approx(fg)
    assert "case_002" in summary["errors"] and summary["n_cases"] == 3


def test_evaluate_folder_parallel_equals_serial(folders):
    pred_dir, ref_dir, labels = folders
    serial = evaluate_folder(pred_dir, ref_dir, labels, progress=False)
    parallel = evaluate_folder(pred_dir, ref_dir, labels, workers=2, progress=False)
    assert serial.per_case == parallel.per_case and serial.errors == parallel.errors


def test_missing_prediction_is_an_error(folders):
    pred_dir, ref_dir, labels = folders
    (pred_dir / "case_001.nii.gz").unlink()
    res = evaluate_folder(pred_dir, ref_dir, labels, progress=False)
    assert "no prediction" in res.errors["case_001"]


def test_cli_evaluate(folders, tmp_path, capsys):
    pred_dir, ref_dir, labels = folders
    rc = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(labels),
               "--tau", "2", "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 1  # one case failed
    assert "case_002" in captured.err and "affine" in captured.err
    assert "foreground mean" in captured.out and "3 cases evaluated, 1 failed" in captured.out
    assert (tmp_path / "o" / "summary.json").exists()


def test_cli_compare(folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pred_dir, ref_dir, labels = folders
    worse = tmp_path / "worse"
    worse.mkdir()
    for i in range(4):
        pred, _ = _case(i)
        pred[np.random.default_rng(i).random(pred.shape) > 0.5] = 0
        _save(worse / f"case_{i:03d}.nii.gz", pred, _affine())
    out = tmp_path / "cmp"
    rc = main(["evaluate", "--compare", str(pred_dir), str(worse), "--ref", str(ref_dir),
               "--labels", str(labels), "--out", str(out), "--bootstrap", "200"])
    assert rc == 1  # case_002 of pred/ failed; the others are ranked
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["cases"] == ["case_000", "case_001", "case_003"]
    assert ranks["rank"] == {"pred": 1.0, "worse": 2.0}
    assert ranks["bootstrap"]["rank1_frequency"]["pred"] >= 0.99
    from matplotlib.image import imread

    assert imread(out / "rank_stability.png").ndim == 3
    assert "average rank" in capsys.readouterr().out
    # a later run that fails (one folder is empty) leaves no ranks or summaries that look like its own
    for p in worse.iterdir():
        p.unlink()
    rc = main(["evaluate", "--compare", str(pred_dir), str(worse), "--ref", str(ref_dir),
               "--labels", str(labels), "--out", str(out), "--bootstrap", "200"])
    assert rc == 1 and f"prediction folder {worse} holds no NIfTI" in capsys.readouterr().err
    assert not any((out / n).exists() for n in ("ranks.json", "ranks.txt", "rank_stability.png"))
    assert not (out / "worse" / "summary.json").exists() and (out / "pred" / "summary.json").exists()


# --- label maps that are not clean integers (issue 14): never scored as garbage -----------------------------------


def _dice_np(p, r):
    """Independent reference: Dice = 2 |P & R| / (|P| + |R|) of two boolean masks."""
    return 2.0 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))


def _float_copy(ref, seed):
    """``ref`` as float32, about half of the voxels one fp32 ulp off their integer (0.99999994, 1.0000001)."""
    rng = np.random.default_rng(seed)
    f = ref.astype(np.float32)
    up, down = rng.random(ref.shape) < 0.25, rng.random(ref.shape) < 0.25
    f[up] = np.nextafter(f[up], np.float32(np.inf))
    f[down & ~up] = np.nextafter(f[down & ~up], np.float32(-np.inf))
    return f


def _float_folders(tmp_path, make_pred, dtype=np.float32):
    pred_dir, ref_dir = tmp_path / "fpred", tmp_path / "fref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    preds = {}
    for i in range(3):
        _, ref = _case(i)
        _save(ref_dir / f"case_{i:03d}.nii.gz", ref, _affine())
        preds[i] = make_pred(i, ref)
        nib.save(nib.Nifti1Image(preds[i].astype(dtype), _affine()), str(pred_dir / f"case_{i:03d}.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    return pred_dir, ref_dir, tmp_path / "dataset.json", preds


def test_float32_copy_of_the_references_scores_dice_1_and_reports_the_rounding(tmp_path, capsys):
    # before the fix: 0.99999994 was truncated to 0, so this scored Dice 0 for 'left' with exit code 0
    pred_dir, ref_dir, labels, preds = _float_folders(tmp_path, lambda i, ref: _float_copy(ref, 10 + i))
    out = tmp_path / "o"
    rc = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(labels), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    _, ref0 = _case(0)
    assert _dice_np(ref0 == 1, ref0 == 1) == 1.0  # the reference value: a float copy of the reference is the reference
    for name in ("left", "right", "both"):
        assert summary["mean"][name]["dice"] == 1.0 and summary["mean"][name]["nsd"] == 1.0
    expected = {f"case_{i:03d}": int(np.count_nonzero(p != np.rint(p))) for i, p in preds.items()}
    assert all(n > 1000 for n in expected.values())
    assert {c: v["prediction"] for c, v in summary["rounded"].items()} == expected
    total = sum(expected.values())
    assert f"rounded {total} voxels" in captured.out
    assert f"case_000: rounded {expected['case_000']} voxels" in captured.err


def test_nan_or_inf_voxel_is_an_error_naming_the_file(tmp_path, capsys):
    # before the fix: NaN became INT_MIN (no class), so a NaN background voxel scored Dice 1.0 with exit code 0
    def make(i, ref):
        f = ref.astype(np.float32)
        if i == 1:
            f[0, 0, 0] = np.nan
        if i == 2:
            f[5, 5, 5] = np.inf
        return f

    pred_dir, ref_dir, labels, _ = _float_folders(tmp_path, make)
    res = evaluate_folder(pred_dir, ref_dir, labels, progress=False)
    assert sorted(res.errors) == ["case_001", "case_002"]
    assert str(pred_dir / "case_001.nii.gz") in res.errors["case_001"] and "NaN" in res.errors["case_001"]
    assert "(0, 0, 0)" in res.errors["case_001"]
    assert str(pred_dir / "case_002.nii.gz") in res.errors["case_002"] and "Inf" in res.errors["case_002"]
    assert list(res.per_case) == ["case_000"] and res.per_case["case_000"]["left"]["dice"] == 1.0
    rc = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(labels)])
    assert rc == 1 and "case_001.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize(("offset", "ok"), [(0.9e-3, True), (-0.9e-3, True), (1.1e-3, False), (-1.1e-3, False),
                                             (0.5, False), (0.3, False)])
def test_rounding_tolerance_both_sides(tmp_path, offset, ok):
    # float64 files so that the stored offset is the one written (fp32 would move 1 + 0.9e-3 by ~6e-8 only)
    def make(i, ref):
        f = ref.astype(np.float64)
        f[ref == 1] = 1.0 + offset if i == 0 else 1.0
        return f

    pred_dir, ref_dir, labels, preds = _float_folders(tmp_path, make, dtype=np.float64)
    res = evaluate_folder(pred_dir, ref_dir, labels, progress=False)
    _, ref = _case(0)
    if ok:
        assert not res.errors
        assert res.rounded["case_000"]["prediction"] == np.count_nonzero(ref == 1)
        assert "case_001" not in res.rounded  # exact integers are not "rounded"
        valid = ref != 3
        assert res.per_case["case_000"]["left"]["dice"] == _dice_np((ref == 1) & valid, (ref == 1) & valid)
    else:
        msg = res.errors["case_000"]
        assert str(pred_dir / "case_000.nii.gz") in msg and "not integer" in msg and "nearest-neighbour" in msg
        assert f"{1.0 + offset:.6g}" in msg
        assert sorted(res.per_case) == ["case_001", "case_002"]


def test_labels_missing_from_dataset_json_are_an_error(folders):
    pred_dir, ref_dir, labels = folders
    pred = np.asarray(nib.load(str(pred_dir / "case_001.nii.gz")).dataobj).copy()
    pred[1:3, 1:3, 1:3] = 5
    _save(pred_dir / "case_001.nii.gz", pred, _affine())
    ref = np.asarray(nib.load(str(ref_dir / "case_003.nii.gz")).dataobj).copy()
    ref[4, 4, 4] = 7
    _save(ref_dir / "case_003.nii.gz", ref, _affine())
    res = evaluate_folder(pred_dir, ref_dir, labels, progress=False)
    assert str(pred_dir / "case_001.nii.gz") in res.errors["case_001"]
    assert "5 (8 voxels)" in res.errors["case_001"] and "dataset.json" in res.errors["case_001"]
    assert str(ref_dir / "case_003.nii.gz") in res.errors["case_003"] and "7 (1 voxel)" in res.errors["case_003"]
    assert sorted(res.per_case) == ["case_000"]  # case_002 has the shifted affine


def test_evaluate_case_rejects_non_integer_arrays():
    pred, ref = _case(0)
    with pytest.raises(ValueError, match="prediction.*NaN"):
        evaluate_case(np.where(pred == 1, np.nan, pred), ref, LABELS, SPACING)
    with pytest.raises(ValueError, match="reference.*not integer"):
        evaluate_case(pred, ref + 0.25, LABELS, SPACING)
    exact = evaluate_case(pred, ref, LABELS, SPACING)
    assert evaluate_case(_float_copy(pred, 3), ref, LABELS, SPACING) == exact


def test_extra_prediction_is_reported_by_name(folders):
    pred_dir, ref_dir, labels = folders
    _save(pred_dir / "case_999.nii.gz", _case(0)[0], _affine())
    (pred_dir / "notes.txt").write_text("not an image")
    res = evaluate_folder(pred_dir, ref_dir, labels, progress=False)
    assert "case_999" in res.errors and str(pred_dir / "case_999.nii.gz") in res.errors["case_999"]
    assert "no reference" in res.errors["case_999"]
    assert res.summary["ignored_files"] == ["notes.txt"]


def test_empty_or_unmatched_prediction_folder_is_one_error(folders, tmp_path):
    pred_dir, ref_dir, labels = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}.*no NIfTI"):
        evaluate_folder(empty, ref_dir, labels, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    _save(other / "case_000_0000.nii.gz", _case(0)[0], _affine())
    with pytest.raises(ValueError, match="case_000_0000.nii.gz.*case_000.nii.gz"):
        evaluate_folder(other, ref_dir, labels, progress=False)


def test_nsd_rejects_nan_tau():
    m = np.zeros((8, 8, 8), bool)
    m[2:6, 2:6, 2:6] = True
    with pytest.raises(ValueError, match="tau_mm"):
        nsd(m, m, (1.0, 1.0, 1.0), float("nan"))  # before: every distance <= NaN is False, NSD 0.0


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_tau_must_be_positive(folders, tau):
    pred_dir, ref_dir, labels = folders
    with pytest.raises(ValueError, match="tau_mm"):
        evaluate_folder(pred_dir, ref_dir, labels, tau_mm=tau, progress=False)
    with pytest.raises(ValueError, match="'left'"):
        evaluate_folder(pred_dir, ref_dir, labels, tau_mm={"left": tau, "right": 1.0, "both": 1.0}, progress=False)


def test_labels_file_that_is_not_a_dataset_json(tmp_path):
    for name, content in (("a.json", b"[1, 2]"), ("b.json", b'{"labels": [0, 1]}'), ("c.nii.gz", b"\x1f\x8b\xff\xfe"),
                          ("d.json", b'{"labels": {"background": 0}}')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=str(tmp_path / name)):
            load_labels(tmp_path / name)


def test_write_failure_still_prints_the_table_and_names_the_path(folders, tmp_path, capsys, monkeypatch):
    import errno

    import s3d._fs

    pred_dir, ref_dir, labels = folders
    out = tmp_path / "o"
    real = s3d._fs.write_text_atomic

    def full_disk(path, text):
        if str(path).endswith("summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(s3d._fs, "write_text_atomic", full_disk)
    rc = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(labels), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "foreground mean" in captured.out and "3 cases evaluated, 1 failed" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert str(out / "summary.json") in last and "No space left" in last and last.startswith("s3d evaluate: error:")
    assert not (out / "summary.json").exists()


def test_stale_summary_never_looks_current(folders, tmp_path, capsys):
    pred_dir, ref_dir, labels = folders
    out = tmp_path / "o"
    args = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)]
    assert main([*args, "--labels", str(labels)]) == 1  # case_002's affine
    assert (out / "summary.json").exists() and (out / "per_case.csv").exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert main([*args, "--labels", str(tmp_path / "bad.json")]) == 1
    assert not (out / "summary.json").exists() and not (out / "per_case.csv").exists()
    assert str(tmp_path / "bad.json") in capsys.readouterr().err
