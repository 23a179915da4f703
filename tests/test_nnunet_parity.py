"""s3d's fine-tuning preprocessing against nnU-Net's own, on real anatomical images at non-1 mm spacing.

The nnU-Net side is nnunetv2 2.8.1's code, run in this process: ``DatasetFingerprintExtractor`` ->
``ExperimentPlanner`` (the base ``nnUNetPlans`` that ``nnUNetv2_preprocess_like_nnssl`` requires) ->
the edits ``preprocess_like_nnssl`` makes to the ``3d_fullres`` configuration -> ``DefaultPreprocessor.run_case``.
``like_nnssl.py`` landed on nnU-Net's master after the 2.8.1 tag and is not in the PyPI wheel; its
edits are data (nnunetv2/experiment_planning/like_nnssl.py, ``-am like_pretrained``): ``spacing`` = the
pre-training's (1 mm isotropic for the OpenMind checkpoints), ``ZScoreNormalization`` for every
channel, ``DefaultPreprocessor``; ``use_mask_for_norm``, transpose and resampling stay the planner's.
The preprocessing code it runs (default_preprocessor.py, default_resampling.py, cropping.py,
default_normalization_schemes.py) is byte-identical between master and the 2.8.1 wheel.

Images: nilearn's MNI152 T1 template (skull-stripped; every 3rd voxel, written with a
1.5 x 1.2 x 2.0 mm affine; labels from its GM/WM maps) and nibabel's test T1 ``anatomical.nii``
(no zero background) at 1.0 x 1.2 x 4.0 mm (one thick axis) and 3.5 x 3.5 x 1.0 mm (two).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("scipy")
nilearn_datasets = pytest.importorskip("nilearn.datasets")
pytest.importorskip("nnunetv2")
_BG_VERSION = importlib.metadata.version("batchgenerators")
if tuple(int(x) for x in _BG_VERSION.split(".")[:3]) < (0, 25, 4):  # the [dev] extra pins 0.25.5
    pytest.skip(f"batchgenerators {_BG_VERSION}: nnU-Net's label resampling is argmax from 0.25.4 on",
                allow_module_level=True)

from s3d.data.nnunet import PreprocessingSpec, preprocess_training_case, read_dataset_json  # noqa: E402
from s3d.data.nnunet.preprocessing import nnunet_use_mask_for_norm  # noqa: E402
from s3d.data.preprocess import crop_to_nonzero, nonzero_mask, resample_seg, shape_for_spacing  # noqa: E402

pytestmark = pytest.mark.numerical

LABELS = {"background": 0, "a": 1, "b": 2}
PRETRAIN_SPACING_MM = [1.0, 1.0, 1.0]  # the OpenMind checkpoints' pre-training spacing
MNI_SPACING_MM = (1.5, 1.2, 2.0)
T1_SPACINGS_MM = {"aniso": (1.0, 1.2, 4.0), "twothick": (3.5, 3.5, 1.0)}


# ---- inputs ------------------------------------------------------------------------------------------
def _write(path: Path, arr: np.ndarray, spacing: tuple[float, float, float]) -> None:
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def _raw_dataset(root: Path, name: str, cases: dict) -> Path:
    d = root / name
    (d / "imagesTr").mkdir(parents=True)
    (d / "labelsTr").mkdir()
    for cid, (img, lab, spacing) in cases.items():
        _write(d / "imagesTr" / f"{cid}_0000.nii.gz", img.astype(np.float32), spacing)
        _write(d / "labelsTr" / f"{cid}.nii.gz", lab.astype(np.uint8), spacing)
    meta = {"channel_names": {"0": "T1"}, "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (d / "dataset.json").write_text(json.dumps(meta))
    return d


def _mni_case() -> tuple[np.ndarray, np.ndarray]:
    def load(path: str) -> np.ndarray:
        return np.asarray(nib.load(path).dataobj, dtype=np.float32)[::3, ::3, ::3]

    t1, gm, wm = (load(p) for p in (nilearn_datasets.MNI152_FILE_PATH, nilearn_datasets.GM_MNI152_FILE_PATH,
                                    nilearn_datasets.WM_MNI152_FILE_PATH))
    lab = np.zeros(t1.shape, np.uint8)
    lab[gm > 127] = 1
    lab[wm > 127] = 2
    return t1, lab


def _t1_case() -> tuple[np.ndarray, np.ndarray]:
    from nibabel.testing import data_path

    t1 = np.asarray(nib.load(os.path.join(data_path, "anatomical.nii")).dataobj, dtype=np.float32)
    lab = np.zeros(t1.shape, np.uint8)
    lab[t1 > np.percentile(t1, 50)] = 1
    lab[t1 > np.percentile(t1, 85)] = 2
    return t1, lab


# ---- nnU-Net, in this process ------------------------------------------------------------------------
class _InlinePool:
    """Stands in for the spawn Pool of nnU-Net's fingerprint extractor: runs its workers here (a spawned
    worker re-imports torch and nnunetv2, ~10 s on 2 CPU cores); nnU-Net's own code does the rest."""

    def __init__(self, processes: int) -> None:
        self._pool = [SimpleNamespace(is_alive=lambda: True)]

    def __enter__(self) -> _InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def starmap_async(self, fn, iterable):
        results = [fn(*args) for args in iterable]
        return SimpleNamespace(ready=lambda: True, get=lambda: results)


def _plans_like_nnssl(name: str, mp: pytest.MonkeyPatch):
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    inline = SimpleNamespace(get_context=lambda _method: SimpleNamespace(Pool=_InlinePool))
    mp.setattr(fingerprint_extractor, "multiprocessing", inline)
    extractor = fingerprint_extractor.DatasetFingerprintExtractor(name, num_processes=1)
    extractor.show_progress_bar = False
    # foreground intensities sampled for the fingerprint (default 1e8: ~0.8 GB and seconds); only
    # CTNormalization uses them, like_nnssl's z-score does not
    extractor.num_foreground_voxels_for_intensitystats = 100_000
    with contextlib.redirect_stdout(io.StringIO()):
        extractor.run()
        plans = ExperimentPlanner(name).plan_experiment()
    # the edits of nnUNetv2_preprocess_like_nnssl -am like_pretrained (like_nnssl.py, preprocess_like_nnssl)
    cfg = plans["configurations"]["3d_fullres"]
    cfg["spacing"] = list(PRETRAIN_SPACING_MM)
    cfg["normalization_schemes"] = ["ZScoreNormalization" for _ in cfg["normalization_schemes"]]
    cfg["preprocessor_name"] = "DefaultPreprocessor"
    cfg["batch_size"] = 2
    plans["configurations"] = {"3d_fullres": cfg}
    return PlansManager(plans)


def _nnunet_case(raw: Path, cid: str, plans) -> dict:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data, seg, props = DefaultPreprocessor(verbose=False).run_case(
        [str(raw / "imagesTr" / f"{cid}_0000.nii.gz")], str(raw / "labelsTr" / f"{cid}.nii.gz"),
        plans, plans.get_configuration("3d_fullres"), str(raw / "dataset.json"))

    def to_s3d_axes(a: np.ndarray) -> np.ndarray:
        # nnU-Net: SimpleITK's (k, j, i) order, then transpose_forward; s3d: nibabel's (i, j, k)
        a = a.transpose(0, *(np.asarray(plans.transpose_backward) + 1))
        return a.transpose(0, 3, 2, 1)

    tb = np.asarray(plans.transpose_backward)
    bbox_sitk = [props["bbox_used_for_cropping"][i] for i in tb]
    return {"data": to_s3d_axes(data), "seg": to_s3d_axes(seg)[0], "bbox": [list(b) for b in bbox_sitk[::-1]]}


def _s3d_case(raw: Path, cid: str, **spec_kw) -> dict:
    spec = PreprocessingSpec(channel_names=("T1",), labels=LABELS, target_spacing_mm=PRETRAIN_SPACING_MM, **spec_kw)
    data, seg, props = preprocess_training_case([raw / "imagesTr" / f"{cid}_0000.nii.gz"],
                                                raw / "labelsTr" / f"{cid}.nii.gz", spec)
    return {"data": data, "seg": seg, "props": props}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_parity")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        t1, t1_lab = _t1_case()
        raw = {
            "mni": _raw_dataset(root / "nnUNet_raw", "Dataset901_MNI", {"mni": (*_mni_case(), MNI_SPACING_MM)}),
            "t1": _raw_dataset(root / "nnUNet_raw", "Dataset902_T1",
                               {cid: (t1, t1_lab, sp) for cid, sp in T1_SPACINGS_MM.items()}),
        }
        plans = {k: _plans_like_nnssl(d.name, mp) for k, d in raw.items()}
        cases = {"mni": ("mni", "mni"), "aniso": ("t1", "aniso"), "twothick": ("t1", "twothick")}
        out = {"raw": raw, "plans": plans, "nnunet": {}, "s3d": {}}
        for case, (ds, cid) in cases.items():
            out["nnunet"][case] = _nnunet_case(raw[ds], cid, plans[ds])
            mask = plans[ds].get_configuration("3d_fullres").use_mask_for_norm[0]
            out["s3d"][case] = _s3d_case(raw[ds], cid, use_mask_for_norm=mask)
        out["s3d"]["mni_default"] = _s3d_case(raw["mni"], "mni")
        yield out


# ---- the plans: what s3d has to match ----------------------------------------------------------------
def test_like_nnssl_plans_and_the_mask_for_norm_rule(runs) -> None:
    for ds, expected_mask in (("mni", True), ("t1", False)):
        cfg = runs["plans"][ds].get_configuration("3d_fullres")
        assert cfg.spacing == PRETRAIN_SPACING_MM and cfg.normalization_schemes == ["ZScoreNormalization"]
        # images: third order in-plane, nearest along a separate axis; labels: linear, nearest along it
        assert cfg.configuration["resampling_fn_data_kwargs"] == {"is_seg": False, "order": 3, "order_z": 0,
                                                                 "force_separate_z": None}
        assert cfg.configuration["resampling_fn_seg_kwargs"] == {"is_seg": True, "order": 1, "order_z": 0,
                                                                "force_separate_z": None}
        # the planner z-scores within the nonzero mask when cropping keeps < 3/4 of the voxels (MNI: 0.47)
        assert cfg.use_mask_for_norm == [expected_mask]
        assert nnunet_use_mask_for_norm(read_dataset_json(runs["raw"][ds])) is expected_mask
        spec = PreprocessingSpec.from_dataset(read_dataset_json(runs["raw"][ds]), use_mask_for_norm="auto")
        assert spec.use_mask_for_norm is expected_mask


# ---- same shapes and crop, same image values ---------------------------------------------------------
@pytest.mark.parametrize("case", ["mni", "aniso", "twothick"])
def test_shape_crop_and_image_values_match_nnunet(runs, case) -> None:
    nn, ours = runs["nnunet"][case], runs["s3d"][case]
    assert ours["data"].shape == nn["data"].shape
    assert ours["props"]["bbox"] == nn["bbox"]
    diff = np.abs(ours["data"].astype(np.float64) - nn["data"])
    # The same numpy statistics and scipy zoom on the same float32 input: identical operations, identical
    # results on any CPU (0.0 z-score units). Tolerance 1e-5 (10 float32 ulps at the largest value,
    # ~8.4) leaves room for a scipy build that orders a sum differently.
    assert diff.max() < 1e-5, f"{case}: max |s3d - nnU-Net| = {diff.max():.3g} z-score units"
    assert (diff > 1e-3).mean() == 0.0


def test_default_zscore_over_the_whole_crop_differs_from_nnunet_masked(runs) -> None:
    """Deliberate: by default s3d z-scores over the cropped box, as nnssl's pre-training did
    (use_mask_for_norm False); nnU-Net's planner masks the MNI template (its crop keeps 0.47 < 3/4)."""
    from scipy import ndimage

    nn, ours = runs["nnunet"]["mni"]["data"][0].astype(np.float64), runs["s3d"]["mni_default"]["data"][0]
    assert ours.shape == nn.shape
    diff = np.abs(ours - nn)
    # the size of the deliberate difference (regression values of exact arithmetic; rounding moves them by
    # ~1e-6, the tolerance is 0.01): max 4.114, mean 0.937 z-score units, every voxel above 1e-3
    assert diff.max() == pytest.approx(4.114, abs=0.01) and diff.mean() == pytest.approx(0.937, abs=0.01)
    assert (diff > 1e-3).mean() > 0.999
    # inside the mask the two z-scores are one affine map apart (formula, from the raw voxels):
    # s3d = a * nnU-Net + b, a = std_mask / std_box, b = (mean_mask - mean_box) / std_box
    raw = runs["raw"]["mni"]
    img = np.asarray(nib.load(str(raw / "imagesTr" / "mni_0000.nii.gz")).dataobj, dtype=np.float64)[None]
    box = crop_to_nonzero(img)[0]
    vals, masked = box[0], box[0][nonzero_mask(box)]
    a, b = masked.std() / vals.std(), (masked.mean() - vals.mean()) / vals.std()
    assert (a, b) == pytest.approx((0.3924, 1.0465), abs=1e-3)  # float64 statistics of the template
    # after resampling, the background's difference reaches in through the cubic spline, whose prefilter
    # has infinite support (a property of the spline, not rounding): max residual 0.0175 at >= 6 voxels
    # (Euclidean) from nnU-Net's background (-1), 0.0013 at >= 10 (about 0.5x per voxel); bounds ~1.5x
    dist = ndimage.distance_transform_edt(runs["nnunet"]["mni"]["seg"] >= 0)
    for reach, tol in ((6, 0.025), (10, 0.002)):
        far = dist >= reach
        assert np.abs(ours[far] - (a * nn[far] + b)).max() < tol, reach


# ---- label maps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["aniso", "twothick"])
def test_labels_match_nnunet_without_background_region(runs, case) -> None:
    # identical (anatomical.nii has no zero background, so nnU-Net writes no -1; the same float64 label
    # interpolation)
    np.testing.assert_array_equal(runs["s3d"][case]["seg"], runs["nnunet"][case]["seg"])


def test_labels_differ_from_nnunet_only_at_its_outside_region(runs) -> None:
    """Deliberate: nnU-Net marks background outside the nonzero mask -1 before resampling, so at the
    mask's edge two background classes compete with the labels (training maps -1 to 0 afterwards);
    s3d resamples one background class."""
    nn_seg, ours = runs["nnunet"]["mni"]["seg"], runs["s3d"]["mni"]["seg"]
    differ = ours != np.where(nn_seg < 0, 0, nn_seg)
    # 1787 of 546624 voxels (0.327 %; 1.3 % of the label-boundary voxels; a property of the two label
    # rules, +-10 % allows a near-tie to move), all nnU-Net foreground (1778 GM, 9 WM) where s3d says
    # background, all within sqrt(5) voxels of nnU-Net's -1 region
    assert differ.mean() == pytest.approx(1787 / 546624, rel=0.1)
    assert (ours[differ] == 0).all() and (nn_seg[differ] > 0).all()
    from scipy import ndimage

    assert ndimage.distance_transform_edt(nn_seg >= 0)[differ].max() < 2.5  # sqrt(5) voxels
    # and that split is the whole difference: s3d's resampling with nnU-Net's -1 region reproduces it
    raw = runs["raw"]["mni"]
    img = np.asarray(nib.load(str(raw / "imagesTr" / "mni_0000.nii.gz")).dataobj, dtype=np.float32)[None]
    lab = np.asarray(nib.load(str(raw / "labelsTr" / "mni.nii.gz")).dataobj).astype(np.int16)
    cropped, cropped_lab, _ = crop_to_nonzero(img, lab)
    cropped_lab[(cropped_lab == 0) & ~nonzero_mask(cropped)] = -1
    shape = shape_for_spacing(cropped.shape[1:], MNI_SPACING_MM, PRETRAIN_SPACING_MM)
    np.testing.assert_array_equal(resample_seg(cropped_lab, shape), nn_seg)


# ---- the resampling functions alone, on seeded random volumes -------------------------------------------
@pytest.mark.parametrize("spacing, target", [((1.0, 1.0, 4.0), (1.0, 1.0, 1.0)), ((4.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
                                             ((1.0, 1.0, 1.0), (1.0, 1.0, 5.0)), ((4.0, 4.0, 1.0), (1.0, 1.0, 1.0)),
                                             ((1.5, 1.2, 2.0), (1.0, 1.0, 1.0)), ((0.5, 0.7, 0.6), (1.0, 1.0, 1.0))])
def test_resampling_functions_match_nnunet(spacing, target) -> None:
    from nnunetv2.preprocessing.resampling.default_resampling import (
        determine_do_sep_z_and_axis,
        resample_data_or_seg_to_shape,
    )

    from s3d.data.preprocess import anisotropic_axis, resample_image

    rng = np.random.default_rng(7)
    shape = (11, 12, 9)
    new_shape = shape_for_spacing(shape, spacing, target)
    image = rng.normal(size=(2, *shape)).astype(np.float32)  # white noise: the spline's worst case
    seg = rng.integers(0, 4, shape).astype(np.int16)  # four labels: many 3- and 4-way junctions and ties
    do_separate, nn_axis = determine_do_sep_z_and_axis(None, spacing, target)
    axis = anisotropic_axis(spacing, target)
    assert axis == (nn_axis if do_separate else None)
    expected = resample_data_or_seg_to_shape(image, new_shape, spacing, target, is_seg=False, order=3, order_z=0,
                                             force_separate_z=None)
    # the same scipy zoom and clipping: identical; tolerance as in the image test above
    assert np.abs(resample_image(image, new_shape, 3, axis) - expected).max() < 1e-5
    expected_seg = resample_data_or_seg_to_shape(seg[None], new_shape, spacing, target, is_seg=True, order=1,
                                                 order_z=0, force_separate_z=None)[0]
    np.testing.assert_array_equal(resample_seg(seg, new_shape, axis), expected_seg)  # the same float64 rule


def test_use_mask_for_norm_is_part_of_the_spec(tmp_path) -> None:
    spec = PreprocessingSpec(use_mask_for_norm=True)
    spec.save(tmp_path / "preprocessing.json")
    assert PreprocessingSpec.load(tmp_path / "preprocessing.json") == spec
    assert spec.cache_key() != PreprocessingSpec().cache_key()  # a masked cache is another cache
    old = PreprocessingSpec().to_dict()
    del old["use_mask_for_norm"]  # a preprocessing.json written before the field existed
    assert PreprocessingSpec.from_dict(old).use_mask_for_norm is False
    (tmp_path / "bad.json").write_text(json.dumps({**old, "use_mask_for_norm": "auto"}))
    with pytest.raises(ValueError, match=r"bad\.json.*use_mask_for_norm: expected true or false"):
        PreprocessingSpec.load(tmp_path / "bad.json")
