"""Bad-input corpus, ``s3d finetune``: what it refuses before the first step, and the resume/disk failures.

Every case builds its own seeded input, runs the real command in a subprocess (``--config tiny``, 32^3
cases) and checks the outcome class, the file or argument the message names, and that no good file
changed. Permission cases need file modes that bind: as root (CI containers) the command runs without
CAP_DAC_OVERRIDE (dropped from its capability bounding set); where that is not possible they are
skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from badinput import Result, assert_user_error, case, run_s3d, run_s3d_here, snapshot

pytest.importorskip("scipy")

from test_finetune_checks import make_dataset  # noqa: E402
from test_nnunet_data import make_sphere_dataset  # noqa: E402

TINY = ("--config", "tiny", "--patch-size", "32", "32", "32", "--schedule", "scratch", "--val-every", "1000",
        "--no-progress", "--loader-threads", "1")


def _run(*args, preexec: Callable[[], None] | None = None, env: dict[str, str] | None = None) -> Result:
    """``python -m s3d ARGS`` like :func:`badinput.run_s3d`, optionally with a ``preexec_fn`` (uid, rlimit)."""
    if preexec is None:
        return run_s3d(*args, env=env)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "s3d", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=full_env, preexec_fn=preexec)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _one_line(res: Result) -> str:
    lines = [ln for ln in res.err.splitlines() if ln.startswith("s3d finetune: error:")]
    assert len(lines) == 1, res.text[-3000:]
    return lines[0]


# ---- permissions that bind ------------------------------------------------------------------------
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER (linux/capability.h)


def _without_dac_override() -> None:
    """preexec_fn: drop the capabilities that let root ignore file modes (bounding set, so after exec too)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture()
def modes_bind(tmp_path) -> Callable[[], None] | None:
    """The ``preexec_fn`` under which ``chmod a-w`` denies writes (``None`` for a normal user).

    Root ignores file modes; there the command runs without CAP_DAC_OVERRIDE (and its two relatives),
    so root too is bound by them. Skipped where even that is not possible.
    """
    if os.geteuid() != 0:
        return None
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        res = subprocess.run([sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"],
                             preexec_fn=_without_dac_override, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE ({e}): file modes do not bind root here")
    finally:
        probe.chmod(0o755)
    if res.returncode == 0:
        pytest.skip("running as root and file modes still do not bind after dropping CAP_DAC_OVERRIDE")
    return _without_dac_override


def _read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(autouse=True)
def _writable_again(tmp_path) -> Iterator[None]:
    """Give the owner write access back so pytest can remove tmp_path."""
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)


# ---- the dataset --------------------------------------------------------------------------------
@case("finetune", "2D images (one slice per file)", "error")
def test_2d_dataset(tmp_path) -> None:
    root = make_dataset(tmp_path / "ds", [(40, 40)] * 3)
    before = snapshot(root)
    res = run_s3d("finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "4")
    assert_user_error(res, [root / "labelsTr" / "c0.nii.gz", root / "labelsTr" / "c2.nii.gz", "is 2D"], rc=1)
    assert snapshot(root) == before and not (root / ".s3d_cache").exists()


@case("finetune", "volumes 1 voxel thick", "error")
def test_one_voxel_thick(tmp_path) -> None:
    root = make_dataset(tmp_path / "ds", [(40, 40, 40), (40, 1, 40), (40, 40, 40)])
    before = snapshot(root)
    res = run_s3d("finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "4")
    assert_user_error(res, [root / "labelsTr" / "c1.nii.gz", "1 voxel thick along axis 1"], rc=1)
    assert "c0.nii.gz" not in res.text and snapshot(root) == before
    assert not (tmp_path / "out" / "checkpoint_latest.pt").exists()          # refused before the first step


@case("finetune", "cases smaller than the network's total stride after resampling", "error")
def test_too_small_after_resampling(tmp_path) -> None:
    # 24 voxels of 0.5 mm = 12 voxels at the default 1 mm: below the tiny network's total stride of 16
    root = make_dataset(tmp_path / "ds", [(24, 48, 48), (48, 48, 48), (48, 48, 48)], spacing=(0.5, 0.5, 0.5))
    before = snapshot(root)
    res = run_s3d("finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "4")
    assert_user_error(res, [root / "labelsTr" / "c0.nii.gz", "12 < 16 voxels along axis 0", "--spacing"], rc=1)
    assert snapshot(root) == before and not (root / ".s3d_cache").exists()   # no voxel was preprocessed


@case("finetune", "--steps too short for the schedule's warm-ups", "error")
def test_steps_too_short(tmp_path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    before = snapshot(root)
    res = run_s3d("finetune", root, "-o", tmp_path / "out", "--config", "tiny", "--schedule", "best",
                  "--steps", "30", "--warmup-steps", "20", "--no-progress")
    line = _one_line(res)
    assert_user_error(res, ["--steps 30", "'best'", "--warmup-steps 20", "--steps >= 41", "--warmup-steps <= 14"], rc=1)
    assert "leave no training stage" in line
    assert snapshot(root) == before and not (tmp_path / "out").exists()      # refused before anything


@case("finetune", "--cache-dir is a file", "error")
def test_cache_dir_is_a_file(tmp_path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    blocker = tmp_path / "cache.txt"
    blocker.write_text("a file, not a folder\n")
    before = snapshot(root, blocker)
    res = run_s3d("finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "2", "--cache-dir", blocker)
    line = _one_line(res)
    assert_user_error(res, [blocker, "--cache-dir"], rc=1)
    assert "cannot write the preprocessing cache" in line and snapshot(root, blocker) == before


@case("finetune", "read-only dataset, no --cache-dir", "error")
def test_read_only_dataset(tmp_path, modes_bind) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    _read_only(root)
    before = snapshot(root)
    res = _run("finetune", root, "-o", tmp_path / "run", *TINY, "--steps", "2", preexec=modes_bind,
               env={"S3D_CACHE_DIR": ""})
    line = _one_line(res)
    assert_user_error(res, [root, "--cache-dir", "S3D_CACHE_DIR"], rc=1)
    assert "read-only dataset" in line and snapshot(root) == before


@case("finetune", "read-only dataset with --cache-dir", "handled")
def test_read_only_dataset_with_cache_dir(tmp_path, modes_bind) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    _read_only(root)
    before = snapshot(root)
    out = tmp_path / "run"
    res = _run("finetune", root, "-o", out, *TINY, "--steps", "2", "--cache-dir", tmp_path / "cache",
               preexec=modes_bind)
    assert res.rc == 0, res.text[-3000:]
    assert snapshot(root) == before and len(list((tmp_path / "cache").glob("ds-*/*/case*_data.npy"))) == 4
    assert (out / "model" / "model.safetensors").is_file()


@case("finetune", "read-only output folder", "error")
def test_read_only_out_folder(tmp_path, modes_bind) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    parent = tmp_path / "runs"
    parent.mkdir()
    parent.chmod(0o555)
    before = snapshot(root)
    res = _run("finetune", root, "-o", parent / "a", *TINY, "--steps", "2", preexec=modes_bind)
    line = _one_line(res)
    assert_user_error(res, [parent / "a", "-o/--out"], rc=1)
    assert "cannot write the run folder" in line and snapshot(root) == before


# ---- resume and disk ------------------------------------------------------------------------------
@case("finetune", "truncated checkpoint_latest.pt on --resume", "error")
def test_truncated_checkpoint_then_recover_from_previous(tmp_path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "run"
    args = ("finetune", root, "-o", out, *TINY, "--steps", "3", "--checkpoint-every", "1")
    assert run_s3d(*args).rc == 0
    latest, previous = out / "checkpoint_latest.pt", out / "checkpoint_previous.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])                               # a kill in the middle of a copy
    keep = snapshot(root, previous)
    res = run_s3d(*args, "--resume")
    line = _one_line(res)
    assert_user_error(res, [latest, previous, "(step 2) is intact", "move it onto"], rc=1)
    assert "damaged" in line and snapshot(root, previous) == keep           # the good checkpoint is kept
    # do what the message says: the run resumes from step 2 and finishes
    os.replace(previous, latest)
    res = run_s3d(*args, "--resume")
    assert res.rc == 0, res.text[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3]


def _file_size_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@case("finetune", "disk full while writing a checkpoint (file size limit)", "error")
def test_disk_full_at_checkpoint(tmp_path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "run"
    # 1 MB: the cache arrays (2 x 32^3 float32 = 256 kB) and logs fit, the checkpoint (~6 MB) does not
    res = _run("finetune", root, "-o", out, *TINY, "--steps", "2", "--checkpoint-every", "1",
               preexec=_file_size_limit(1_000_000))
    line = _one_line(res)
    assert_user_error(res, [out / "checkpoint_latest.pt", "free disk space"], rc=1)
    assert "cannot write checkpoint" in line
    assert not (out / "checkpoint_latest.pt").exists() and not list(out.glob(".checkpoint_latest*"))
    assert len(list((root / ".s3d_cache").glob("*/case*_data.npy"))) == 4      # the cache was complete


# ---- labels as nnU-Net checks them -----------------------------------------------------------------
def _relabel(root: Path, labels: dict, value_of_1: int) -> None:
    """dataset.json's labels, and the label files' foreground written as ``value_of_1``."""
    import nibabel as nib
    import numpy as np

    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(meta))
    for p in (root / "labelsTr").glob("*.nii.gz"):
        img = nib.load(str(p))
        seg = np.asarray(img.dataobj).astype(np.uint8)
        nib.save(nib.Nifti1Image(np.where(seg == 1, value_of_1, 0).astype(np.uint8), img.affine), str(p))


@case("finetune", "labels that break nnU-Net's rules (0/255; ignore equal to a class) and an ignore label",
      "error")
def test_labels_checked_as_nnunet(tmp_path, capsys) -> None:
    for name, labels, value, names in (
            ("gap", {"background": 0, "lesion": 255}, 255, ["consecutive", "found 0, 255", "relabel 255 -> 1"]),
            ("clash", {"background": 0, "lesion": 1, "ignore": 1}, 1, ["ignore label 1 is also a class", "use 2"]),
            ("ignore", {"background": 0, "lesion": 1, "ignore": 2}, 1, ["does not train with an ignore label"])):
        root = make_sphere_dataset(tmp_path / name, n=4)
        _relabel(root, labels, value)
        before = snapshot(root)
        res = run_s3d_here(capsys, "finetune", root, "-o", tmp_path / f"run-{name}", *TINY, "--steps", "4",
                           "--device", "cpu")
        assert_user_error(res, [root / "dataset.json", *names], rc=1)
        assert snapshot(root) == before and not (root / ".s3d_cache").exists()  # no 256-output network, no cache
        assert not (tmp_path / f"run-{name}").exists()


# ---- a finished run is never replaced without a word ------------------------------------------------
@case("finetune", "a second run into a finished run's folder (model/), or one with a checkpoint", "error")
def test_second_run_into_a_finished_run(tmp_path, capsys) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    finished, started = tmp_path / "finished", tmp_path / "started"
    (finished / "model").mkdir(parents=True)
    (finished / "model" / "model.safetensors").write_bytes(b"the earlier run's weights")
    started.mkdir()
    (started / "checkpoint_latest.pt").write_bytes(b"an earlier run's checkpoint")
    for out, names, there in ((finished, ["finished finetune run (model/)"], ["model"]),
                              (started, ["checkpoint_latest.pt"], ["checkpoint_latest.pt"])):
        before = snapshot(out, root)
        res = run_s3d_here(capsys, "finetune", root, "-o", out, *TINY, "--steps", "4", "--device", "cpu")
        assert_user_error(res, [str(out), *names, "--resume", "--overwrite"], rc=1)
        assert snapshot(out, root) == before and sorted(p.name for p in out.iterdir()) == there  # nothing written


@case("finetune", "run folder = dataset, inside it or around it; --pretrained inside the run folder", "error")
def test_run_folder_overlaps_an_input(tmp_path, capsys) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    (tmp_path / "old" / "model").mkdir(parents=True)
    (tmp_path / "old" / "model" / "model.safetensors").write_bytes(b"x")
    before = snapshot(root, tmp_path / "old")
    for out, extra, names in ((root, (), ["is the dataset folder"]), (root / "run", (), ["inside the dataset"]),
                              (tmp_path, (), ["holds the dataset folder"]),
                              (tmp_path / "old", ("-p", tmp_path / "old" / "model", "--overwrite"),
                               ["holds the pretrained model (-p/--pretrained)"])):
        res = run_s3d_here(capsys, "finetune", root, "-o", out, *TINY, "--steps", "4", "--device", "cpu", *extra)
        assert_user_error(res, [str(out), *names], rc=2)
    assert snapshot(root, tmp_path / "old") == before and not (root / "run").exists()


@case("finetune", "--device mps / cuda without CUDA, --resume with --overwrite, --patch-size 0", "error")
def test_settings_refused_before_anything(tmp_path, capsys) -> None:
    import torch

    root = make_sphere_dataset(tmp_path / "ds", n=4)
    before = snapshot(root)
    runs = [(("--device", "mps"), ["--device", "'mps'", "not supported"]),
            (("--resume", "--overwrite"), ["--resume and --overwrite"]),
            (("--patch-size", "0", "32", "32"), ["--patch-size", ">= 1"])]
    if not torch.cuda.is_available():
        runs.append((("--device", "cuda"), ["--device", "CUDA is not available"]))
    for extra, names in runs:
        res = run_s3d_here(capsys, "finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "4", *extra)
        assert_user_error(res, names, rc=2)
        assert "internal error" not in res.err
    assert snapshot(root) == before and not (tmp_path / "out").exists() and not (root / ".s3d_cache").exists()


@case("finetune", "a file as the dataset; dataset.json whose file_ending is a path; a .nii label among .nii.gz",
      "error")
def test_dataset_folder_problems_are_named(tmp_path, capsys) -> None:
    a_file = tmp_path / "Dataset001.zip"
    a_file.write_bytes(b"PK\x03\x04")
    res = run_s3d_here(capsys, "finetune", a_file, "-o", tmp_path / "out", *TINY, "--steps", "4")
    assert_user_error(res, [f"{a_file}: a file, not a dataset folder"], rc=1)
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": "/../../x.nii.gz"}))
    res = run_s3d_here(capsys, "finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "4")
    assert_user_error(res, [root / "dataset.json", "file_ending '/../../x.nii.gz'"], rc=1)
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "labelsTr" / "case003.nii.gz").rename(root / "labelsTr" / "case003.nii")
    before = snapshot(root)
    res = run_s3d_here(capsys, "finetune", root, "-o", tmp_path / "out", *TINY, "--steps", "4")
    assert_user_error(res, [root / "labelsTr" / "case003.nii", "file_ending is .nii.gz"], rc=1)
    assert snapshot(root) == before and not (tmp_path / "out").exists()


@case("finetune", "hidden files in imagesTr/labelsTr (.DS_Store, macOS ._ copies)", "handled")
def test_hidden_files_in_the_dataset(tmp_path) -> None:
    from s3d.data.nnunet import validate_dataset

    root = make_sphere_dataset(tmp_path / "ds", n=4)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "imagesTr" / "._case000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (root / "labelsTr" / "._case000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    ds = validate_dataset(root)  # what s3d finetune runs first: no problem, the hidden files are not cases
    assert ds.cases == [f"case{i:03d}" for i in range(4)] and ds.num_classes == 2


@case("finetune", "a truncated file in the preprocessing cache (disk full, copy cut short)", "handled")
def test_truncated_cache_file_is_preprocessed_again(tmp_path) -> None:
    from s3d.data.nnunet import PreprocessingSpec, load_cached_case, preprocess_dataset, validate_dataset

    ds = validate_dataset(make_sphere_dataset(tmp_path / "ds", n=2))
    spec = PreprocessingSpec.from_dataset(ds)
    cache = preprocess_dataset(ds, spec, progress=False)
    seg = cache / "case001_seg.npy"
    good = load_cached_case(cache, "case001", mmap=False)[1].copy()
    seg.write_bytes(seg.read_bytes()[:300])
    with pytest.raises(ValueError) as e:  # was numpy's "mmap length is greater than file size"
        load_cached_case(cache, "case001")
    assert str(e.value).startswith(f"{seg}: damaged cache file (truncated: 300 bytes") and "delete" in str(e.value)
    preprocess_dataset(ds, spec, progress=False)  # what the next s3d finetune does: the case is redone
    assert (load_cached_case(cache, "case001")[1] == good).all()


# ---- training never finishes broken ----------------------------------------------------------------
@case("finetune", "the loss becomes NaN (--lr 1e30)", "error")
def test_nan_loss_stops_the_run(tmp_path) -> None:
    import re

    import torch

    root = make_sphere_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "run"
    res = run_s3d("finetune", root, "-o", out, *TINY, "--steps", "8", "--checkpoint-every", "1", "--lr", "1e30",
                  "--device", "cpu")
    line = _one_line(res)
    assert_user_error(res, ["(lr ", "loss is nan", "nothing was exported", "Lower --lr", "--overwrite"], rc=1)
    m = re.search(r"step (\d+) \(lr [0-9.e+]+\): .*checkpoint (\S+) \(step (\d+)\) is kept", line)
    assert m is not None, line
    bad, kept = int(m.group(1)), int(m.group(3))
    assert kept == bad - 1 and m.group(2) == str(out / "checkpoint_latest.pt")
    state = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    assert state["step"] == kept and all(torch.isfinite(v).all() for v in state["model"].values()
                                        if v.is_floating_point())
    assert not (out / "model").exists()  # nothing broken is exported
