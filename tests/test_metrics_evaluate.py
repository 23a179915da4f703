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

LABELS = {"background": 0, "left": 1, "right": 2, "both": [1, 2], "ignore": 9}
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
    ref[0:2, :, :] = 9  # ignore region
    pred = ref.copy()
    pred[pred == 9] = 0
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
    valid = ref != 9
    for name, values, tau in (("left", [1], 1.0), ("right", [2], 2.0), ("both", [1, 2], 3.0)):
        p, r = np.isin(pred, values) & valid, np.isin(ref, values) & valid
        assert res[name]["dice"] == dice(p, r)
        assert res[name]["nsd"] == nsd(p, r, SPACING, tau)
        assert res[name]["n_ref"] == r.sum()
    assert 0.5 < res["left"]["dice"] < 1.0
    assert set(res) == {"left", "right", "both"}


def test_load_labels_errors(tmp_path):
    assert load_labels(LABELS).ignore_label == 9
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
