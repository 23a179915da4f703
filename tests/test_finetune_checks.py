"""What fine-tuning refuses before the first step (2D, 1 voxel thick, too small after resampling) and
where its preprocessing cache lives (``cache_dir`` / ``S3D_CACHE_DIR``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")

from s3d.data.io import write_nifti  # noqa: E402
from s3d.data.nnunet import DatasetError, cache_root, validate_dataset  # noqa: E402


def make_dataset(root: Path, shapes: list[tuple[int, ...]], spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
                 seed: int = 0) -> Path:
    """One channel, label 1 where the (seeded) noise is bright; one case per shape (2D shapes allowed)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine = np.diag([*(list(spacing) + [1.0] * 3)[:3], 1.0])
    for i, shape in enumerate(shapes):
        img = rng.normal(size=shape).astype(np.float32) + 3
        write_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", img, affine)
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", (img > 3.5).astype(np.uint8), affine)
    meta = {"channel_names": {"0": "ct"}, "labels": {"background": 0, "x": 1}, "numTraining": len(shapes),
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _problems(root: Path, **kw) -> list[str]:
    with pytest.raises(DatasetError) as e:
        validate_dataset(root, **kw)
    return e.value.problems


def test_2d_and_one_voxel_thick_cases_are_named(tmp_path) -> None:
    root = make_dataset(tmp_path / "ds", [(40, 40), (1, 40, 40), (40, 40, 40), (40, 2, 40)])
    problems = _problems(root)
    assert len(problems) == 2, problems
    assert problems[0].startswith(str(root / "labelsTr" / "c0.nii.gz")) and "is 2D" in problems[0]
    assert problems[1].startswith(str(root / "labelsTr" / "c1.nii.gz"))
    assert "1 voxel thick along axis 0" in problems[1]


def test_too_small_after_resampling_from_the_header(tmp_path, monkeypatch) -> None:
    # 40 voxels of 0.5 mm are round(40 * 0.5 / 1) = 20 voxels at 1 mm: below a total stride of 32, not of 16
    root = make_dataset(tmp_path / "ds", [(40, 80, 80), (80, 80, 80)], spacing=(0.5, 0.5, 0.5))

    def no_voxels(*a, **k):
        raise AssertionError("the size check must not read voxels")

    monkeypatch.setattr("s3d.data.nnunet.dataset.read_nifti", no_voxels)
    problems = _problems(root, check_voxels=False, target_spacing_mm=(1, 1, 1), min_shape=(32, 32, 32))
    assert len(problems) == 1 and problems[0].startswith(str(root / "labelsTr" / "c0.nii.gz"))
    assert "(40, 80, 80) voxels at (0.5, 0.5, 0.5) mm become (20, 40, 40)" in problems[0]
    assert "20 < 32 voxels along axis 0" in problems[0] and "--spacing" in problems[0]
    ds = validate_dataset(root, check_voxels=False, target_spacing_mm=(1, 1, 1), min_shape=(16, 16, 16))
    assert ds.shapes == {"c0": (40, 80, 80), "c1": (80, 80, 80)} and ds.spacings_mm["c0"] == (0.5, 0.5, 0.5)
    # a finer target spacing keeps them big enough: 40 * 0.5 / 0.5 = 40 voxels
    validate_dataset(root, check_voxels=False, target_spacing_mm=(0.5, 0.5, 0.5), min_shape=(32, 32, 32))


def test_automatic_patch_with_a_one_voxel_bottleneck_is_refused_before_preprocessing(tmp_path) -> None:
    from s3d.finetune import FinetuneConfig
    from s3d.finetune.data import load_finetune_data

    root = make_dataset(tmp_path / "ds", [(16, 16, 16)] * 3)   # tiny's total stride is 16: a 16^3 patch
    cfg = FinetuneConfig(str(root), str(tmp_path / "out"), config="tiny", progress=False)
    with pytest.raises(DatasetError) as e:
        load_finetune_data(cfg, tmp_path / "out", total_stride=(16, 16, 16))
    assert "automatic patch size (16, 16, 16)" in str(e.value) and "--patch-size" in str(e.value)
    assert not (root / ".s3d_cache").exists()


def test_cache_dir_and_environment_variable(tmp_path, monkeypatch) -> None:
    from s3d.finetune import FinetuneConfig
    from s3d.finetune.data import load_finetune_data

    root = make_dataset(tmp_path / "ds", [(20, 24, 28)] * 3)
    absolute = root.resolve()
    expected = tmp_path / "cache" / f"ds-{hashlib.sha256(str(absolute).encode()).hexdigest()[:8]}"
    monkeypatch.delenv("S3D_CACHE_DIR", raising=False)
    assert cache_root(root) == root / ".s3d_cache"
    assert cache_root(root, tmp_path / "cache") == expected
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    cfg = FinetuneConfig(str(root), str(tmp_path / "out"), config="tiny", patch_size=(16, 16, 16),
                         progress=False, cache_dir=str(tmp_path / "cache"))
    data = load_finetune_data(cfg, tmp_path / "out", total_stride=(16, 16, 16))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before      # nothing written in the dataset
    assert len(list(expected.glob("*/c*_data.npy"))) == 3 and len(data.train_cases) + len(data.split["val"]) == 3
    # the environment variable names the same place; an explicit cache_dir wins over it
    monkeypatch.setenv("S3D_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_root(root) == expected and cache_root(root, tmp_path / "other").parent == tmp_path / "other"


def test_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch) -> None:
    from s3d.data.nnunet import PreprocessingSpec, preprocess_dataset

    root = make_dataset(tmp_path / "ds", [(20, 24, 28)] * 2)
    monkeypatch.delenv("S3D_CACHE_DIR", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ds = validate_dataset(root)
    with pytest.raises(OSError) as e:
        preprocess_dataset(ds, PreprocessingSpec.from_dataset(ds), progress=False, cache_dir=blocker)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(blocker)) and "--cache-dir" in msg
