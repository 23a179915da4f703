"""Bad-input corpus for ``s3d predict``: every case runs the real command on generated input.

Each case asserts the outcome class (``error`` / ``skipped`` / ``handled``, see ``tests/badinput.py``),
that the file or argument at fault is named, and that no good input or output changed (every run
checks that its input and model folders are byte-for-byte as before). One tiny
2-channel model and one good 2-case run are shared by the module; volumes are 24^3 (one 32^3 tile)
and mirroring is off, so each case is one short subprocess.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from badinput import assert_no_traceback, assert_user_error, case, run_s3d, run_s3d_here, snapshot
from test_bad_input_finetune import modes_bind  # noqa: F401 - the fixture, shared

import s3d
from s3d.data.nnunet import PreprocessingSpec
from s3d.hub import save_pretrained

pytest.importorskip("scipy")

SHAPE = (24, 24, 24)
GOOD = ("g1", "g2")


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) + 3.0


def _write_case(folder: Path, name: str, seed: int, shape: tuple[int, ...] = SHAPE) -> list[Path]:
    return [_write(folder / f"{name}_{c:04d}.nii.gz", _volume(seed * 10 + c, shape)) for c in range(2)]


def _patch_header(path: Path, **fields: object) -> None:
    """Rewrite header fields of a .nii.gz in place, bypassing nibabel's checks (as a broken writer would)."""
    raw = gzip.decompress(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    for k, v in fields.items():
        hdr[k] = v
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=2, num_classes=3), d)
    PreprocessingSpec(channel_names=("t1", "t2"), labels={"background": 0, "a": 1, "b": 2},
                      patch_size=(32, 32, 32)).save(d / "preprocessing.json")
    return d


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, Path]:
    """Two good cases and their predictions (an earlier, successful run)."""
    root = tmp_path_factory.mktemp("good")
    (root / "in").mkdir()
    for i, name in enumerate(GOOD):
        _write_case(root / "in", name, i)
    res = _predict(root / "in", root / "out", model_dir)
    assert res.rc == 0, res.text
    return root / "in", root / "out"


def _predict(inp: Path, out: Path, model: Path, *extra: str):
    """Run ``s3d predict``; whatever the outcome, the input and model folders are left as they were."""
    untouched = [p for p in (inp, model) if Path(p).exists()]
    before = snapshot(*untouched)
    res = run_s3d("predict", "-i", inp, "-o", out, "-m", model, "--device", "cpu", "--no-progress",
                  "--no-mirror", *extra)
    assert snapshot(*untouched) == before, f"predict changed files under {untouched}\n{res.text[-3000:]}"
    return res


def _inputs(tmp_path: Path, good_run: tuple[Path, Path]) -> Path:
    inp = tmp_path / "in"
    shutil.copytree(good_run[0], inp)
    return inp


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _assert_good_outputs(out: Path, good_run: tuple[Path, Path], names=GOOD) -> None:
    """The good cases were predicted, as the earlier good run predicted them."""
    for name in names:
        np.testing.assert_array_equal(_labels(out / f"{name}.nii.gz"), _labels(good_run[1] / f"{name}.nii.gz"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def _assert_skipped(res, out: Path, case_name: str | None, file: Path, reason: str) -> dict:
    """A ``skipped`` outcome: exit 1, no traceback, the file named on stderr and in OUT/failures.json."""
    assert res.rc == 1, res.text[-3000:]
    assert_no_traceback(res)
    assert str(file) in res.err and reason in res.err, res.err[-3000:]
    report = json.loads((out / "failures.json").read_text())
    entries = [f for f in report["failures"] if f["file"] == str(file)]
    assert len(entries) == 1, report
    assert entries[0]["case"] == case_name and reason in entries[0]["reason"], entries[0]
    assert not (out / f"{case_name}.nii.gz").exists()
    return report


# ---- the acceptance case -------------------------------------------------------------------
@case("predict", "truncated .nii.gz in a 5-case batch", "skipped")
def test_truncated_case_in_five_case_batch(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    for i, name in enumerate(("c3", "c4", "c5"), start=3):
        _write_case(inp, name, i)
    bad = inp / "c4_0001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:1500])
    before = snapshot(inp)
    res = _predict(inp, tmp_path / "out", model_dir)
    report = _assert_skipped(res, tmp_path / "out", "c4", bad, "cannot read voxel data")
    assert report["cases"] == 5 and report["predicted"] == 4 and report["failed"] == 1
    assert "predicted 4 of 5" in res.err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [
        "c3.nii.gz", "c5.nii.gz", "g1.nii.gz", "g2.nii.gz"]
    _assert_good_outputs(tmp_path / "out", good_run)
    assert snapshot(inp) == before


# ---- files a case cannot use: skipped, the batch goes on ------------------------------------------
@case("predict", "a .nii.gz that is not NIfTI (text)", "skipped")
def test_not_nifti(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    (inp / "bad_0000.nii.gz").write_text("not an image\n" * 50)
    before = snapshot(inp)
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0000.nii.gz", "cannot read as NIfTI")
    _assert_good_outputs(tmp_path / "out", good_run)
    assert snapshot(inp) == before


@case("predict", "4D channel file", "skipped")
def test_4d_file(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    _write(inp / "bad_0001.nii.gz", _volume(7, (*SHAPE, 2)))
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0001.nii.gz", "is a 4D image")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "2D image (one voxel thick)", "skipped")
def test_one_voxel_thick(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5, shape=(24, 24, 1))
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0000.nii.gz", "1 voxel thick along axis 2")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "NaN voxels", "skipped")
def test_nan_voxels(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    data = _volume(8)
    data[3, 4, 5] = np.nan
    _write(inp / "bad_0001.nii.gz", data)
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0001.nii.gz", "NaN or inf")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "Inf voxels", "skipped")
def test_inf_voxels(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    data = _volume(9)
    data[0, 0, 0] = -np.inf
    _write(inp / "bad_0000.nii.gz", data)
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0000.nii.gz", "NaN or inf")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "zero voxel spacing in the header (pixdim)", "skipped")
def test_zero_spacing(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    _patch_header(inp / "bad_0000.nii.gz", pixdim=[1, 1, 0, 1, 1, 1, 1, 1])  # nibabel would read it as 1 mm
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0000.nii.gz", "voxel spacing (header pixdim[1:4])")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "non-finite affine (NaN in sform)", "skipped")
def test_nan_affine(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    _patch_header(inp / "bad_0001.nii.gz", srow_y=[0, np.nan, 0, 0], qform_code=0, sform_code=1)
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0001.nii.gz", "holds NaN or inf")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "singular affine (a zero row in sform)", "skipped")
def test_singular_affine(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    _patch_header(inp / "bad_0000.nii.gz", srow_z=[0, 0, 0, 0], qform_code=0, sform_code=1)
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0000.nii.gz", "is singular")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "channel files of one case with different shapes", "skipped")
def test_channel_shapes_differ(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    _write(inp / "bad_0001.nii.gz", _volume(3, (24, 24, 20)))
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0001.nii.gz", "differs from bad_0000.nii.gz")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "a case missing a channel file", "skipped")
def test_missing_channel(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write(inp / "bad_0000.nii.gz", _volume(4))
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0001.nii.gz", "missing channel file")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "channel index beyond the model's channels (_0002 for 2 channels)", "skipped")
def test_channel_beyond_model(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "bad", 5)
    _write(inp / "bad_0002.nii.gz", _volume(6))
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "bad", inp / "bad_0002.nii.gz", "channel 2, but the model takes 2")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "NIfTI name without the _XXXX channel suffix", "skipped")
def test_name_without_channel(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write(inp / "scan.nii.gz", _volume(6))
    res = _predict(inp, tmp_path / "out", model_dir)
    report = _assert_skipped(res, tmp_path / "out", None, inp / "scan.nii.gz", "name must be {case}_XXXX")
    assert report["predicted"] == 2
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "one channel both as .nii and .nii.gz", "skipped")
def test_channel_in_both_endings(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write_case(inp, "dup", 5)
    _write(inp / "dup_0000.nii", _volume(50))
    res = _predict(inp, tmp_path / "out", model_dir)
    _assert_skipped(res, tmp_path / "out", "dup", inp / "dup_0000.nii.gz", "also in dup_0000.nii")
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "an earlier run's output for a case that now fails", "skipped")
def test_stale_output_of_failing_case_removed(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    out = tmp_path / "out"
    shutil.copytree(good_run[1], out)
    np.savez(out / "g2.npz", probabilities=np.zeros(1))  # as if an earlier run saved probabilities
    bad = inp / "g2_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:1200])  # g2 is broken now
    res = _predict(inp, out, model_dir)
    report = _assert_skipped(res, out, "g2", bad, "cannot read")
    (entry,) = report["failures"]
    assert sorted(Path(p).name for p in entry["removed"]) == ["g2.nii.gz", "g2.npz"]
    assert "removed the earlier run's g2.nii.gz, g2.npz" in res.err
    assert not (out / "g2.npz").exists()
    _assert_good_outputs(out, good_run, names=("g1",))


# ---- accepted under a documented policy ----------------------------------------------------------
@case("predict", "a case as .nii next to .nii.gz cases", "handled")
def test_nii_next_to_nii_gz_is_read(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    for c in range(2):
        _write(inp / f"plain_{c:04d}.nii", _volume(70 + c))
    res = _predict(inp, tmp_path / "out", model_dir)
    assert res.rc == 0, res.text[-3000:]
    assert "wrote 3 prediction(s)" in res.out
    assert _labels(tmp_path / "out" / "plain.nii.gz").shape == SHAPE  # written with the model's file_ending
    assert not (tmp_path / "out" / "failures.json").exists()
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "a non-NIfTI file and a folder in the input folder", "handled")
def test_other_files_are_reported_as_ignored(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    (inp / "README.txt").write_text("test images\n")
    (inp / "extra").mkdir()
    res = _predict(inp, tmp_path / "out", model_dir)
    assert res.rc == 0, res.text[-3000:]
    assert f"note: {inp / 'README.txt'}: not a NIfTI file; ignored" in res.err
    assert f"note: {inp / 'extra'}: a folder; ignored" in res.err
    _assert_good_outputs(tmp_path / "out", good_run)


@case("predict", "a constant (zero-variance) channel", "handled")
def test_constant_channel(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    _write(inp / "flat_0000.nii.gz", _volume(80))
    _write(inp / "flat_0001.nii.gz", np.full(SHAPE, 3.3))  # rounding gave this a std of 5e-7 before
    res = _predict(inp, tmp_path / "out", model_dir)
    assert res.rc == 0, res.text[-3000:]
    assert "note: flat: channel 1 (t2, flat_0001.nii.gz) is constant" in res.err
    assert _labels(tmp_path / "out" / "flat.nii.gz").shape == SHAPE
    _assert_good_outputs(tmp_path / "out", good_run)


# ---- wrong arguments, model or folder: one error, nothing touched --------------------------------
@case("predict", "--patch-size the network cannot take (not a multiple of its stride)", "error")
def test_bad_patch_size(tmp_path: Path, model_dir: Path, good_run) -> None:
    out = tmp_path / "out"
    shutil.copytree(good_run[1], out)
    before = snapshot(good_run[0], out)
    res = _predict(good_run[0], out, model_dir, "--patch-size", "40", "32", "32")
    assert_user_error(res, ["--patch-size 40 32 32", "axis 0: 40 -> 32 or 48"], rc=1)
    assert str(good_run[0]) not in res.err  # blamed on the argument, not on an input file
    assert snapshot(good_run[0], out) == before


@case("predict", "--patch-size 0", "error")
def test_patch_size_zero(tmp_path: Path, model_dir: Path, good_run) -> None:
    res = _predict(good_run[0], tmp_path / "out", model_dir, "--patch-size", "0", "32", "32")
    assert_user_error(res, ["--patch-size 0 32 32", ">= 1"], rc=2)
    assert not (tmp_path / "out").exists()


@case("predict", "preprocessing.json patch_size the network cannot take", "error")
def test_bad_patch_size_in_model_dir(tmp_path: Path, model_dir: Path, good_run) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    spec = json.loads((model / "preprocessing.json").read_text())
    spec["patch_size"] = [24, 32, 32]
    (model / "preprocessing.json").write_text(json.dumps(spec))
    res = _predict(good_run[0], tmp_path / "out", model)
    assert_user_error(res, [str(model / "preprocessing.json"), "patch_size (24, 32, 32)", "24 -> 16 or 32"],
                      rc=1)
    assert not (tmp_path / "out").exists()


@case("predict", "model directory missing", "error")
def test_missing_model_dir(tmp_path: Path, good_run) -> None:
    res = _predict(good_run[0], tmp_path / "out", tmp_path / "nope")
    assert_user_error(res, [str(tmp_path / "nope"), "model directory not found"], rc=1)
    assert not (tmp_path / "out").exists()


@case("predict", "preprocessing.json missing from the model directory", "error")
def test_missing_preprocessing_json(tmp_path: Path, model_dir: Path, good_run) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "preprocessing.json").unlink()
    res = _predict(good_run[0], tmp_path / "out", model)
    assert_user_error(res, [str(model / "preprocessing.json"), "no such file"], rc=1)
    assert not (tmp_path / "out").exists()


@case("predict", "preprocessing.json that is not JSON", "error")
def test_corrupt_preprocessing_json(tmp_path: Path, model_dir: Path, good_run) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "preprocessing.json").write_text('{"channel_names": ["t1", "t2"')
    res = _predict(good_run[0], tmp_path / "out", model)
    assert_user_error(res, [str(model / "preprocessing.json"), "not a valid PreprocessingSpec"], rc=1)
    assert res.err.count("\n") == 1  # one line
    assert not (tmp_path / "out").exists()


@case("predict", "input folder with no usable case", "error")
def test_no_usable_case(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    _write(inp / "only_0000.nii.gz", _volume(1))  # its channel 1 is missing
    out = tmp_path / "out"
    shutil.copytree(good_run[1], out)
    before = snapshot(inp, out)
    res = _predict(inp, out, model_dir)
    assert_user_error(res, [str(inp), "no usable case", str(inp / "only_0001.nii.gz"), "missing channel file"],
                      rc=1)
    assert snapshot(inp, out) == before


# ---- a model folder is checked as a whole, before the first case ------------------------------------
def _model_copy(tmp_path: Path, model_dir: Path, name: str = "model") -> Path:
    model = tmp_path / name
    shutil.copytree(model_dir, model)
    return model


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


@case("predict", "config.json disagrees with the weights (4 classes vs a 3-output head; 1 vs 2 input channels; "
      "another depth)", "error")
def test_config_disagrees_with_weights(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    classes = _model_copy(tmp_path, model_dir, "classes")  # the case: a random head would be built
    _edit_json(classes / "config.json", lambda c: c["architecture"].update(num_classes=4))
    _edit_json(classes / "preprocessing.json", lambda p: p["labels"].update(c=3))
    channels = _model_copy(tmp_path, model_dir, "channels")
    _edit_json(channels / "config.json", lambda c: c["architecture"].update(in_channels=1))
    _edit_json(channels / "preprocessing.json", lambda p: p.update(channel_names=["t1"]))
    depth = _model_copy(tmp_path, model_dir, "depth")  # another architecture: a block more in stage 1
    _edit_json(depth / "config.json", lambda c: c["architecture"]["n_blocks_per_stage"].__setitem__(1, 2))
    for model, names in ((classes, ["num_classes 4", "3 outputs"]), (channels, ["in_channels 1", "takes 2"]),
                         (depth, ["missing from the weights", "encoder.stages.1.blocks.1."])):
        before = snapshot(good_run[0], model)
        res = run_s3d_here(capsys, "predict", "-i", good_run[0], "-o", tmp_path / "out", "-m", model,
                           "--device", "cpu", "--no-progress")
        assert_user_error(res, [str(model / "config.json"), str(model / "model.safetensors"), *names,
                                "do not belong together"], rc=1)
        assert res.err.count("\n") == 1 and not (tmp_path / "out").exists()
        assert snapshot(good_run[0], model) == before


@case("predict", "weights holding NaN (a model exported by a run that diverged)", "error")
def test_weights_not_finite(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    from safetensors.torch import load_file, save_file

    model = _model_copy(tmp_path, model_dir)
    state = load_file(model / "model.safetensors")
    state["decoder.seg_layers.0.weight"][0, 0] = float("nan")
    save_file(state, model / "model.safetensors")
    res = run_s3d_here(capsys, "predict", "-i", good_run[0], "-o", tmp_path / "out", "-m", model, "--device", "cpu")
    assert_user_error(res, [str(model / "model.safetensors"), "NaN or inf", "decoder.seg_layers.0.weight"], rc=1)
    assert not (tmp_path / "out").exists()


@case("predict", "preprocessing.json labels break nnU-Net's rules (0/1/255; ignore equal to a class)", "error")
def test_model_labels_not_nnunet(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    gap = _model_copy(tmp_path, model_dir, "gap")
    _edit_json(gap / "preprocessing.json", lambda p: p.update(labels={"background": 0, "a": 1, "b": 255}))
    clash = _model_copy(tmp_path, model_dir, "clash")
    _edit_json(clash / "preprocessing.json",
               lambda p: p.update(labels={"background": 0, "a": 1, "b": 2, "ignore": 2}))
    for model, names in ((gap, ["consecutive", "255 -> 2"]), (clash, ["ignore label 2 is also a class", "use 3"])):
        res = run_s3d_here(capsys, "predict", "-i", good_run[0], "-o", tmp_path / "out", "-m", model)
        assert_user_error(res, [str(model / "preprocessing.json"), *names], rc=1)
        assert not (tmp_path / "out").exists()


# ---- a name from a file never chooses where s3d writes -------------------------------------------
@case("predict", "preprocessing.json file_ending '/../../x.nii.gz' (a path out of the output folder)", "error")
def test_file_ending_is_a_path(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    model = _model_copy(tmp_path, model_dir)
    _edit_json(model / "preprocessing.json", lambda p: p.update(file_ending="/../../x.nii.gz"))
    out = tmp_path / "a" / "b" / "out"
    before = snapshot(tmp_path)
    res = run_s3d_here(capsys, "predict", "-i", good_run[0], "-o", out, "-m", model, "--device", "cpu")
    assert_user_error(res, [str(model / "preprocessing.json"), "file_ending", "/../../x.nii.gz"], rc=1)
    assert snapshot(tmp_path) == before and not (tmp_path / "a").exists()  # nothing written anywhere


# ---- the output never overlaps an input ------------------------------------------------------------
@case("predict", "output folder = input folder, inside it, around it, a link to it, or inside the model folder",
      "error")
def test_output_overlaps_input_or_model(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    inp = _inputs(tmp_path, good_run)
    (tmp_path / "link").symlink_to(inp)
    before = snapshot(inp, model_dir)
    res = _predict(inp, inp, model_dir)  # the case, as a user runs it
    assert_user_error(res, [f"{inp}: the output folder is the input folder {inp}"], rc=2)
    for out, names in ((inp / "pred", ["is inside the input folder"]), (tmp_path, ["holds the input folder"]),
                       (tmp_path / "link", ["is the input folder"]),
                       (model_dir / "pred", ["is inside the model folder", str(model_dir)])):
        res = run_s3d_here(capsys, "predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu")
        assert_user_error(res, [str(out), *names], rc=2)
    assert snapshot(inp, model_dir) == before and not (model_dir / "pred").exists()


# ---- errors blame the right thing -------------------------------------------------------------------
@case("predict", "a file where a folder is expected (-i, -o, a file in -o's path, -m model.safetensors)", "error")
def test_file_where_a_folder_is_expected(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x\n")
    weights = model_dir / "model.safetensors"
    for i, o, m, names in ((a_file, tmp_path / "o", model_dir, [f"{a_file}: input folder is a file, not a folder"]),
                           (good_run[0], a_file, model_dir, [f"{a_file}: output folder is a file, not a folder"]),
                           (good_run[0], a_file / "o", model_dir, [str(a_file), f"in the way of {a_file / 'o'}"]),
                           (good_run[0], tmp_path / "o", weights, [f"{weights}: a file, not a model directory",
                                                                    str(model_dir)])):
        res = run_s3d_here(capsys, "predict", "-i", i, "-o", o, "-m", m, "--device", "cpu")
        assert_user_error(res, names, rc=1)
        assert a_file.read_text() == "x\n" and not (tmp_path / "o").exists()


@case("predict", "unsupported --device (mps, foo, cuda without CUDA) and bad API arguments (step 0, mirror "
      "axis 5, amp fp8)", "error")
def test_bad_arguments_refused_before_any_case(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    from s3d._paths import UsageError
    from s3d.infer import predict_folder

    out = tmp_path / "out"
    shutil.copytree(good_run[1], out)  # an earlier run's predictions: a bad argument must not touch them
    before = snapshot(good_run[0], out)
    devices = ["mps", "foo"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        res = run_s3d_here(capsys, "predict", "-i", good_run[0], "-o", out, "-m", model_dir, "--device", device)
        assert_user_error(res, ["--device", repr(device)], rc=2)
        assert "internal error" not in res.err
    for kwargs, name in (({"step": 0}, "step"), ({"tile_batch": 0}, "tile_batch"), ({"mirror": (5,)}, "mirror"),
                         ({"amp": "fp8"}, "amp"), ({"accumulate_device": "foo"}, "device"),
                         ({"patch_size": (32, 32)}, "patch_size")):
        with pytest.raises(UsageError, match=name):  # the Python API checks them before any case, as the CLI
            predict_folder(good_run[0], out, model_dir, device="cpu", progress=False, **kwargs)
    assert snapshot(good_run[0], out) == before  # no case was blamed, no earlier prediction removed


@case("predict", "read-only output folder", "error")
def test_read_only_output_folder(tmp_path: Path, model_dir: Path, good_run, modes_bind) -> None:  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        res = _run_as(modes_bind, "predict", "-i", good_run[0], "-o", out, "-m", model_dir, "--device", "cpu",
                      "--no-progress", "--no-mirror")
    finally:
        out.chmod(0o755)
    assert_user_error(res, [str(out), "cannot write the output folder"], rc=1)
    assert list(out.iterdir()) == [] and "predicted" not in res.text


# ---- a messy folder, as users have them -------------------------------------------------------------
@case("predict", "a messy folder: .DS_Store, ._ files, a broken link, .NII.GZ, a zero-byte file, a unicode name",
      "skipped")
def test_messy_input_folder(tmp_path: Path, model_dir: Path, good_run) -> None:
    inp = _inputs(tmp_path, good_run)
    (inp / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (inp / "._g1_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble junk
    (inp / "lnk_0000.nii.gz").symlink_to(tmp_path / "gone_0000.nii.gz")
    _write_case(inp, "UP", 7)
    for c in range(2):
        (inp / f"UP_{c:04d}.nii.gz").rename(inp / f"UP_{c:04d}.NII.GZ")
    _write_case(inp, "zero", 8)
    (inp / "zero_0001.nii.gz").write_bytes(b"")
    _write_case(inp, "gehirn_é_μ", 9)
    before = snapshot(inp)
    res = _predict(inp, tmp_path / "out", model_dir)
    assert res.rc == 1, res.text[-3000:]
    assert_no_traceback(res)
    report = json.loads((tmp_path / "out" / "failures.json").read_text())
    reasons = {Path(f["file"]).name: f["reason"] for f in report["failures"]}
    assert "broken symbolic link" in reasons["lnk_0000.nii.gz"]
    assert "lower-case" in reasons["UP_0000.NII.GZ"] and "lower-case" in reasons["UP_0001.NII.GZ"]
    assert "cannot read" in reasons["zero_0001.nii.gz"]
    assert not any(name.startswith(".") for name in reasons) and ".DS_Store" not in res.err  # hidden: skipped
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["g1.nii.gz", "g2.nii.gz",
                                                                          "gehirn_é_μ.nii.gz"]
    _assert_good_outputs(tmp_path / "out", good_run)
    assert snapshot(inp) == before


@case("predict", "an output folder holding an earlier run's predictions", "handled")
def test_earlier_predictions_replaced_with_a_note(tmp_path: Path, model_dir: Path, good_run, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(good_run[1], out)
    (out / "keep.txt").write_text("mine\n")
    res = run_s3d_here(capsys, "predict", "-i", good_run[0], "-o", out, "-m", model_dir, "--device", "cpu",
                       "--no-progress", "--no-mirror")
    assert res.rc == 0, res.text[-3000:]
    assert f"note: {out}: replaced 2 prediction(s) of an earlier run (g1.nii.gz, g2.nii.gz)" in res.err
    assert (out / "keep.txt").read_text() == "mine\n"  # not s3d's: never touched
    _assert_good_outputs(out, good_run)


def _run_as(preexec, *args):
    """``python -m s3d ARGS`` with an optional ``preexec_fn`` (see tests/test_bad_input_finetune.py)."""
    from test_bad_input_finetune import _run

    return _run(*args, preexec=preexec)
