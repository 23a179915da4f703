"""``FinetuneConfig.use_mask_for_norm`` / ``s3d finetune --mask-for-norm``: z-score over the nonzero mask.

The reference is nnunetv2 2.8.1's own code: ``crop_to_nonzero`` then ``ZScoreNormalization`` with
``use_mask_for_norm=True``, run in this process on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tolerance import assert_yardstick

pytest.importorskip("scipy")
pytest.importorskip("nnunetv2")

from s3d.data.io import read_nifti, write_nifti  # noqa: E402


def _skull_stripped(root: Path, n: int = 3, size: int = 24, radius: float = 8.0, seed: int = 0) -> Path:
    """One channel: seeded noise inside a ball, exactly 0 outside it (as a skull-stripped brain)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    zz, yy, xx = np.mgrid[:size, :size, :size] - (size - 1) / 2
    ball = zz**2 + yy**2 + xx**2 <= radius**2
    for i in range(n):
        img = np.where(ball, rng.normal(100.0, 20.0, ball.shape), 0.0).astype(np.float32)
        write_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", img, np.eye(4))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", (img > 110).astype(np.uint8), np.eye(4))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1}, "numTraining": n,
        "file_ending": ".nii.gz"}))
    return root


def _cached(tmp_path: Path, root: Path, mode: bool | str):
    from s3d.finetune import FinetuneConfig
    from s3d.finetune.data import load_finetune_data

    cfg = FinetuneConfig(str(root), str(tmp_path / f"out-{mode}"), config="tiny", patch_size=(16, 16, 16),
                         progress=False, use_mask_for_norm=mode, cache_dir=str(tmp_path / "cache"))
    return load_finetune_data(cfg, tmp_path / f"out-{mode}", total_stride=(16, 16, 16))


@pytest.mark.numerical
def test_mask_for_norm_matches_nnunet_and_auto_follows_its_rule(tmp_path: Path) -> None:
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    root = _skull_stripped(tmp_path / "ds")
    on, off = _cached(tmp_path, root, True), _cached(tmp_path, root, False)
    assert on.spec.use_mask_for_norm is True and off.spec.use_mask_for_norm is False
    worst = yard = 0.0
    for case in on.train_cases + on.val_cases:
        img = read_nifti(root / "imagesTr" / f"{case.name}_0000.nii.gz")[0][None].astype(np.float32)
        seg = read_nifti(root / "labelsTr" / f"{case.name}.nii.gz")[0][None].astype(np.int8)
        data, seg, _ = crop_to_nonzero(img, seg)
        ref = ZScoreNormalization(use_mask_for_norm=True, intensityproperties={},
                                  target_dtype=np.float32).run(data[0].copy(), seg[0])
        got = np.asarray(case.data[0])
        assert got.shape == ref.shape
        assert (got[seg[0] < 0] == 0).all()  # outside the ball: exactly 0, as nnU-Net leaves it
        # both against a float64 z-score over the mask; nnU-Net's float32 result is the yardstick
        v, inside = data[0].astype(np.float64), seg[0] >= 0
        truth = np.where(inside, (v - v[inside].mean()) / v[inside].std(), 0.0)
        worst, yard = max(worst, float(np.abs(got - truth).max())), max(yard, float(np.abs(ref - truth).max()))
    assert_yardstick(worst, yard, "masked z-score")
    # without the mask the zeros around the ball enter the statistics: the ball's voxels differ
    assert not np.allclose(np.asarray(off.train_cases[0].data), np.asarray(on.train_cases[0].data), atol=0.1)
    # "auto": nnU-Net's planner rule, the nonzero box is (17/24)^3 = 0.36 < 3/4 of the image -> on
    assert _cached(tmp_path, root, "auto").spec.use_mask_for_norm is True


def test_auto_is_off_for_images_without_a_zero_border(tmp_path: Path) -> None:
    from test_finetune_checks import make_dataset

    root = make_dataset(tmp_path / "ds", [(20, 24, 28)] * 3)  # noise + 3: no voxel is 0, box = image
    assert _cached(tmp_path, root, "auto").spec.use_mask_for_norm is False


def test_bad_value_and_cli_flag() -> None:
    from s3d.cli import build_parser
    from s3d.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="use_mask_for_norm: expected true, false or 'auto', got 'yes'"):
        FinetuneConfig("ds", "out", use_mask_for_norm="yes")
    args = build_parser().parse_args(["finetune", "ds", "-o", "out", "--mask-for-norm", "auto"])
    assert args.mask_for_norm == "auto"
    assert "use_mask_for_norm" in FinetuneConfig("ds", "out").resume_fields()  # a resume must not change it
