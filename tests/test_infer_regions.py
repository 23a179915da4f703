"""nnU-Net region-based models in prediction: sigmoid per region, ``regions_class_order`` paints the labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tolerance import assert_yardstick

import s3d
from s3d.data.nnunet import PreprocessingSpec
from s3d.hub import save_pretrained
from s3d.infer import load_model_dir, predict_case, predict_folder, regions_to_labels

pytest.importorskip("scipy")

# BraTS-style: whole tumour = labels 1-3, tumour core = 2-3, enhancing = 3 (nnU-Net's Dataset137 example)
LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
ORDER = (1, 2, 3)


def test_spec_regions_round_trip_and_checks(tmp_path: Path) -> None:
    spec = PreprocessingSpec(labels=LABELS, regions_class_order=ORDER)
    assert spec.has_regions and spec.regions == [(1, 2, 3), (2, 3), (3,)] and spec.num_classes == 3
    spec.save(tmp_path / "preprocessing.json")
    assert PreprocessingSpec.load(tmp_path / "preprocessing.json") == spec
    assert json.loads((tmp_path / "preprocessing.json").read_text())["labels"]["whole"] == [1, 2, 3]
    plain = PreprocessingSpec(labels={"background": 0, "a": 1, "b": [2]})  # a list of one value is a label
    assert not plain.has_regions and plain.num_classes == 3 and plain.regions == []
    assert plain.cache_key() == PreprocessingSpec(labels={"background": 0, "a": 1, "b": 2}).cache_key()
    with pytest.raises(ValueError, match="regions_class_order needs one label value per region, got None"):
        PreprocessingSpec(labels=LABELS)
    with pytest.raises(ValueError, match=r"3 region\(s\).*got \(1, 2\)"):
        PreprocessingSpec(labels=LABELS, regions_class_order=(1, 2))
    with pytest.raises(ValueError, match="no label is a region"):
        PreprocessingSpec(labels={"background": 0, "a": 1}, regions_class_order=(1,))


def test_regions_to_labels_is_nnunets_rule() -> None:
    # one row of 6 voxels; probabilities of (whole, core, enhancing)
    p = np.array([[0.9, 0.9, 0.9, 0.2, 0.5, 0.1],
                  [0.1, 0.8, 0.7, 0.9, 0.1, 0.1],
                  [0.1, 0.1, 0.6, 0.1, 0.1, 0.51]])[:, None, None, :]
    # by hand: > 0.5 paints (0.5 does not), later regions overwrite earlier ones, even outside them
    np.testing.assert_array_equal(regions_to_labels(p, ORDER)[0, 0], [1, 2, 3, 2, 0, 3])
    np.testing.assert_array_equal(regions_to_labels(p, (3, 2, 1))[0, 0], [3, 2, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="3 region channel"):
        regions_to_labels(p, (1, 2))


def _boxes(shape: tuple[int, int, int]) -> list[np.ndarray]:
    def box(*sl: slice) -> np.ndarray:
        m = np.zeros(shape, bool)
        m[sl] = True
        return m

    whole = box(slice(4, 14), slice(5, 18), slice(6, 20))
    core = box(slice(6, 12), slice(8, 20), slice(9, 16))      # sticks out of `whole` along axis 1
    enhancing = box(slice(2, 8), slice(10, 13), slice(10, 14))  # sticks out of `whole` along axis 0
    return [whole, core, enhancing]


@pytest.mark.numerical
def test_region_case_against_a_hand_computed_reference(tmp_path: Path) -> None:
    shape = (20, 24, 28)
    boxes = _boxes(shape)
    paths = []
    for r, m in enumerate(boxes):  # channel r is 1 inside box r, 0 elsewhere
        paths.append(tmp_path / f"t_{r:04d}.nii.gz")
        nib.save(nib.Nifti1Image(m.astype(np.float32), np.eye(4)), str(paths[-1]))
    spec = PreprocessingSpec(channel_names=("w", "c", "e"), labels=LABELS, regions_class_order=ORDER,
                             patch_size=(32, 32, 32))

    def net(x: torch.Tensor) -> torch.Tensor:  # logit of region r = 3 * (z-scored channel r): > 0 inside box r
        return 3 * x

    out, npz = tmp_path / "out" / "t.nii.gz", tmp_path / "out" / "t.npz"
    pred = predict_case(paths, net, spec, output_path=out, probabilities_path=npz)

    # reference by hand: crop = the boxes' bounding box, z-score per channel over it, sigmoid; 0 outside
    crop = (slice(2, 14), slice(5, 20), slice(6, 20))
    ref_p, plain = np.zeros((3, *shape)), np.zeros((3, *shape))  # float64 and plain float32 by hand
    for r, m in enumerate(boxes):
        for out_p, dt in ((ref_p, np.float64), (plain, np.float32)):
            v = m[crop].astype(dt)
            out_p[r][crop] = 1 / (1 + np.exp(-3 * (v - v.mean()) / v.std()))
    ref_l = np.zeros(shape, np.uint8)
    for m, label in zip(boxes, ORDER, strict=True):
        ref_l[m] = label
    # the float32 pipeline vs float64 by hand; yardstick: the same steps by hand in float32
    assert_yardstick(float(np.abs(pred.probabilities - ref_p).max()), float(np.abs(plain - ref_p).max()),
                     "region probabilities")
    np.testing.assert_array_equal(pred.labels, ref_l)
    assert pred.labels[7, 19, 12] == 2 and pred.labels[3, 11, 11] == 3 and pred.labels[5, 6, 7] == 1
    assert pred.labels[0, 0, 0] == 0 and (pred.probabilities[:, 0, 0, 0] == 0).all()  # outside the crop
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), ref_l)
    with np.load(npz) as z:
        np.testing.assert_allclose(z["probabilities"], pred.probabilities)
        np.testing.assert_array_equal(z["labels"], ORDER)
        assert bool(z["regions"])


def test_region_model_dir_through_predict_folder(tmp_path: Path) -> None:
    model = tmp_path / "model"
    torch.manual_seed(0)
    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=1, num_classes=3), model)  # 3 sigmoid outputs
    spec = PreprocessingSpec(channel_names=("t1",), labels=LABELS, regions_class_order=ORDER, patch_size=(32, 32, 32))
    spec.save(model / "preprocessing.json")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(7)
    nib.save(nib.Nifti1Image(rng.normal(size=(30, 34, 26)).astype(np.float32) + 1, np.eye(4)),
             str(tmp_path / "in" / "r_0000.nii.gz"))
    predict_folder(tmp_path / "in", tmp_path / "out", model, device="cpu", mirror=False, save_probabilities=True,
                   progress=False)
    labels = np.asarray(nib.load(str(tmp_path / "out" / "r.nii.gz")).dataobj)
    with np.load(tmp_path / "out" / "r.npz") as z:
        p = z["probabilities"]
    assert p.shape == (3, 30, 34, 26) and p.min() >= 0 and p.max() <= 1
    assert np.abs(p.sum(0) - 1).max() > 0.1  # independent sigmoids, not a softmax
    ref = np.where(p[2] > 0.5, 3, np.where(p[1] > 0.5, 2, np.where(p[0] > 0.5, 1, 0)))  # last region wins
    np.testing.assert_array_equal(labels, ref)

    wrong = tmp_path / "wrong"
    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=1, num_classes=4), wrong)
    spec.save(wrong / "preprocessing.json")
    with pytest.raises(ValueError, match=r"predicts 4 output\(s\).*3 region\(s\)"):
        load_model_dir(wrong)
