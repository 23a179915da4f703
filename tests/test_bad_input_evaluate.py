"""Bad-input corpus for ``s3d evaluate`` (project issue 14): the real command on small generated folders.

Every case builds three seeded 16^3 cases (references with labels 1 and 2, predictions that differ from them),
spoils one thing, runs ``python -m s3d evaluate`` and checks the outcome class, that the message names the file
or argument, and that no input file changed. Dice values of the cases that are evaluated are checked against
the numpy formula 2 |P & R| / (|P| + |R|) on the arrays the test wrote.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from badinput import assert_no_traceback, assert_user_error, case, run_s3d, snapshot

pytest.importorskip("scipy.ndimage")

LABELS = {"background": 0, "liver": 1, "tumour": 2}
SHAPE = (16, 16, 16)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def _ref(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, np.uint8)
    a, b = rng.integers(2, 5, size=2)
    ref[a:a + 9, b:b + 9, 3:13] = 1
    ref[a + 2:a + 6, b + 2:b + 6, 5:9] = 2
    return ref


def _pred(seed: int) -> np.ndarray:
    pred = _ref(seed).copy()
    pred[np.random.default_rng(100 + seed).random(SHAPE) > 0.85] = 0
    return pred


def _save(path, arr, affine=AFFINE):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


@pytest.fixture()
def data(tmp_path):
    """pred/, ref/ (case_000..case_002, uint8), dataset.json; out/ is where the command writes."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for i in range(3):
        _save(ref / f"case_{i:03d}.nii.gz", _ref(i))
        _save(pred / f"case_{i:03d}.nii.gz", _pred(i))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    return tmp_path


def _evaluate(d, *extra, pred="pred", labels="dataset.json"):
    return run_s3d("evaluate", "--pred", d / pred, "--ref", d / "ref", "--labels", d / labels, "--out", d / "out",
                   *extra, env={"TQDM_DISABLE": "1"})


def _inputs(d):
    return snapshot(*(p for p in (d / "pred", d / "ref", d / "dataset.json") if p.exists()))


def _dice_np(p, r):
    return 2.0 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))


def _check_dice(d, cases, preds=None):
    """per_case.csv holds exactly ``cases``, with the numpy Dice of the arrays the test wrote."""
    rows = list(csv.DictReader((d / "out" / "per_case.csv").open()))
    assert sorted({r["case"] for r in rows}) == sorted(cases)
    for r in rows:
        i = int(r["case"][-3:])
        pred = (preds or {}).get(i, _pred(i))
        value = LABELS[r["class"]]
        assert float(r["dice"]) == pytest.approx(_dice_np(pred == value, _ref(i) == value), abs=1e-12)


@case("evaluate", "float32 copy of the references (values 0.99999994, 1.0000001)", "handled")
def test_float_copy_of_references(data):
    # before: truncated to int, 0.99999994 became 0 and this scored Dice 0 with exit 0
    rng = np.random.default_rng(7)
    preds = {}
    for i in range(3):
        f = _ref(i).astype(np.float32)
        off = rng.random(SHAPE) < 0.5
        f[off] = np.nextafter(f[off], np.float32(-1 if i % 2 else 3))
        preds[i] = f
        _save(data / "pred" / f"case_{i:03d}.nii.gz", f)
    before = _inputs(data)
    res = _evaluate(data)
    assert res.rc == 0, res.text
    assert_no_traceback(res)
    summary = json.loads((data / "out" / "summary.json").read_text())
    assert summary["foreground_mean"]["dice"] == 1.0 and summary["errors"] == {}
    n = sum(int(np.count_nonzero(p != np.rint(p))) for p in preds.values())
    assert f"rounded {n} voxels" in res.out
    assert sum(v["prediction"] for v in summary["rounded"].values()) == n
    _check_dice(data, ["case_000", "case_001", "case_002"], {i: np.rint(p).astype(int) for i, p in preds.items()})
    assert _inputs(data) == before


@case("evaluate", "NaN voxel in one prediction", "skipped")
def test_nan_voxel(data):
    # before: NaN was cast to INT_MIN, no class, so a NaN background voxel scored Dice 1.0 with exit 0
    bad = data / "pred" / "case_001.nii.gz"
    f = _pred(1).astype(np.float32)
    f[0, 3, 5] = np.nan
    _save(bad, f)
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(bad), "NaN", "(0, 3, 5)"], rc=1)
    _check_dice(data, ["case_000", "case_002"])
    assert _inputs(data) == before


@case("evaluate", "Inf voxel in one reference", "skipped")
def test_inf_in_reference(data):
    bad = data / "ref" / "case_002.nii.gz"
    f = _ref(2).astype(np.float64)
    f[4, 4, 4] = -np.inf
    _save(bad, f)
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(bad), "Inf", "reference"], rc=1)
    _check_dice(data, ["case_000", "case_001"])
    assert _inputs(data) == before


@case("evaluate", "prediction resampled with linear interpolation (values 0.5, 0.25, ...)", "skipped")
def test_non_integer_values(data):
    bad = data / "pred" / "case_000.nii.gz"
    f = _pred(0).astype(np.float32)
    f = 0.5 * (f + np.roll(f, 1, axis=0))  # a linear blend: 0.5 and 1.5 at every boundary
    _save(bad, f)
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(bad), "not integer labels", "nearest-neighbour"], rc=1)
    _check_dice(data, ["case_001", "case_002"])
    assert _inputs(data) == before


@case("evaluate", "value just outside the rounding tolerance (1 + 1.5e-3)", "skipped")
def test_value_just_outside_tolerance(data):
    bad = data / "pred" / "case_002.nii.gz"
    f = _pred(2).astype(np.float64)
    f[f == 1] = 1.0015
    _save(bad, f)
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(bad), "1.0015", "0.001"], rc=1)
    _check_dice(data, ["case_000", "case_001"])
    assert _inputs(data) == before


@case("evaluate", "prediction with a label that dataset.json does not define", "skipped")
def test_undefined_label(data):
    bad = data / "pred" / "case_001.nii.gz"
    p = _pred(1)
    p[0:2, 0:2, 0:2] = 3
    _save(bad, p)
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(bad), "3 (8 voxels)", "dataset.json"], rc=1)
    _check_dice(data, ["case_000", "case_002"])
    assert _inputs(data) == before


@case("evaluate", "reference case without a prediction", "skipped")
def test_missing_prediction(data):
    (data / "pred" / "case_002.nii.gz").unlink()
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, ["case_002", "no prediction", str(data / "ref" / "case_002.nii.gz")], rc=1)
    _check_dice(data, ["case_000", "case_001"])
    assert _inputs(data) == before


@case("evaluate", "prediction without a reference", "skipped")
def test_extra_prediction(data):
    extra = data / "pred" / "case_007.nii.gz"
    _save(extra, _pred(0))
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(extra), "no reference"], rc=1)
    _check_dice(data, ["case_000", "case_001", "case_002"])
    assert "case_007" in json.loads((data / "out" / "summary.json").read_text())["errors"]
    assert _inputs(data) == before


@case("evaluate", "prediction on another grid (shape or affine differs)", "skipped")
def test_mismatched_geometry(data):
    shape_bad, affine_bad = data / "pred" / "case_000.nii.gz", data / "pred" / "case_001.nii.gz"
    _save(shape_bad, _pred(0)[:, :, :12])
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.75
    _save(affine_bad, _pred(1), shifted)
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(shape_bad), "(16, 16, 12)", str(affine_bad), "affine"], rc=1)
    _check_dice(data, ["case_002"])
    assert _inputs(data) == before


@case("evaluate", "prediction that is not a NIfTI / truncated .nii.gz", "skipped")
def test_not_nifti_and_truncated(data):
    garbage, truncated = data / "pred" / "case_000.nii.gz", data / "pred" / "case_001.nii.gz"
    garbage.write_bytes(np.random.default_rng(3).bytes(600))
    truncated.write_bytes(truncated.read_bytes()[:200])
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(garbage), str(truncated)], rc=1)
    _check_dice(data, ["case_002"])
    assert _inputs(data) == before


@case("evaluate", "empty prediction folder", "error")
def test_empty_prediction_folder(data):
    (data / "empty").mkdir()
    before = _inputs(data)
    res = _evaluate(data, pred="empty")
    assert_user_error(res, [str(data / "empty"), "no NIfTI"], rc=1)
    assert not (data / "out" / "summary.json").exists()
    assert _inputs(data) == before


@case("evaluate", "--labels file that is not a dataset.json", "error")
def test_labels_not_a_dataset_json(data):
    for name, content in (("plans.json", '{"configurations": {}}'), ("list.json", '{"labels": [0, 1, 2]}'),
                          ("image.nii.gz", None)):
        path = data / name
        if content is None:
            path.write_bytes((data / "ref" / "case_000.nii.gz").read_bytes())
        else:
            path.write_text(content)
        before = _inputs(data)
        res = _evaluate(data, labels=name)
        assert_user_error(res, ["--labels", str(path)], rc=1)
        assert _inputs(data) == before


@pytest.mark.parametrize("tau", ["0", "-1", "nan", "2mm"])
@case("evaluate", "--tau <= 0 (or not a number)", "error")
def test_bad_tau(data, tau):
    before = _inputs(data)
    res = _evaluate(data, "--tau", tau)
    assert_user_error(res, ["--tau", tau], rc=2)
    assert not (data / "out").exists()
    assert _inputs(data) == before


@case("evaluate", "--out cannot be written (a file where the folder should be)", "error")
def test_out_not_writable(data):
    (data / "blocker").write_text("a file, not a folder")
    before = _inputs(data)
    res = run_s3d("evaluate", "--pred", data / "pred", "--ref", data / "ref", "--labels", data / "dataset.json",
                  "--out", data / "blocker" / "eval", env={"TQDM_DISABLE": "1"})
    # refused before any case is evaluated, naming the file in the way and the option
    assert_user_error(res, [f"{data / 'blocker'}: --out folder is a file (in the way of {data / 'blocker' / 'eval'})"],
                      rc=1)
    assert "cases evaluated" not in res.out and (data / "blocker").read_text() == "a file, not a folder"
    assert _inputs(data) == before


@case("evaluate", "stale summary.json from an earlier run, this run fails", "error")
def test_stale_summary_removed(data):
    assert _evaluate(data).rc == 0
    assert (data / "out" / "summary.json").exists()
    for p in (data / "ref").iterdir():  # the references were moved away: this run fails before it writes
        p.unlink()
    before = _inputs(data)
    res = _evaluate(data)
    assert_user_error(res, [str(data / "ref"), "no NIfTI"], rc=1)
    assert not (data / "out" / "summary.json").exists() and not (data / "out" / "per_case.csv").exists()
    assert _inputs(data) == before


@case("evaluate", "dataset.json labels that break nnU-Net's rules (ignore equal to a class; 0/1/5)", "error")
def test_labels_break_nnunet_rules(data):
    for name, labels, needle in (("clash.json", {**LABELS, "ignore": 2}, "ignore label 2 is also a class (tumour)"),
                                 ("gap.json", {"background": 0, "liver": 1, "tumour": 5}, "relabel 5 -> 2")):
        (data / name).write_text(json.dumps({"labels": labels}))
        before = _inputs(data)
        res = _evaluate(data, labels=name)
        assert_user_error(res, ["--labels", str(data / name), needle, "nnU-Net"], rc=1)
        assert not (data / "out").exists() and _inputs(data) == before  # no class silently dropped


@case("evaluate", "--out = --ref, or inside it; --compare --out inside a compared folder", "error")
def test_out_overlaps_an_input(data):
    before = _inputs(data)
    for out, names in ((data / "ref", ["is the --ref folder"]), (data / "ref" / "eval", ["is inside the --ref"])):
        res = run_s3d("evaluate", "--pred", data / "pred", "--ref", data / "ref", "--labels", data / "dataset.json",
                      "--out", out)
        assert_user_error(res, [str(out), *names], rc=2)
    res = run_s3d("evaluate", "--compare", data / "pred", data / "ref", "--ref", data / "ref", "--labels",
                  data / "dataset.json", "--out", data / "pred" / "ranks")
    assert_user_error(res, [str(data / "pred" / "ranks"), "is inside the --compare folder"], rc=2)
    assert _inputs(data) == before and not (data / "ref" / "eval").exists()


@case("evaluate", "--compare with two folders of one name (a/pred, b/pred) given as absolute paths", "handled")
def test_compare_folders_of_one_name(data):
    import shutil

    for group in ("a", "b"):
        shutil.copytree(data / "pred", data / group / "pred")
    inputs = snapshot(data / "a", data / "b", data / "ref")
    args = ("evaluate", "--compare", (data / "a" / "pred").resolve(), (data / "b" / "pred").resolve(),
            "--ref", data / "ref", "--labels", data / "dataset.json", "--out", data / "out", "--bootstrap", "10")
    res = run_s3d(*args, env={"TQDM_DISABLE": "1"})
    assert res.rc == 0, res.text[-3000:]
    # each method's evaluation in its own sub-folder of --out, never in the compared (input) folders
    assert (data / "out" / "a-pred" / "summary.json").is_file() and (data / "out" / "b-pred" / "summary.json").is_file()
    assert snapshot(data / "a", data / "b", data / "ref") == inputs
    again = run_s3d(*args, env={"TQDM_DISABLE": "1"})  # an earlier result is replaced with a word
    assert again.rc == 0 and f"note: {data / 'out'}: replacing the earlier ranks.txt, ranks.json" in again.err
