"""s3d.data.synthetic (the demo data): determinism, anatomy plausibility, contrasts, lesions, nnU-Net layout."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from s3d.data.synthetic import (
    CONTRASTS,
    LESION_LABELS,
    SEQUENCE_INTENSITY,
    SPLIT_CODE,
    TISSUE_LABELS,
    AnatomyRanges,
    DemoSubject,
    ImageRanges,
    case_seed,
    make_subject,
    render_image,
    templates,
    write_demo_cohort,
    write_demo_dataset,
)

SHAPE = (40, 48, 40)  # 4 mm voxels: a whole 160 x 192 x 160 mm head, small enough for CPU tests
SPACING = 4.0
NONE = AnatomyRanges.none()  # the template itself: no size, pose, warp, atrophy, lesion or FOV factor
CLEAN = ImageRanges.none()  # mid-range intensities, no gamma, bias, noise or blur, skull-stripped


def _label_means(img: np.ndarray, lab: np.ndarray) -> dict[int, float]:
    return {k: float(img[lab == k].mean()) for k in (1, 2, 3)}


def test_same_seed_same_volume_different_seed_different() -> None:
    a = make_subject(3, "phantom", SHAPE, SPACING, lesions=(2, 5))
    b = make_subject(3, "phantom", SHAPE, SPACING, lesions=(2, 5))
    c = make_subject(4, "phantom", SHAPE, SPACING, lesions=(2, 5))
    np.testing.assert_array_equal(a.tissue_pv, b.tissue_pv)
    np.testing.assert_array_equal(a.lesion_pv, b.lesion_pv)
    np.testing.assert_array_equal(render_image(a, "FLAIR", 1), render_image(b, "FLAIR", 1))
    assert not np.array_equal(a.tissue_labels(), c.tissue_labels())
    assert not np.array_equal(render_image(a, "FLAIR", 1), render_image(a, "FLAIR", 2))


def test_written_dataset_is_byte_identical_per_seed(tmp_path) -> None:
    kw = dict(task="lesion", num_train=2, num_test=1, shape=(32, 32, 32), spacing_mm=5.0, progress=False)
    write_demo_dataset(tmp_path / "a", seed=5, **kw)
    write_demo_dataset(tmp_path / "b", seed=5, **kw)
    write_demo_dataset(tmp_path / "c", seed=6, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert len(files) == 2 * 2 + 2 + 1 * 2 + 1
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


def test_adding_cases_keeps_existing_ones(tmp_path) -> None:
    kw = dict(num_test=0, shape=(32, 32, 32), spacing_mm=5.0, progress=False)
    write_demo_dataset(tmp_path / "small", num_train=1, **kw)
    write_demo_dataset(tmp_path / "big", num_train=3, **kw)
    rel = "imagesTr/demo_000_0000.nii.gz"
    assert (tmp_path / "small" / rel).read_bytes() == (tmp_path / "big" / rel).read_bytes()


def _check_tissue(subj: DemoSubject, ranges: dict[int, tuple[float, float]]) -> None:
    lab = subj.tissue_labels()
    assert lab.dtype == np.uint8 and set(np.unique(lab).tolist()) <= {0, 1, 2, 3}
    brain = lab > 0
    n = brain.sum()
    # the brain fits in the grid: (almost) nothing labelled on the border faces
    for axis in range(3):
        assert brain.take([0, -1], axis=axis).sum() < 0.005 * n
    pv = subj.tissue_pv
    for k, (lo, hi) in ranges.items():
        hard = float((lab == k).sum() / n)
        assert lo < hard < hi, (k, hard)
        if k >= 2:  # GM, WM: the hard labels agree with the partial-volume totals they come from
            soft = float(pv[k - 1].sum() / pv.sum())  # (CSF is a thin rim that argmax under-counts)
            assert abs(hard - soft) < 0.15, (k, hard, soft)
    # brain volume of an adult brain: 1.0-1.8 litres
    litres = n * np.prod(subj.spacing_mm) / 1e6
    assert 0.9 < litres < 1.9, litres


def test_phantom_tissue_fractions_are_plausible() -> None:
    subj = make_subject(0, "phantom", SHAPE, SPACING, ranges=NONE)
    _check_tissue(subj, {1: (0.03, 0.30), 2: (0.15, 0.60), 3: (0.30, 0.75)})


def test_contrasts_order_tissues_like_mri() -> None:
    subj = make_subject(1, "phantom", SHAPE, SPACING, ranges=NONE)
    lab = subj.tissue_labels()
    means = {c: _label_means(render_image(subj, c, 0, CLEAN), lab) for c in CONTRASTS}
    t1, t2, fl, pd = means["T1"], means["T2"], means["FLAIR"], means["PD"]
    assert t1[3] > t1[2] > t1[1]  # T1: WM bright, CSF dark
    assert t2[1] > t2[2] > t2[3]  # T2: CSF bright
    assert fl[2] > fl[3] > fl[1]  # FLAIR: CSF suppressed
    assert pd[2] > pd[3]  # PD: low contrast, GM above WM
    img = render_image(subj, "T1", 0, skull_strip_prob=1.0)
    assert img.dtype == np.int16 and img.min() >= 0
    assert (img[subj.brain_fraction < 0.05] == 0).all()  # skull-stripped: zero outside the brain
    assert (img[lab == 0] == 0).mean() > 0.8  # ... apart from a partial-volume rim


def test_clean_render_is_the_partial_volume_formula() -> None:
    """Without gamma, bias, noise and blur, a voxel is sum_k fraction_k * intensity_k (x 1000, rounded)."""
    subj = make_subject(4, "phantom", SHAPE, SPACING, ranges=NONE)
    for contrast in CONTRASTS:
        mu = [sum(r) / 2 for r in SEQUENCE_INTENSITY[contrast][:3]]
        expect = (subj.tissue_pv * np.asarray(mu, np.float32)[:, None, None, None]).sum(0) * 1000.0
        expect = np.where(subj.brain_fraction > 0.05, np.round(expect), 0)
        got = render_image(subj, contrast, 0, CLEAN).astype(np.float64)
        assert np.abs(got - expect).max() <= 1.0, contrast  # float32 rounding of x.5 values: at most 1 unit


def test_each_subject_gets_its_own_contrast_within_the_ranges() -> None:
    subj = make_subject(5, "phantom", SHAPE, SPACING, ranges=NONE)
    wm = (subj.tissue_pv[2] > 0.99) & (subj.lesion_pv == 0)
    plain = ImageRanges(gamma=(1.0, 1.0), bias=(0.0, 0.0), noise=(0.0, 0.0), thick_slice_prob=0.0,
                        lowres_prob=0.0, skull_strip_prob=1.0, texture=(0.0, 0.0))
    lo, hi = SEQUENCE_INTENSITY["T1"][2]
    values = [float(render_image(subj, "T1", seed, plain)[wm].mean()) / 1000.0 for seed in range(8)]
    assert all(lo - 1e-3 <= v <= hi + 1e-3 for v in values), values  # pure WM voxels: WM's drawn intensity
    assert max(values) - min(values) > 0.25 * (hi - lo), values  # ... and it varies between images


def test_skull_and_scalp_appear_unless_skull_stripped() -> None:
    subj = make_subject(6, "phantom", SHAPE, SPACING, ranges=NONE)
    head = subj.head_pv.sum(0) > 0.5
    assert head.sum() > 0.2 * (subj.brain_fraction > 0.5).sum()  # a shell of 11 mm around the brain
    assert (subj.tissue_labels()[head] == 0).all()  # skull and scalp are background
    stripped = render_image(subj, "T1", 0, CLEAN)
    full = render_image(subj, "T1", 0, CLEAN, skull_strip_prob=0.0)
    assert (stripped[subj.head_pv.sum(0) > 0.95] == 0).all()  # (partial-volume voxels keep their brain part)
    mu = np.asarray([sum(r) / 2 for r in SEQUENCE_INTENSITY["T1"]], np.float32)  # CLEAN: mid-range values
    expect = (subj.tissue_pv * mu[:3, None, None, None]).sum(0) + (subj.head_pv * mu[4:, None, None, None]).sum(0)
    assert np.abs(full - np.round(expect * 1000.0)).max() <= 1.0  # skull dark, scalp (fat) bright on T1
    assert full[subj.head_pv[1] > 0.5].mean() > full[subj.head_pv[0] > 0.5].mean()  # 4 mm voxels mix them


def test_head_scale_scales_the_intracranial_volume_by_its_cube() -> None:
    """Only the size factor differs: the intracranial volume scales with head_scale^3 (partial volumes summed)."""
    vols = {}
    for scale in (0.9, 1.1):
        r = replace(NONE, head_scale=(scale, scale))
        vols[scale] = float(make_subject(0, "phantom", SHAPE, SPACING, ranges=r).brain_fraction.sum())
    # the 1 mm CSF rim and the fixed 2 mm edge softness do not scale: ratio 1.790 vs (1.1/0.9)^3 = 1.826
    # (geometry of the phantom, not rounding: identical on every CPU to ~1e-6)
    assert vols[1.1] / vols[0.9] == pytest.approx((1.1 / 0.9) ** 3, rel=0.04)


def test_atrophy_and_ventricles_turn_tissue_into_csf() -> None:
    def csf_and_tissue(**kw: tuple[float, float]) -> tuple[float, float, float]:
        s = make_subject(0, "phantom", SHAPE, SPACING, ranges=replace(NONE, **kw))
        return float(s.tissue_pv[0].sum()), float(s.tissue_pv[1:].sum()), float(s.brain_fraction.sum())

    csf0, tis0, icv0 = csf_and_tissue()
    csf1, tis1, icv1 = csf_and_tissue(atrophy=(0.06, 0.06))
    # the brain shrinks by 1.06^-3 inside the same skull; the intracranial volume does not change
    assert icv1 == pytest.approx(icv0, rel=1e-3)
    assert tis1 / tis0 == pytest.approx(1.06**-3, rel=0.03)  # 0.847 vs 0.840 (geometry, as above)
    assert csf1 - csf0 == pytest.approx(tis0 - tis1, rel=1e-3)
    csf2, tis2, icv2 = csf_and_tissue(ventricle_dilation_mm=(3.0, 3.0))
    assert icv2 == pytest.approx(icv0, rel=1e-3)
    assert csf2 - csf0 == pytest.approx(tis0 - tis2, rel=1e-3) and csf2 > 1.05 * csf0  # +9 % (geometry)


def test_cohort_subjects_vary_in_anatomy() -> None:
    subjects = [make_subject(case_seed(0, "train", i), "phantom", SHAPE, SPACING) for i in range(8)]
    icv = np.array([s.brain_fraction.sum() for s in subjects])
    csf = np.array([s.tissue_pv[0].sum() / s.brain_fraction.sum() for s in subjects])
    assert icv.std() / icv.mean() > 0.08  # head size: a CV of ~0.1 (the template's is 0)
    assert csf.max() - csf.min() > 0.05  # CSF share of the intracranial volume differs by > 5 points
    assert len({s.info["ventricle_dilation_mm"] for s in subjects}) == 8


def test_a_cut_field_of_view_has_no_label_and_no_signal() -> None:
    r = replace(NONE, fov_crop_prob=1.0, fov_crop_mm=(30.0, 30.0))
    subj = make_subject(3, "phantom", SHAPE, SPACING, ranges=r)
    axis, end, mm = subj.info["fov_cut"]
    n = int(round(mm / SPACING))
    assert n == 8  # 30 mm at 4 mm
    cut = [slice(None)] * 3
    cut[axis] = slice(0, n) if end == 0 else slice(SHAPE[axis] - n, SHAPE[axis])
    assert (subj.tissue_labels()[tuple(cut)] == 0).all()
    assert (render_image(subj, "T2", 1, skull_strip_prob=0.0)[tuple(cut)] == 0).all()


def test_splits_never_share_a_subject() -> None:
    seeds = {tuple(case_seed(s, split, i)) for s in (0, 1) for split in SPLIT_CODE for i in range(50)}
    assert len(seeds) == 2 * len(SPLIT_CODE) * 50


def test_lesions_inside_brain_and_hyperintense_on_flair() -> None:
    subj = make_subject(2, "phantom", SHAPE, SPACING, ranges=NONE, lesions=(4, 8))
    les = subj.lesion_mask()
    lab = subj.tissue_labels()
    assert set(np.unique(les).tolist()) == {0, 1}
    assert (lab[les == 1] > 0).all()  # inside the brain
    assert (lab[les == 1] >= 2).mean() > 0.95  # in parenchyma (GM/WM), not CSF
    wm_only = (lab == 3) & (les == 0)
    flair = render_image(subj, "FLAIR", 0, CLEAN).astype(np.float64)
    t1 = render_image(subj, "T1", 0, CLEAN).astype(np.float64)
    assert flair[les == 1].mean() > 1.5 * flair[wm_only].mean()
    assert t1[les == 1].mean() < t1[wm_only].mean()
    assert (subj.lesion_pv <= subj.tissue_pv[1:].sum(0) + 1e-6).all()  # lesion fraction within GM + WM


def test_thick_slices_blur_along_one_axis() -> None:
    subj = make_subject(0, "phantom", SHAPE, SPACING, ranges=NONE)
    sharp = render_image(subj, "T1", 0, CLEAN).astype(np.float64)
    thick = render_image(subj, "T1", 0, CLEAN, thick_slice_prob=1.0, thick_slice_factor=(3.0, 3.0))
    thick = thick.astype(np.float64)
    ratio = [np.abs(np.diff(thick, axis=a)).sum() / np.abs(np.diff(sharp, axis=a)).sum() for a in range(3)]
    assert min(ratio) < 0.85, ratio  # detail lost along the thick axis
    assert max(ratio) > 0.9, ratio  # in-plane detail mostly kept


def test_anisotropic_spacing_sets_affine_and_fov(tmp_path) -> None:
    write_demo_dataset(tmp_path, num_train=1, num_test=0, shape=(40, 48, 16), spacing_mm=(4.0, 4.0, 10.0),
                       progress=False)
    img = nib.load(str(tmp_path / "imagesTr" / "demo_000_0000.nii.gz"))
    assert img.header.get_zooms() == pytest.approx((4.0, 4.0, 10.0))
    np.testing.assert_allclose(np.diag(img.affine)[:3], [4.0, 4.0, 10.0])


def _validate_nnunet_raw(ds: Path) -> dict:
    """Independent check of the nnU-Net v2 raw layout, following nnU-Net's documented rules."""
    meta = json.loads((ds / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        assert key in meta, key
    ending = meta["file_ending"]
    channels = sorted(int(c) for c in meta["channel_names"])
    assert channels == list(range(len(channels)))
    label_values = set(meta["labels"].values())
    assert label_values == set(range(len(label_values)))
    cases = sorted(p.name[: -len(ending)] for p in (ds / "labelsTr").glob(f"*{ending}"))
    assert len(cases) == meta["numTraining"]
    for split_img, split_lab in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for lab_path in sorted((ds / split_lab).glob(f"*{ending}")):
            case = lab_path.name[: -len(ending)]
            lab = nib.load(str(lab_path))
            assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= label_values, lab_path
            for c in channels:
                img = nib.load(str(ds / split_img / f"{case}_{c:04d}{ending}"))
                assert img.shape == lab.shape
                np.testing.assert_allclose(img.affine, lab.affine)
    # images without labels do not exist
    imgs = {p.name[: -len(ending) - 5] for p in (ds / "imagesTr").glob(f"*{ending}")}
    assert imgs == set(cases)
    return meta


def test_cohort_is_a_valid_nnunet_raw_dataset(tmp_path) -> None:
    cohort = write_demo_cohort(tmp_path, task="lesion", num_train=3, num_test=2, num_unlabelled=3,
                               shape=(32, 40, 32), spacing_mm=5.0, progress=False)
    assert cohort.dataset_dir == tmp_path / "Dataset901_DemoLesion"
    meta = _validate_nnunet_raw(cohort.dataset_dir)
    assert meta["labels"] == LESION_LABELS and meta["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert cohort.train_cases == ["demo_000", "demo_001", "demo_002"]
    assert len(list((cohort.dataset_dir / "imagesTs").glob("*.nii.gz"))) == 2 * 2
    assert len(cohort.unlabelled_files) == 3 and all(p.exists() for p in cohort.unlabelled_files)
    for p in cohort.unlabelled_files:
        assert p.name.split("_")[-1][: -len(".nii.gz")] in CONTRASTS
        assert nib.load(str(p)).shape == (32, 40, 32)
    for case in cohort.train_cases:  # every lesion-task training case has lesions
        lab = np.asarray(nib.load(str(cohort.dataset_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
        assert lab.sum() > 0
    tissue = write_demo_cohort(tmp_path, task="tissue", num_train=1, num_test=0, num_unlabelled=0,
                               shape=(32, 40, 32), spacing_mm=5.0, progress=False)
    assert _validate_nnunet_raw(tissue.dataset_dir)["labels"] == TISSUE_LABELS
    assert tissue.unlabelled_dir is None


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="source"):
        make_subject(0, "ct", SHAPE, SPACING)
    with pytest.raises(ValueError, match="spacing_mm"):
        make_subject(0, "phantom", SHAPE, (1.0, 2.0))
    with pytest.raises(ValueError, match="contrast"):
        render_image(make_subject(0, "phantom", (16, 16, 16), 10.0), "CT", 0)
    with pytest.raises(ValueError, match="task"):
        write_demo_dataset("unused", task="tumour", progress=False)


def test_mni_without_nilearn_names_the_extra(monkeypatch) -> None:
    templates._mni_maps.cache_clear()
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes `import nilearn` fail
    with pytest.raises(ImportError, match=r"s3d\[demo\]"):
        make_subject(0, "mni", SHAPE, SPACING)
    templates._mni_maps.cache_clear()


def test_mni_tissue_fractions_and_brain_shape() -> None:
    pytest.importorskip("nilearn")
    subj = make_subject(0, "mni", SHAPE, SPACING, ranges=NONE, lesions=(3, 6))
    # the template's brain mask plus a 1 mm CSF rim: ventricles, sulci and a thin outer layer of CSF
    _check_tissue(subj, {1: (0.03, 0.30), 2: (0.30, 0.70), 3: (0.20, 0.55)})
    les = subj.lesion_mask()
    lab = subj.tissue_labels()
    assert les.sum() > 0 and (lab[les == 1] > 0).all()
    flair = render_image(subj, "FLAIR", 0).astype(np.float64)
    assert flair[les == 1].mean() > flair[(lab == 3) & (les == 0)].mean()
    # with every factor on, CSF is learnable at demo resolution (it was 1 % of the voxels before the rim,
    # atrophy and ventricle factors): 17-27 % over 8 subjects at 3.5 mm (anatomy, not rounding)
    fractions = []
    for i in range(4):
        lab = make_subject(case_seed(0, "train", i), "mni", (48, 56, 48), 3.5).tissue_labels()
        fractions.append(float((lab == 1).sum() / (lab > 0).sum()))
    assert min(fractions) > 0.08, fractions


def test_mni_t1_matches_the_real_template() -> None:
    """Without warping, the T1 rendered from tissue maps correlates with the template's own T1."""
    pytest.importorskip("nilearn")
    ndimage = pytest.importorskip("scipy.ndimage")
    from nilearn import datasets

    subj = make_subject(0, "mni", SHAPE, SPACING, ranges=NONE)
    ours = render_image(subj, "T1", 0, CLEAN)
    tmpl = nib.load(datasets.MNI152_FILE_PATH)
    t1 = np.asarray(tmpl.dataobj, dtype=np.float32)
    t1 = ndimage.uniform_filter(t1, size=4)  # to ~4 mm like our grid
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), 0).reshape(3, -1)
    # the template is drawn at TEMPLATE_SIZE (0.92) of its own size: grid mm / 0.92 = template mm
    world = (subj.affine[:3, :3] @ ijk + subj.affine[:3, 3:4]) / templates.TEMPLATE_SIZE["mni"]
    world = world + templates.MNI_CENTER_MM[:, None]
    vox = np.linalg.inv(tmpl.affine)[:3, :3] @ world + np.linalg.inv(tmpl.affine)[:3, 3:4]
    ref = ndimage.map_coordinates(t1, vox, order=1).reshape(SHAPE)
    brain = subj.tissue_labels() > 0
    r = np.corrcoef(ours[brain].astype(np.float64), ref[brain].astype(np.float64))[0, 1]
    assert r > 0.8, r


def test_example_script_runs_quick(tmp_path, monkeypatch, capsys) -> None:
    """examples/demo_data.py --quick (as CI runs every example) writes both datasets and a preview."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "examples" / "demo_data.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert "preview:" in capsys.readouterr().out
    for name in ("Dataset900_DemoTissue", "Dataset901_DemoLesion"):
        _validate_nnunet_raw(tmp_path / name)
    preview = np.asarray(Image.open(tmp_path / "preview.png").convert("L"), dtype=np.float32)
    assert preview.std() > 10
