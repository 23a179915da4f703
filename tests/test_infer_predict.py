"""NIfTI in, NIfTI out: predict_case / predict_folder / ``s3d predict`` with geometry checks."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tolerance import EPS32, assert_yardstick

import s3d
from s3d.cli import main as cli_main
from s3d.data.nnunet import PreprocessingSpec, preprocess_case, restore_geometry
from s3d.hub import save_pretrained
from s3d.infer import (
    CaseError,
    check_case_files,
    find_cases,
    predict_case,
    predict_folder,
    scan_input_folder,
    sliding_window_predict,
)

pytest.importorskip("scipy")  # resampling in preprocess_case

#: |sum of K <= 3 float32 softmax probabilities - 1| <= (2K + 1) u (u = 2^-24: exp, the K-term sum, the
#: divisions), and resampling them back to the input grid mixes <= 64 taps whose weights sum to 1
#: (<= 64 u more): < 80 u = 4.8e-6
PROB_SUM_ATOL = 80 * EPS32 / 2


def _header_atol(affine: np.ndarray) -> float:
    """NIfTI stores the affine in float32 (srow, or a quaternion and the zooms): each entry rounded once,
    the rotation rebuilt from a quaternion with a few roundings more; 8 eps32 x max |entry|."""
    return 8 * EPS32 * float(np.abs(affine).max())


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A rotated, flipped, shifted affine with the given voxel spacing (mm)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, -1.0]])
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing)
    a[:3, 3] = (-12.5, 30.0, 7.25)
    return a


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header["descrip"] = b"s3d test input"
    nib.save(img, str(path))


class Threshold(torch.nn.Module):
    """Class 1 where channel 0 is above its (z-scored) mean: logits (-4x, 4x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-4 * x[:, :1], 4 * x[:, :1]], dim=1)


def _box_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    image = np.zeros((12, 40, 36), np.float32)
    inside = (slice(1, 11), slice(4, 36), slice(4, 32))  # nonzero bounding box
    image[inside] = 1.0 + 0.1 * rng.random((10, 32, 28))
    box = np.zeros(image.shape, bool)
    box[3:7, 10:22, 8:20] = True
    image[box] = 5.0
    return image, box, inside


def test_anisotropic_case_comes_back_on_the_input_grid(tmp_path: Path) -> None:
    image, box, inside = _box_case(np.random.default_rng(0))
    affine = _affine((4.0, 1.0, 1.0))  # thick axis 0: anisotropic (ratio 4 > 3)
    path = tmp_path / "aniso_0000.nii.gz"
    _write(path, image, affine)
    spec = PreprocessingSpec(channel_names=("ct",), patch_size=(32, 32, 32))
    x, props = preprocess_case([path], spec)
    assert x.shape == (1, 40, 32, 28) and props["separate_axis"] == 0  # cropped, resampled to 1 mm

    out, probs_path = tmp_path / "out" / "aniso.nii.gz", tmp_path / "out" / "aniso.npz"
    pred = predict_case([path], Threshold(), spec, output_path=out, probabilities_path=probs_path)
    assert pred.labels.shape == image.shape and pred.probabilities.shape == (2, *image.shape)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=PROB_SUM_ATOL)
    # the box comes back where it was: geometry not flipped, shifted or transposed
    dice = 2 * (pred.labels.astype(bool) & box).sum() / (pred.labels.astype(bool).sum() + box.sum())
    assert dice > 0.95
    outside = np.ones(image.shape, bool)
    outside[inside] = False
    assert (pred.labels[outside] == 0).all()

    written = nib.load(str(out))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, affine, atol=_header_atol(affine))
    np.testing.assert_array_equal(written.header.get_zooms(), (4.0, 1.0, 1.0))  # exact in float32
    assert written.header["descrip"].tobytes().rstrip(b"\0") == b"s3d test input"
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    np.testing.assert_array_equal(np.asarray(written.dataobj), pred.labels)
    with np.load(probs_path) as z:
        np.testing.assert_allclose(z["probabilities"], pred.probabilities)
        np.testing.assert_array_equal(z["labels"], [0, 1])


def test_one_voxel_thick_input_file_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "slice_0000.nii.gz"
    _write(path, np.random.default_rng(0).random((32, 32, 1)), _affine((1.0, 1.0, 1.0)))
    spec = PreprocessingSpec(channel_names=("ct",), patch_size=(32, 32, 32))
    with pytest.raises(ValueError, match=r"slice_0000\.nii\.gz.*1 voxel thick along axis 2"):
        predict_case([path], Threshold(), spec)


def test_find_cases_reports_every_problem(tmp_path: Path) -> None:
    img = np.ones((4, 4, 4))
    for name in ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "noindex.nii.gz", "c_0002.nii.gz"]:
        _write(tmp_path / name, img, np.eye(4))
    with pytest.raises(ValueError, match="5 problem") as err:
        find_cases(tmp_path, num_channels=2)
    msg = str(err.value)
    assert "b_0001.nii.gz: missing channel file" in msg
    assert "noindex.nii.gz: name must be" in msg
    assert "c_0002.nii.gz: channel 2" in msg
    assert "c_0000.nii.gz: missing channel file" in msg and "c_0001.nii.gz: missing channel file" in msg
    # per case: the usable case is kept, each bad one is listed under its case
    scan = scan_input_folder(tmp_path, 2)
    assert scan.cases == {"a": [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"]}
    assert sorted((f.case or "", Path(f.file).name) for f in scan.problems) == [
        ("", "noindex.nii.gz"), ("b", "b_0001.nii.gz"), ("c", "c_0000.nii.gz"), ("c", "c_0001.nii.gz"),
        ("c", "c_0002.nii.gz")]
    (tmp_path / "noindex.nii.gz").unlink()
    (tmp_path / "c_0002.nii.gz").unlink()
    (tmp_path / "b_0000.nii.gz").unlink()
    assert find_cases(tmp_path, 2) == {"a": [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"]}
    # .nii is read next to .nii.gz; other files are listed as ignored, hidden ones skipped
    _write(tmp_path / "d_0000.nii", img, np.eye(4))
    _write(tmp_path / "d_0001.nii.gz", img, np.eye(4))
    (tmp_path / "README.md").write_text("x")
    (tmp_path / ".DS_Store").write_text("x")
    scan = scan_input_folder(tmp_path, 2)
    assert scan.cases["d"] == [tmp_path / "d_0000.nii", tmp_path / "d_0001.nii.gz"]
    assert scan.ignored == [tmp_path / "README.md"] and scan.problems == []
    (tmp_path / "a_0000.nii.gz").unlink()
    (tmp_path / "a_0001.nii.gz").unlink()
    (tmp_path / "d_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"(?s)no usable case.*d_0001\.nii\.gz: missing channel file"):
        scan_input_folder(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        scan_input_folder(tmp_path / "nope", 2)


def test_check_case_files_names_the_file_and_the_header_problem(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    good = tmp_path / "g_0000.nii.gz"
    _write(good, rng.random((6, 7, 8)), _affine((1.0, 2.0, 3.0)))
    (h,) = check_case_files([good])
    assert h.shape == (6, 7, 8) and h.spacing_mm == pytest.approx((1.0, 2.0, 3.0))
    other = tmp_path / "g_0001.nii.gz"
    _write(other, rng.random((6, 7, 9)), _affine((1.0, 2.0, 3.0)))
    with pytest.raises(CaseError, match=r"shape \(6, 7, 9\) differs from g_0000\.nii\.gz's \(6, 7, 8\)") as err:
        check_case_files([good, other])
    assert err.value.file == str(other)
    four = tmp_path / "f_0000.nii.gz"
    _write(four, rng.random((6, 7, 8, 1)), np.eye(4))
    with pytest.raises(CaseError, match="is a 4D image"):
        check_case_files([four])


@pytest.mark.numerical
@pytest.mark.parametrize("value", [0.0, 3.3, 1000.0])
def test_constant_channel_becomes_zero_with_a_note(tmp_path: Path, model_dir: Path, value: float) -> None:
    # before: value 0 and 1000 raised mid-batch (std exactly 0), 3.3 was z-scored with its float32
    # rounding std (5e-7) into a channel of 1.0 everywhere; now every constant channel is 0, as documented
    rng = np.random.default_rng(3)
    ch0 = rng.normal(size=(20, 24, 28)) + 4.0  # nonzero everywhere: no crop
    paths = [tmp_path / "k_0000.nii.gz", tmp_path / "k_0001.nii.gz"]
    _write(paths[0], ch0, np.eye(4))
    _write(paths[1], np.full(ch0.shape, value), np.eye(4))
    model = s3d.hub.load_pretrained(model_dir, in_channels=None, num_classes=None).eval()
    spec = PreprocessingSpec(target_spacing_mm=(1.0, 1.0, 1.0), channel_names=("t1", "t2"),
                             labels={"background": 0, "a": 1, "b": 2}, patch_size=(32, 32, 32))
    pred = predict_case(paths, model, spec, mirror=False)
    assert pred.notes == ["channel 1 (t2, k_0001.nii.gz) is constant inside the nonzero crop: set to 0 (the "
                          "z-scored mean) instead of z-scored"]
    # reference: channel 0 z-scored in float64 by hand, channel 1 zeros; same grid (1 mm in and out)
    # The truth: z-score and network in float64 (one tile: the image is smaller than the patch, padded
    # symmetrically as the sliding window does). Yardstick: the same by hand in float32.
    def by_hand(dtype: type) -> np.ndarray:
        c0 = ch0.astype(np.float32).astype(dtype)
        x = np.stack([(c0 - c0.mean()) / c0.std(), np.zeros_like(c0)])
        pad = [(0, 0)] + [((32 - n) // 2, 32 - n - (32 - n) // 2) for n in x.shape[1:]]
        net = copy.deepcopy(model).to(torch.float64 if dtype is np.float64 else torch.float32)
        with torch.no_grad():
            logits = net(torch.from_numpy(np.pad(x, pad))[None])[0]
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pad[1:], x.shape[1:], strict=True))
        return torch.softmax(logits[(slice(None), *crop)], 0).double().numpy()

    truth = by_hand(np.float64)
    assert_yardstick(float(np.abs(pred.probabilities - truth).max()), float(np.abs(by_hand(np.float32) - truth).max()),
                     "probabilities")
    with pytest.raises(ValueError, match="channel 1 is constant"):  # training keeps raising for it
        preprocess_case(paths, spec)


def test_mirror_is_on_by_default_as_in_nnunet(tmp_path: Path, model_dir: Path) -> None:
    rng = np.random.default_rng(4)
    paths = [tmp_path / f"m_{c:04d}.nii.gz" for c in range(2)]
    for p in paths:
        _write(p, rng.normal(size=(32, 32, 32)) + 2.0, np.eye(4))
    model = s3d.hub.load_pretrained(model_dir, in_channels=None, num_classes=None).eval()
    spec = PreprocessingSpec(target_spacing_mm=(1.0, 1.0, 1.0), channel_names=("t1", "t2"),
                             labels={"background": 0, "a": 1, "b": 2}, patch_size=(32, 32, 32))
    x, _ = preprocess_case(paths, spec)
    t = torch.from_numpy(x)[None]
    with torch.no_grad():  # nnU-Net's rule: the mean of the logits over all 8 flips of the 3 axes
        flips = [f for k in range(4) for f in itertools.combinations((2, 3, 4), k)]
        logits = sum(torch.flip(model(torch.flip(t, f)), f) if f else model(t) for f in flips) / 8
        model64, t64 = copy.deepcopy(model).double(), t.double()
        logits64 = sum(torch.flip(model64(torch.flip(t64, f)), f) if f else model64(t64) for f in flips) / 8
    ref, truth = torch.softmax(logits[0], 0).numpy(), torch.softmax(logits64[0], 0).numpy()
    # the Gaussian-weighted float32 tile sums vs float64; yardstick: the direct float32 average
    got = predict_case(paths, model, spec).probabilities
    assert_yardstick(float(np.abs(got - truth).max()), float(np.abs(ref - truth).max()), "mirrored probabilities")
    plain = predict_case(paths, model, spec, mirror=False).probabilities
    # the default is not the unmirrored prediction (0.92 apart: a property of the network, not rounding)
    assert np.abs(plain - ref).max() > 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = s3d.build_resenc_unet("tiny", in_channels=2, num_classes=3)
    save_pretrained(net, d)
    PreprocessingSpec(target_spacing_mm=(1.5, 1.5, 1.5), channel_names=("t1", "t2"),
                      labels={"background": 0, "a": 1, "b": 2}, patch_size=(32, 32, 32)).save(
        d / "preprocessing.json")
    return d


def _dataset(root: Path) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    rng = np.random.default_rng(1)
    cases = {"iso": ((40, 36, 30), _affine((1.0, 1.0, 1.0))),      # smaller than the patch at 1.5 mm
             "aniso": ((10, 50, 44), _affine((5.0, 1.2, 1.2)))}    # anisotropic, larger than the patch
    root.mkdir(parents=True, exist_ok=True)
    for case, (shape, affine) in cases.items():
        for c in range(2):
            _write(root / f"{case}_{c:04d}.nii.gz", rng.normal(size=shape) + 3 * c, affine)
    return cases


def test_predict_folder_and_cli(tmp_path: Path, model_dir: Path) -> None:
    cases = _dataset(tmp_path / "in")
    written = predict_folder(tmp_path / "in", tmp_path / "out", model_dir, device="cpu", mirror=False,
                             save_probabilities=True, progress=False)
    assert sorted(p.name for p in written) == ["aniso.nii.gz", "iso.nii.gz"]
    model = s3d.hub.load_pretrained(model_dir, in_channels=None, num_classes=None)
    spec = PreprocessingSpec.load(model_dir / "preprocessing.json")
    for case, (shape, affine) in cases.items():
        out = nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert out.shape == shape
        np.testing.assert_allclose(out.affine, affine, atol=_header_atol(affine))
        labels = np.asarray(out.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        with np.load(tmp_path / "out" / f"{case}.npz") as z:
            probs = z["probabilities"]
        assert probs.shape == (3, *shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=PROB_SUM_ATOL)
        np.testing.assert_array_equal(probs.argmax(0), labels)
        # the same steps by hand
        paths = [tmp_path / "in" / f"{case}_{c:04d}.nii.gz" for c in range(2)]
        x, props = preprocess_case(paths, spec)
        p = sliding_window_predict(model, torch.from_numpy(x), (32, 32, 32), output="probabilities")
        # the same computation as predict_folder's, step by step: identical on any CPU
        np.testing.assert_array_equal(restore_geometry(p.numpy(), props), probs)

    rc = cli_main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "cli"), "-m", str(model_dir),
                   "--device", "cpu", "--tile-batch", "2", "--no-progress", "--no-mirror"])
    assert rc == 0
    for case in cases:
        a = np.asarray(nib.load(str(tmp_path / "cli" / f"{case}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "out" / f"{case}.nii.gz")).dataobj)
        assert (a == b).mean() > 0.999  # tile batching changes only float rounding
        assert not (tmp_path / "cli" / f"{case}.npz").exists()


def test_cli_reports_bad_input_and_mismatched_model(tmp_path: Path, model_dir: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "x_0000.nii.gz", np.ones((8, 8, 8)), np.eye(4))
    rc = cli_main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "-m", str(model_dir),
                   "--device", "cpu", "--no-progress"])
    assert rc == 1
    assert "x_0001.nii.gz: missing channel file" in capsys.readouterr().err

    bad = tmp_path / "bad_model"
    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=1, num_classes=3), bad)
    (bad / "preprocessing.json").write_bytes((model_dir / "preprocessing.json").read_bytes())
    with pytest.raises(ValueError, match="takes 1 channel"):
        predict_folder(tmp_path / "in", tmp_path / "o", bad, device="cpu", progress=False)
    assert cli_main(["predict", "-i", "x", "-o", "y", "-m", str(model_dir), "--step", "0"]) == 2
