"""A prediction batch never loses, hides or misreports a result: failures file, pairs, temporaries, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import s3d
from s3d.data.nnunet import PreprocessingSpec
from s3d.hub import save_pretrained
from s3d.infer import (
    FAILURES_FILE,
    BatchPredictionError,
    PredictionNote,
    predict_folder,
    sweep_partial,
    write_case_outputs,
)

pytest.importorskip("scipy")

# inputs of 96^3 voxels at 1 mm, predicted at 3 mm: one 32^3 tile per case (fast), but the probabilities
# (3 x 96^3 float32, 10.6 MB) take a while to compress, which keeps a case's temporaries around long
# enough to be seen and killed
SHAPE = (96, 96, 96)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=1, num_classes=3), d)
    PreprocessingSpec(target_spacing_mm=(3.0, 3.0, 3.0), channel_names=("ct",),
                      labels={"background": 0, "a": 1, "b": 2}, patch_size=(32, 32, 32)).save(d / "preprocessing.json")
    return d


def _inputs(folder: Path, n: int, shape: tuple[int, int, int] = SHAPE) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    names = [f"case{i}" for i in range(n)]
    for name in names:
        data = rng.normal(size=shape).astype(np.float32) + 2.0
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / f"{name}_0000.nii.gz"))
    return names


def _assert_pairs(out: Path, names: list[str], complete: bool) -> None:
    """Every label map that exists has its own .npz (same prediction); with ``complete``, all exist."""
    for name in names:
        label, npz = out / f"{name}.nii.gz", out / f"{name}.npz"
        if not label.exists():
            assert not complete, f"{label} missing"
            continue
        assert npz.exists(), f"{label} without its .npz"
        with np.load(npz) as z:
            np.testing.assert_array_equal(z["probabilities"].argmax(0), np.asarray(nib.load(str(label)).dataobj))


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def _start(inp: Path, out: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "s3d", "predict", "-i", str(inp), "-o", str(out), "-m", str(model),
                             "--device", "cpu", "--no-progress", "--no-mirror", "--save-probabilities"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when_partial(proc: subprocess.Popen, out: Path, sig: int, timeout: float = 600) -> list[str]:
    """Send ``sig`` as soon as a temporary appears in ``out``; returns the temporaries seen."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        seen = [n for n in (os.listdir(out) if out.is_dir() else []) if ".s3d-partial-" in n]
        if seen:
            proc.send_signal(sig)
            proc.communicate(timeout=120)
            return seen
        time.sleep(0.0005)
    proc.kill()
    proc.communicate()
    return []


def test_sigkill_mid_batch_then_rerun_leaves_no_temporaries_and_complete_outputs(tmp_path: Path,
                                                                                 model_dir: Path) -> None:
    names = _inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    for _attempt in range(3):  # the kill can land just after a rename; then there is nothing to sweep: again
        proc = _start(tmp_path / "in", out, model_dir)
        seen = _signal_when_partial(proc, out, signal.SIGKILL)
        assert seen, "the batch ended before a temporary file was seen"
        assert proc.returncode == -signal.SIGKILL
        _assert_pairs(out, names, complete=False)  # what a kill leaves is consistent
        if _hidden(out):
            break
    left = _hidden(out)
    assert left and all(".s3d-partial-" in n for n in left)  # SIGKILL cannot be caught: they stay...

    proc = _start(tmp_path / "in", out, model_dir)  # ... until the next run sweeps them
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert _hidden(out) == []
    _assert_pairs(out, names, complete=True)
    assert not (out / FAILURES_FILE).exists()


def test_sigterm_mid_batch_removes_its_temporaries(tmp_path: Path, model_dir: Path) -> None:
    names = _inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    proc = _start(tmp_path / "in", out, model_dir)
    assert _signal_when_partial(proc, out, signal.SIGTERM), "the batch ended before a temporary file was seen"
    assert proc.returncode == 128 + signal.SIGTERM
    assert _hidden(out) == []
    _assert_pairs(out, names, complete=False)


def test_failures_reported_then_a_clean_run_removes_the_report(tmp_path: Path, model_dir: Path) -> None:
    names = _inputs(tmp_path / "in", 3, shape=(40, 40, 40))
    bad = tmp_path / "in" / "case1_0000.nii.gz"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:800])
    (tmp_path / "in" / "notes.txt").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s3d-partial-99999-case0.npz").write_bytes(b"left by a killed run")
    (out / ".case2.nii.gz.abcd_123.nii.gz").write_bytes(b"left by atomic_path")
    (out / ".keep").write_text("a user's hidden file")
    with pytest.warns(PredictionNote, match="notes.txt: not a NIfTI file; ignored"), \
            pytest.raises(BatchPredictionError, match=r"1 input problem\(s\); predicted 2 of 3") as err:
        predict_folder(tmp_path / "in", out, model_dir, device="cpu", mirror=False, progress=False)
    e = err.value
    assert [p.name for p in e.written] == ["case0.nii.gz", "case2.nii.gz"]
    assert [(f.case, f.file) for f in e.failures] == [("case1", str(bad))]
    report = json.loads((out / FAILURES_FILE).read_text())
    assert report["failures"][0]["case"] == "case1" and "cannot read" in report["failures"][0]["reason"]
    assert report["notes"] == [f"{tmp_path / 'in' / 'notes.txt'}: not a NIfTI file; ignored"]
    assert _hidden(out) == [".keep"]  # the temporaries were swept, nothing else

    bad.write_bytes(good_bytes)  # fixed: a clean run removes the stale report
    (tmp_path / "in" / "notes.txt").unlink()
    written = predict_folder(tmp_path / "in", out, model_dir, device="cpu", mirror=False, progress=False)
    assert [p.name for p in written] == [f"{n}.nii.gz" for n in names]
    assert not (out / FAILURES_FILE).exists()


def test_npz_of_an_earlier_run_does_not_outlive_a_new_label_map(tmp_path: Path, model_dir: Path) -> None:
    _inputs(tmp_path / "in", 1, shape=(40, 40, 40))
    out = tmp_path / "out"
    predict_folder(tmp_path / "in", out, model_dir, device="cpu", mirror=False, progress=False,
                   save_probabilities=True)
    assert (out / "case0.npz").exists()
    predict_folder(tmp_path / "in", out, model_dir, device="cpu", mirror=False, progress=False)
    assert (out / "case0.nii.gz").exists() and not (out / "case0.npz").exists()


def test_pair_write_is_both_or_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    like = tmp_path / "in_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(like))
    label, npz = tmp_path / "x.nii.gz", tmp_path / "x.npz"
    labels = np.ones((4, 4, 4), np.uint8)
    probs = {"probabilities": np.zeros((2, 4, 4, 4), np.float32)}
    write_case_outputs(label, labels, np.eye(4), like, npz, probs)
    assert label.exists() and npz.exists()

    import s3d.infer.outputs as outputs

    real = os.replace

    def replace_fails_for_labels(src, dst):  # the last rename (onto the label map) fails
        if Path(dst) == label:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace_fails_for_labels)
    with pytest.raises(OSError, match="No space"):
        write_case_outputs(label, labels, np.eye(4), like, npz, probs)
    assert not label.exists() and not npz.exists()  # neither (the old pair is gone too, never half of it)
    assert _hidden(tmp_path) == []
    assert sweep_partial(tmp_path) == []



@pytest.mark.gpu
def test_device_and_an_inferer_with_another_device_are_refused_before_any_work(tmp_path: Path,
                                                                                model_dir: Path) -> None:
    """The inferer's own device used to win silently over ``device=``; a ``device`` that is not the
    inferer's is an error now, before any file is written. (Two devices that both exist: a GPU machine.)"""
    from s3d.infer import SlidingWindowInferer

    _inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    inferer = SlidingWindowInferer((32, 32, 32), device="cuda", mirror=False)
    with pytest.raises(TypeError, match=r"device='cpu' but inferer.device='cuda'"):
        predict_folder(tmp_path / "in", out, model_dir, inferer=inferer, device="cpu", progress=False)
    assert not out.exists()
    written = predict_folder(tmp_path / "in", out, model_dir, inferer=inferer, device="auto", progress=False)
    assert [p.name for p in written] == ["case0.nii.gz"]
