"""The checks every command shares (issue 22): names from files, folders apart, labels, finite training,
run folders, full disks, label maps, the lazy ``import s3d``.

Pure functions, tested in-process; the bad-input corpus (``tests/test_bad_input_*.py``) runs the commands.
"""

from __future__ import annotations

import errno
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from s3d._fs import DiskFullError, atomic_folder, atomic_path, disk_full, sweep_temporaries
from s3d._paths import UsageError, check_apart, check_file_ending, input_folder, output_folder, safe_name, safe_relative
from s3d.data.labels import check_labels, label_problems
from s3d.runtime.checkpoint import claim_run_folder
from s3d.runtime.guard import FiniteWatch, NonFiniteError, check_weights, nonfinite_parameters


# ---- names from files ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "a/b", "/etc", "a\\b", "", "x\x00y", " x", 3, None])
def test_safe_name_refuses_what_is_not_one_plain_name(name) -> None:
    with pytest.raises(ValueError, match="model/preprocessing.json"):
        safe_name(name, "case id", "model/preprocessing.json")


def test_safe_name_and_relative_keep_plain_names(tmp_path) -> None:
    assert safe_name("brain_001 é", "case id", "x") == "brain_001 é"
    assert safe_relative("cases/a.b2nd", "file", "m.json", tmp_path) == tmp_path / "cases" / "a.b2nd"
    for bad in ("/etc/passwd", "../x", "cases/../../x", "C:\\x", "cases/a\x00b"):
        with pytest.raises(ValueError, match="m.json"):
            safe_relative(bad, "file", "m.json", tmp_path)


@pytest.mark.parametrize("ending", ["/../../x.nii.gz", ".nii.gz/..", ".mha", "", None, ".NII.GZ"])
def test_file_ending_is_one_of_two(ending) -> None:
    with pytest.raises(ValueError, match="file_ending"):
        check_file_ending(ending, "preprocessing.json")
    assert [check_file_ending(e) for e in (".nii.gz", ".nii")] == [".nii.gz", ".nii"]


# ---- folders ---------------------------------------------------------------------------------------
def test_folders_apart_in_every_direction(tmp_path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (tmp_path / "link").symlink_to(inp)
    cases = {inp: "is the input", inp / "sub": "is inside the input", tmp_path: "holds the input",
             tmp_path / "link": "is the input", tmp_path / "link" / "x": "is inside the input"}
    for out, how in cases.items():
        with pytest.raises(UsageError, match=how):
            check_apart(out, "output folder", [(inp, "input folder")])
    for out in (tmp_path / "out", tmp_path / "in2", tmp_path / "i"):  # a shared prefix is not containment
        check_apart(out, "output folder", [(inp, "input folder"), (None, "unused")])


def test_file_where_a_folder_is_expected(tmp_path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        input_folder(f, "input folder")
    with pytest.raises(FileNotFoundError, match="nothing is there"):
        input_folder(tmp_path / "none", "input folder")
    for out in (f, f / "a" / "b"):
        with pytest.raises(FileExistsError, match=f"{f}: output folder is a file"):
            output_folder(out, "output folder")
    assert output_folder(tmp_path / "new" / "deeper", "output folder") == tmp_path / "new" / "deeper"


# ---- labels: nnU-Net's rules, checked against nnunetv2 itself ------------------------------------
def _nnunet_accepts(labels: dict) -> bool:
    """nnunetv2's own checks: LabelManager (background 0, ignore one int above the classes) and
    verify_dataset_integrity's consecutive-labels assertion."""
    lm_mod = pytest.importorskip("nnunetv2.utilities.label_handling.label_handling")
    try:
        lm = lm_mod.LabelManager(labels, regions_class_order=None)
        expected = list(lm.all_labels) + ([lm.ignore_label] if lm.has_ignore_label else [])
        return bool(np.all(np.ediff1d(expected) == 1)) and expected[0] == 0
    except (AssertionError, RuntimeError, TypeError, ValueError):
        return False


def _label_sets():
    values = [0, 1, 2, 3, 5, 255]
    for n in range(1, 4):
        for combo in itertools.combinations(values[1:], n):
            yield {"background": 0, **{f"c{i}": v for i, v in enumerate(combo)}}
            for ignore in (1, 2, 3, 4, 6):
                yield {"background": 0, **{f"c{i}": v for i, v in enumerate(combo)}, "ignore": ignore}
    yield {"tumour": 1}
    yield {"background": 1, "a": 0}


def test_label_rules_agree_with_nnunetv2() -> None:
    checked = 0
    for labels in _label_sets():
        assert (label_problems(labels, regions=False) == []) == _nnunet_accepts(labels), labels
        checked += 1
    assert checked > 100


def test_label_rules_regions_and_duplicates() -> None:
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    assert label_problems(regions) == []
    assert "region" in label_problems(regions, regions=False)[0]
    assert "share the value 1" in label_problems({"background": 0, "a": 1, "b": 1})[0]  # s3d's extra rule
    with pytest.raises(ValueError, match="dataset.json: .*relabel 255 -> 1"):
        check_labels({"background": 0, "lesion": 255}, "dataset.json")


# ---- training never finishes broken --------------------------------------------------------------
def test_finite_watch_keeps_the_first_bad_step() -> None:
    watch = FiniteWatch()
    for step, value in enumerate([1.0, 2.0, float("inf"), float("nan"), 1.0], start=1):
        watch.observe(torch.tensor(value), step)
    assert watch.first_bad_step() == 3
    with pytest.raises(NonFiniteError, match=r"step 3 \(lr 0.003\).*no checkpoint had been written"):
        watch.check(lambda s: s / 1000, "runs/a", None)


def test_nonfinite_weights_are_named() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert nonfinite_parameters(net) == []
    net[1].running_var[0] = float("inf")
    assert nonfinite_parameters(net) == ["1.running_var"]
    with pytest.raises(NonFiniteError, match=r"step 7 \(lr 0.01\): 1 weight tensor.*1.running_var.*\(step 5\) is kept"):
        check_weights(net, 7, 0.01, "runs/a", 5)


# ---- run folders -----------------------------------------------------------------------------------
def test_claim_run_folder_refuses_then_overwrites_only_its_files(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"w")
    (run / "checkpoint_latest.pt").write_bytes(b"c")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="finished finetune run \\(model/\\).*--resume.*--overwrite"):
        claim_run_folder(run, job="finetune", resume=False, overwrite=False, exports=("model",))
    with pytest.raises(UsageError, match="contradict"):
        claim_run_folder(run, job="finetune", resume=True, overwrite=True)
    claim_run_folder(run, job="finetune", resume=True, overwrite=False, exports=("model",))  # resume: untouched
    assert (run / "model").is_dir()
    claim_run_folder(run, job="finetune", resume=False, overwrite=True, exports=("model",),
                     scratch=("metrics.jsonl",))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    claim_run_folder(tmp_path / "new", job="finetune", resume=False, overwrite=False)  # nothing there: fine


def test_atomic_folder_replaces_as_a_whole(tmp_path) -> None:
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed half-way")
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a": "1", "b": "1"}
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("3")
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


# ---- full disks ------------------------------------------------------------------------------------
def test_disk_full_in_any_words(tmp_path) -> None:
    assert disk_full(OSError(errno.ENOSPC, "x"), tmp_path) == "no space left on device"
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full(wrapped, tmp_path) == "no space left on device"
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as e:
            raise RuntimeError("unexpected pos 128 vs 0") from e
    except RuntimeError as e:
        assert disk_full(e, tmp_path) == "disk quota exceeded"
    assert disk_full(PermissionError(errno.EACCES, "denied"), tmp_path) is None
    assert disk_full(ValueError("bad value"), tmp_path) is None  # tmp_path has room


def test_atomic_path_reports_a_full_disk_and_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError, match=f"cannot write {target}: no space left on device; free disk space"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_sweep_temporaries_removes_only_atomic_leftovers(tmp_path) -> None:
    for name in (".a.b2nd.k2j4x9_a.b2nd", ".m.nii.gz.abcdefgh.nii.gz", ".keep", "a.b2nd", ".x.json.short.json"):
        (tmp_path / name).write_bytes(b"x")
    removed = sorted(p.name for p in sweep_temporaries(tmp_path))
    assert removed == [".a.b2nd.k2j4x9_a.b2nd", ".m.nii.gz.abcdefgh.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", ".x.json.short.json", "a.b2nd"]
    for name in (".a.b2nd.k2j4x9_a.b2nd", ".b.b2nd.k2j4x9_a.b2nd"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in sweep_temporaries(tmp_path, names={"b.b2nd", "c.b2nd"})] == [".b.b2nd.k2j4x9_a.b2nd"]
    assert (tmp_path / ".a.b2nd.k2j4x9_a.b2nd").exists()  # another process's file


# ---- label maps are not images -----------------------------------------------------------------------
def test_label_map_values() -> None:
    from s3d.data.scan.prepared import LABEL_MAP_MAX_VALUES, label_map_values

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (40, 40, 40)).astype(np.float32)
    assert label_map_values(labels).tolist() == [0, 1, 2, 3]
    mri = rng.gamma(2.0, 50.0, (40, 40, 40)).astype(np.float32)
    assert label_map_values(mri) is None
    assert label_map_values(np.rint(mri)) is None  # an integer-valued MRI has hundreds of values
    many = np.arange(40 ** 3, dtype=np.float32).reshape(40, 40, 40) % (LABEL_MAP_MAX_VALUES + 1)
    assert label_map_values(many) is None and label_map_values(np.zeros((4, 4, 4))) is None  # constant: own rule


# ---- the lazy package ------------------------------------------------------------------------------------
def test_import_s3d_is_light_and_lists_every_name() -> None:
    code = ("import sys, s3d; assert 'torch' not in sys.modules, 'torch imported'; "
            "import s3d as m; names = sorted(m.__all__); "
            "assert set(names) == set(m._EXPORTS) | {'__version__'}, names; "
            "[getattr(m, n) for n in names]; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
