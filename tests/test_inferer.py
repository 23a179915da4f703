"""The sliding-window inferer object (issue 23): one set of prediction settings shared by the function, the
case and folder predictors and fine-tuning's validation; the accumulator allocates once and resumes a group.

References: explicit per-tile loops over the padded image (numpy), the function form of the same settings,
and the predictors called with the settings spelled out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest

import numpy as np
import pytest
import torch

import s3d.infer.sliding_window as sw_mod
from s3d.infer import SlidingWindowInferer, sliding_window_predict
from s3d.infer.sliding_window import TileAccumulator


@pytest.fixture(scope="module")
def conv() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Conv3d(2, 3, 3, padding=1).eval()


def _image(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_doctests() -> None:
    assert doctest.testmod(sw_mod).failed == 0


def test_settings_are_checked_once_when_made() -> None:
    for kw, name in (({"step": 0}, "step"), ({"tile_batch": 0}, "tile_batch"), ({"output": "labels"}, "output"),
                     ({"padding": "reflect"}, "padding"), ({"accumulate_limit_bytes": -1}, "accumulate_limit_bytes"),
                     ({"sigma_scale": 0}, "sigma_scale"), ({"mirror": (3,)}, "mirror axes")):
        with pytest.raises(ValueError, match=name):
            SlidingWindowInferer((16, 16, 16), **kw)
    with pytest.raises(ValueError, match="patch_size"):
        SlidingWindowInferer((16, 0, 16))
    inferer = SlidingWindowInferer(16, mirror=[2, 0])
    assert inferer.patch_size == (16, 16, 16) and inferer.mirror == (2, 0)
    assert inferer.flips() == [(), (0,), (2,), (0, 2)]


@pytest.mark.parametrize("kw", [{}, {"mirror": True, "tile_batch": 3, "step": 0.4},
                                {"gaussian": False, "output": "probabilities", "tile_batch": 1},
                                {"accumulate_limit_bytes": 1000, "mirror": (1,)}])
def test_the_function_is_the_inferer(conv, kw) -> None:
    image = _image(0, 2, 30, 17, 40)

    def moved():  # the sums do not fit the limit: a warning, then the CPU
        return pytest.warns(RuntimeWarning, match="accumulate_limit_bytes") if "accumulate_limit_bytes" in kw \
            else contextlib.nullcontext()

    with moved():
        want = sliding_window_predict(conv, image, (16, 16, 16), **kw)
    with moved():
        got = SlidingWindowInferer((16, 16, 16), **kw)(image, conv)
    assert torch.equal(got, want)


def test_tiles_padding_is_non_overlapping_tiles_of_the_end_padded_image(conv) -> None:
    """``step=1, gaussian=False, padding="tiles"``: each voxel's logits are its own tile's, the image
    zero-padded at its end to whole tiles (the reference: that loop in numpy, one tile at a time)."""
    image = _image(1, 2, 20, 40, 33)
    got = SlidingWindowInferer((16, 16, 16), step=1.0, gaussian=False, padding="tiles", tile_batch=1)(image, conv)
    padded = np.zeros((2, 32, 48, 48), np.float32)
    padded[:, :20, :40, :33] = image.numpy()
    ref = np.zeros((3, 32, 48, 48), np.float32)
    with torch.no_grad():
        for d in range(0, 32, 16):
            for h in range(0, 48, 16):
                for w in range(0, 48, 16):
                    tile = torch.from_numpy(padded[None, :, d:d + 16, h:h + 16, w:w + 16].copy())
                    ref[:, d:d + 16, h:h + 16, w:w + 16] = conv(tile)[0].numpy()
    assert got.shape == (3, 20, 40, 33)
    np.testing.assert_array_equal(got.numpy(), ref[:, :20, :40, :33])  # the same batch-of-1 computation


def test_the_sums_are_allocated_once_per_call(conv, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    allocate = TileAccumulator.allocate
    monkeypatch.setattr(TileAccumulator, "allocate", lambda self, *a: calls.append(a) or allocate(self, *a))
    SlidingWindowInferer(16, tile_batch=1)(_image(2, 2, 2, 24, 16, 24), conv)  # 2 images x 4 tile groups
    assert calls == [(2, 3, (24, 16, 24))]


def test_a_group_interrupted_half_way_resumes_after_its_added_tiles(conv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory after the first tile of a group was added: the sums move and the group goes on from its
    second tile (a tile added twice, or skipped, would change the result)."""
    image = _image(3, 2, 24, 16, 24)
    ref = sliding_window_predict(conv, image, 16, tile_batch=4, accumulate_device="cpu")
    add, failed = TileAccumulator.add, []

    def flaky(self, b, tiles, slices, weight):
        if not failed and len(slices) > 1:
            failed.append(True)
            add(self, b, tiles, slices[:1], weight)  # one tile in, then the device is full
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return add(self, b, tiles, slices, weight)

    monkeypatch.setattr(TileAccumulator, "add", flaky)
    with pytest.warns(RuntimeWarning, match=r"CUDA out of memory.*tile group 1 of 1.*on the CPU"):
        out = SlidingWindowInferer(16, tile_batch=4)(image, conv)
    assert failed and torch.equal(out, ref)


def test_predictors_take_an_inferer_or_its_settings(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict_case with an inferer gives what it gives with the same settings spelled out; both at once is an error."""
    from s3d.data.io import write_nifti
    from s3d.data.nnunet import PreprocessingSpec
    from s3d.infer import predict_case

    class Threshold(torch.nn.Module):  # class 1 where channel 0 is above its mean: logits (-4x, 4x)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([-4 * x[:, :1], 4 * x[:, :1]], dim=1)

    path = tmp_path / "c_0000.nii.gz"
    write_nifti(path, np.random.default_rng(0).normal(size=(20, 18, 22)).astype(np.float32), np.eye(4))
    spec = PreprocessingSpec(channel_names=("ct",), patch_size=(16, 16, 16))
    want = predict_case([path], Threshold(), spec, step=0.7, mirror=(0,), tile_batch=2)
    inferer = SlidingWindowInferer(spec.patch_size, step=0.7, mirror=(0,), tile_batch=2, output="probabilities")
    got = predict_case([path], Threshold(), spec, inferer=inferer)  # its output setting is not used: logits
    np.testing.assert_array_equal(got.probabilities, want.probabilities)
    np.testing.assert_array_equal(got.labels, want.labels)
    with pytest.raises(TypeError, match="an inferer or its settings, not both"):
        predict_case([path], Threshold(), spec, inferer=inferer, step=0.5)
    assert dataclasses.replace(inferer, output="logits").output == "logits"


class _Flipped(torch.nn.Module):
    """The reference's mirroring: the mean over ``flips`` of the net on the flipped tiles, flipped back (in the
    order s3d documents: no flip first), so MONAI's inferer can run it."""

    def __init__(self, net: torch.nn.Module, flips: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.net, self.flips = net, flips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [torch.flip(self.net(torch.flip(x, [a + 2 for a in f])), [a + 2 for a in f]) for f in self.flips]
        return torch.stack(ys).sum(0) / len(ys)


@pytest.mark.parametrize("mirror", [False, (0, 2), True])
def test_matches_monai_sliding_window_inferer(conv, mirror) -> None:
    """Against MONAI's ``SlidingWindowInferer`` (Gaussian blend with our importance map, 50% overlap, where the
    tile starts of both coincide: 0/16/32, 0/16, 0), mirroring done by a wrapper around the network."""
    monai_inferers = pytest.importorskip("monai.inferers")  # optional: MONAI is not a dependency
    from s3d.infer import gaussian_importance_map, mirror_axes_combinations

    image = _image(4, 1, 2, 64, 48, 32)
    inferer = SlidingWindowInferer(32, step=0.5, mirror=mirror, tile_batch=3)
    ours = inferer(image, conv)
    flips = mirror_axes_combinations((0, 1, 2) if mirror is True else mirror or ())
    theirs_inferer = monai_inferers.SlidingWindowInferer((32, 32, 32), sw_batch_size=3, overlap=0.5, mode="gaussian")
    theirs_inferer.roi_weight_map = gaussian_importance_map((32, 32, 32))
    with torch.inference_mode():
        theirs = theirs_inferer(image, _Flipped(conv, flips))
    theirs = theirs.as_tensor() if hasattr(theirs, "as_tensor") else theirs
    # each voxel: a weighted mean of at most 8 tiles' logits (each a mean of <= 8 flips); summed in another
    # order, fp32 rounding differs by at most a few eps per term: bound 4 * (8 + 8) * eps * max|logit|
    bound = 4 * 16 * torch.finfo(torch.float32).eps * float(theirs.abs().max())
    assert ours.shape == theirs.shape == (1, 3, 64, 48, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=bound)


def test_tiles_padding_matches_monai_without_overlap(conv) -> None:
    """``padding="tiles", step=1, gaussian=False`` (fine-tuning's periodic validation) is MONAI's inferer with
    no overlap and constant weights on the image zero-padded at its end to whole tiles, then cropped."""
    monai_inferers = pytest.importorskip("monai.inferers")
    image = _image(5, 1, 2, 20, 40, 33)
    ours = SlidingWindowInferer(16, step=1.0, gaussian=False, padding="tiles", tile_batch=4)(image, conv)
    padded = torch.nn.functional.pad(image, (0, 15, 0, 8, 0, 12))  # to 32 x 48 x 48
    with torch.inference_mode():
        theirs = monai_inferers.SlidingWindowInferer((16, 16, 16), sw_batch_size=4, overlap=0.0)(padded, conv)
    theirs = theirs.as_tensor() if hasattr(theirs, "as_tensor") else theirs
    # one tile per voxel, weight 1: x * 1 / 1 is exact, so only the batch (4 tiles per pass in both) matters
    torch.testing.assert_close(ours, theirs[:, :, :20, :40, :33], rtol=0, atol=0)
