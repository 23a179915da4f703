"""`s3d finetune` then `s3d predict` on a tiny synthetic nnU-Net dataset (end-to-end check)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("scipy")

from test_nnunet_data import make_sphere_dataset  # noqa: E402

from s3d.cli import main  # noqa: E402


def _finetune(tmp_path: Path, steps: int) -> Path:
    make_sphere_dataset(tmp_path / "ds", n=6, size=32)
    rc = main(["finetune", str(tmp_path / "ds"), "-o", str(tmp_path / "run"), "--config", "tiny",
               "--schedule", "scratch", "--steps", str(steps), "--patch-size", "32", "32", "32",
               "--val-every", str(max(steps, 1)), "--checkpoint-every", str(max(steps, 1)), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "preprocessing.json").is_file()
    return model_dir


def _predict(model_dir: Path, tmp_path: Path, seed: int, n: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """New cases (unseen seed), 40^3 at 1.2 mm; returns (prediction, label) pairs after geometry checks."""
    test = make_sphere_dataset(tmp_path / "test", n=n, size=40, seed=seed, spacing=(1.2, 1.2, 1.2))
    rc = main(["predict", "-i", str(test / "imagesTr"), "-o", str(tmp_path / "pred"), "-m", str(model_dir),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    pairs = []
    for i in range(n):
        src = nib.load(str(test / "imagesTr" / f"case{i:03d}_0000.nii.gz"))
        out = nib.load(str(tmp_path / "pred" / f"case{i:03d}.nii.gz"))
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)  # the header is copied: identical
        label = np.asarray(nib.load(str(test / "labelsTr" / f"case{i:03d}.nii.gz")).dataobj)
        pairs.append((np.asarray(out.dataobj), label))
    return pairs


def test_finetune_then_predict_writes_input_geometry(tmp_path: Path) -> None:
    model_dir = _finetune(tmp_path, steps=2)
    for pred, _ in _predict(model_dir, tmp_path, seed=11):
        assert set(np.unique(pred)) <= {0, 1}


@pytest.mark.slow
def test_finetune_then_predict_reaches_dice_on_unseen_spheres(tmp_path: Path) -> None:
    model_dir = _finetune(tmp_path, steps=200)
    for pred, label in _predict(model_dir, tmp_path, seed=11, n=3):
        p, r = pred.astype(bool), label.astype(bool)
        assert 2 * (p & r).sum() / (p.sum() + r.sum()) > 0.8
