"""Sliding-window prediction on tensors, checked against formulas and a slow explicit reference."""

from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from tolerance import EPS32, EPS_BF16, assert_yardstick, max_rel

import s3d
from s3d.infer import gaussian_importance_map, mirror_axes_combinations, sliding_window_predict, tile_starts


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return s3d.build_resenc_unet("tiny", in_channels=2, num_classes=3).eval()


@pytest.fixture(scope="module")
def net64(net) -> torch.nn.Module:
    """The same network in float64: with ``_reference`` it gives the truth the float32 results are judged by."""
    return copy.deepcopy(net).double()


def _forward(net: torch.nn.Module, x: np.ndarray, amp: torch.dtype | None = None) -> np.ndarray:
    """One forward pass of ``net`` (its own dtype; ``amp``: under CPU autocast), as float64 numpy."""
    dtype = next(net.parameters()).dtype
    device = next(net.parameters()).device
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        return net(torch.from_numpy(x).to(device, dtype)).float().cpu().numpy().astype(np.float64)


def _gaussian_np(patch: tuple[int, ...], sigma_scale: float = 1 / 8) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in patch], indexing="ij")
    r2 = sum((g - (n - 1) / 2) ** 2 / (2 * (sigma_scale * n) ** 2) for g, n in zip(grids, patch, strict=True))
    return np.exp(-r2)


def _reference(net, image: np.ndarray, patch: tuple[int, int, int], starts_per_axis,
               flips=((),), amp: torch.dtype | None = None) -> np.ndarray:
    """Slow sliding window: one tile at a time, numpy float64 accumulation. With ``net64`` it is the
    truth; with the float32 ``net`` it is the plain float32 computation (the yardstick)."""
    k = net.config.num_classes
    w = _gaussian_np(patch)
    acc = np.zeros((k, *image.shape[1:]))
    wsum = np.zeros(image.shape[1:])
    for z in starts_per_axis[0]:
        for y in starts_per_axis[1]:
            for x in starts_per_axis[2]:
                sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                tile = image[(slice(None), *sl)][None]
                logits = np.zeros((k, *patch))
                for axes in flips:
                    dims = tuple(a + 2 for a in axes)
                    t = np.ascontiguousarray(np.flip(tile, dims)) if dims else tile
                    out = _forward(net, t, amp)
                    logits += (np.flip(out, dims) if dims else out)[0]
                logits /= len(flips)
                acc[(slice(None), *sl)] += logits * w
                wsum[sl] += w
    return acc / wsum


@pytest.mark.numerical
def test_gaussian_matches_formula_symmetric_positive_peak_at_centre() -> None:
    for patch in [(32, 24, 16), (17, 9, 33)]:
        w = gaussian_importance_map(patch).numpy()
        ref = _gaussian_np(patch)  # sigma = patch / 8 per axis, centre (n - 1) / 2
        # computed in float64 (error ~1e-14), rounded once to float32: <= 2^-24 relative; tolerance eps32
        np.testing.assert_allclose(w, ref / ref.max(), rtol=EPS32, atol=0)
        assert (w > 0).all()
        for axis in range(3):
            np.testing.assert_array_equal(w, np.flip(w, axis))
        assert w.max() == pytest.approx(1.0)
        peak = np.argwhere(w == w.max())
        for a, n in enumerate(patch):  # even n: the two middle voxels; odd n: the middle one
            assert set(peak[:, a]) == ({n // 2 - 1, n // 2} if n % 2 == 0 else {n // 2})
    # one sigma from the centre along an axis (odd n, integer sigma): exp(-1/2)
    w = gaussian_importance_map((17, 17, 17), sigma_scale=4 / 17).numpy()
    assert w[8 + 4, 8, 8] == pytest.approx(np.exp(-0.5), rel=EPS32)  # one float32 rounding, as above


def test_gaussian_tiny_sigma_stays_positive() -> None:
    w = gaussian_importance_map((64, 64, 64), sigma_scale=1 / 64)
    assert (w > 0).all()


@pytest.mark.parametrize(
    "size, patch, step, expected",
    [(32, 32, 0.5, [0]), (48, 32, 0.5, [0, 16]), (33, 32, 0.5, [0, 1]), (64, 32, 0.5, [0, 16, 32]),
     (70, 32, 0.5, [0, 13, 25, 38]), (64, 32, 1.0, [0, 32]), (40, 16, 0.25, [0, 4, 8, 12, 16, 20, 24])],
)
def test_tile_starts(size: int, patch: int, step: float, expected: list[int]) -> None:
    starts = tile_starts(size, patch, step)
    assert starts == expected
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(b - a <= step * patch for a, b in zip(starts, starts[1:], strict=False))
    assert [a + b for a, b in zip(starts, starts[::-1], strict=True)] == [size - patch] * len(starts)


def test_tile_starts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts(16, 32, 0.5)
    with pytest.raises(ValueError, match="step"):
        tile_starts(64, 32, 0.0)


@pytest.mark.numerical
def test_one_patch_equals_direct_forward(net, net64) -> None:
    x = torch.randn(2, 2, 32, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct, truth = net(x), net64(x.double())
    out = sliding_window_predict(net, x, (32, 32, 48))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32, 48)
    # against float64; yardstick: the direct float32 forward
    assert_yardstick(max_rel(out, truth), max_rel(direct, truth), "one patch")
    single = sliding_window_predict(net, x[0], (32, 32, 48))
    assert_yardstick(max_rel(single, truth[0]), max_rel(direct[0], truth[0]), "one patch, one image")


def _assert_like_reference(out: torch.Tensor, net, net64, image: np.ndarray, patch, starts, **kw) -> np.ndarray:
    """``out`` vs the slow reference with the float64 network (the truth), within the yardstick of the
    slow reference with the float32 network (batch-1 forwards, float64 sums); returns the latter."""
    ref = _reference(net, image, patch, starts, **kw)
    truth = _reference(net64, image.astype(np.float64), patch, starts, **kw)
    truth_t = torch.from_numpy(truth)
    assert_yardstick(max_rel(out, truth_t), max_rel(torch.from_numpy(ref), truth_t), "sliding window")
    return ref


@pytest.mark.numerical
def test_2x2x2_tiling_matches_slow_reference(net, net64) -> None:
    image = torch.randn(2, 48, 48, 48, generator=torch.Generator().manual_seed(1))
    out = sliding_window_predict(net, image, (32, 32, 32), step=0.5, tile_batch=3)
    ref = _assert_like_reference(out, net, net64, image.numpy(), (32, 32, 32), [[0, 16]] * 3)
    # the tiles overlap, so the result is not any single tile's forward
    assert not np.allclose(ref[:, :32, :32, :32], _forward(net, image.numpy()[None, :, :32, :32, :32])[0],
                           atol=1e-3)


@pytest.mark.numerical
def test_uneven_tiling_and_uniform_weights(net, net64) -> None:
    image = torch.randn(2, 32, 40, 32, generator=torch.Generator().manual_seed(2))
    out = sliding_window_predict(net, image, (32, 32, 32), step=0.5, gaussian=False, tile_batch=1)

    def uniform(model, img: np.ndarray) -> torch.Tensor:
        a = _forward(model, img[None, :, :, :32])[0]
        b = _forward(model, img[None, :, :, 8:])[0]
        ref = np.zeros_like(out.numpy(), dtype=np.float64)
        count = np.zeros((1, 32, 40, 32))
        ref[:, :, :32] += a
        ref[:, :, 8:] += b
        count[:, :, :32] += 1
        count[:, :, 8:] += 1
        return torch.from_numpy(ref / count)

    truth = uniform(net64, image.numpy().astype(np.float64))
    assert_yardstick(max_rel(out, truth), max_rel(uniform(net, image.numpy()), truth), "uniform weights")


@pytest.mark.numerical
def test_image_smaller_than_patch_is_padded_and_cropped(net, net64) -> None:
    # smaller along D, equal along H, larger along W
    image = torch.randn(2, 20, 32, 45, generator=torch.Generator().manual_seed(3))
    out = sliding_window_predict(net, image, (32, 32, 32))
    assert out.shape == (3, 20, 32, 45)
    padded = np.pad(image.numpy(), ((0, 0), (6, 6), (0, 0), (0, 0)))  # 12 voxels, centred
    ref = _reference(net, padded, (32, 32, 32), [[0], [0], [0, 13]])[:, 6:26]
    truth = _reference(net64, padded.astype(np.float64), (32, 32, 32), [[0], [0], [0, 13]])[:, 6:26]
    assert_yardstick(max_rel(out, torch.from_numpy(truth)), max_rel(torch.from_numpy(ref), torch.from_numpy(truth)),
                     "padded image")


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 32, 1, 32), (1, 32, 32, 1)])
def test_one_voxel_thick_input_raises(net, shape) -> None:
    with pytest.raises(ValueError, match="1 voxel thick along axis"):
        sliding_window_predict(net, torch.randn(shape), (32, 32, 32))


def test_bad_arguments_raise(net) -> None:
    with pytest.raises(ValueError, match="expected \\(C, D, H, W\\)"):
        sliding_window_predict(net, torch.randn(32, 32, 32), (32, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_predict(net, torch.randn(2, 32, 32, 32), (32, 32))
    with pytest.raises(ValueError, match="tile_batch"):
        sliding_window_predict(net, torch.randn(2, 32, 32, 32), 32, tile_batch=0)
    with pytest.raises(ValueError, match="amp"):
        sliding_window_predict(net, torch.randn(2, 32, 32, 32), 32, amp="int8")


def test_mirror_equals_explicit_average_over_flips(net, net64) -> None:
    x = torch.randn(1, 2, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    out = sliding_window_predict(net, x, 32, mirror=True)
    flips = [a for k in range(4) for a in itertools.combinations((2, 3, 4), k)]
    assert len(flips) == 8

    def average(model, xx: torch.Tensor, fs) -> torch.Tensor:
        with torch.no_grad():
            return sum(torch.flip(model(torch.flip(xx, f)), f) if f else model(xx) for f in fs) / len(fs)

    truth = average(net64, x.double(), flips)
    assert_yardstick(max_rel(out, truth), max_rel(average(net, x, flips), truth), "mirrored")
    # a subset of axes: only the flips over (W,) and none
    out_w = sliding_window_predict(net, x, 32, mirror=(2,))
    truth_w = average(net64, x.double(), [(), (4,)])
    assert_yardstick(max_rel(out_w, truth_w), max_rel(average(net, x, [(), (4,)]), truth_w), "mirrored over W")
    assert mirror_axes_combinations((0, 1)) == [(), (0,), (1,), (0, 1)]


def test_mirror_on_tiled_image_matches_reference_and_is_flip_equivariant(net, net64) -> None:
    image = torch.randn(2, 48, 32, 48, generator=torch.Generator().manual_seed(5))
    out = sliding_window_predict(net, image, 32, mirror=True, tile_batch=2)
    flips = mirror_axes_combinations((0, 1, 2))
    starts = [[0, 16], [0], [0, 16]]
    ref = _reference(net, image.numpy(), (32, 32, 32), starts, flips=flips)
    truth = torch.from_numpy(_reference(net64, image.numpy().astype(np.float64), (32, 32, 32), starts, flips=flips))
    yard = max_rel(torch.from_numpy(ref), truth)
    assert_yardstick(max_rel(out, truth), yard, "mirrored tiles")
    # averaging over all flips with symmetric tiles and weights: predict(flip(x)) == flip(predict(x)), so
    # the prediction of the flipped image is as close to the flipped truth
    for dims in [(1, 2, 3)]:
        flipped = sliding_window_predict(net, torch.flip(image, dims), 32, mirror=True, tile_batch=2)
        assert_yardstick(max_rel(flipped, torch.flip(truth, dims)), yard, "flipped image")
    # without mirroring the network alone is not flip-equivariant (the test above can fail)
    plain = sliding_window_predict(net, image, 32)
    plain_f = sliding_window_predict(net, torch.flip(image, (3,)), 32)
    assert not torch.allclose(plain_f, torch.flip(plain, (3,)), atol=1e-3)


def test_probabilities_and_accumulate_device_and_deep_supervision(net) -> None:
    image = torch.randn(2, 40, 32, 32, generator=torch.Generator().manual_seed(6))
    logits = sliding_window_predict(net, image, 32, accumulate_device="cpu")
    probs = sliding_window_predict(net, image, 32, output="probabilities")
    torch.testing.assert_close(probs, torch.softmax(logits, 0))
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 32, 32))

    ds = s3d.build_resenc_unet("tiny", in_channels=2, num_classes=3, deep_supervision=True).eval()
    ds.load_state_dict(net.state_dict())
    torch.testing.assert_close(sliding_window_predict(ds, image, 32), logits)


def test_plain_function_model_and_bf16_autocast(net, net64) -> None:
    image = torch.randn(2, 32, 32, 40, generator=torch.Generator().manual_seed(7))
    ref = sliding_window_predict(net, image, 32)
    out = sliding_window_predict(lambda t: net(t), image, 32)
    assert torch.equal(out, ref)  # the same module called the same way
    with pytest.warns(RuntimeWarning, match="bf16.*CPU"):  # honoured on the CPU, with a warning that it is slow
        low = sliding_window_predict(net, image, 32, amp=torch.bfloat16)
    assert low.dtype == torch.float32
    # against float64; yardstick: the slow reference with bf16 forwards (floor: one bf16 ulp)
    starts = [[0], [0], [0, 8]]
    truth = torch.from_numpy(_reference(net64, image.numpy().astype(np.float64), (32, 32, 32), starts))
    plain = torch.from_numpy(_reference(net, image.numpy(), (32, 32, 32), starts, amp=torch.bfloat16))
    assert_yardstick(max_rel(low, truth), max_rel(plain, truth), "bf16 autocast", floor=EPS_BF16)


class Counting(torch.nn.Module):
    """The network, counting its forward passes; pass number ``oom_at`` raises ``torch.OutOfMemoryError``
    (the exception CUDA raises when activations do not fit), as a full device would mid-image."""

    def __init__(self, net: torch.nn.Module, oom_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.net, self.oom_at, self.calls = net, oom_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


@pytest.fixture(scope="module")
def conv() -> torch.nn.Module:
    """A one-layer network: the fallback logic does not depend on the model, and this one is fast."""
    torch.manual_seed(1)
    return torch.nn.Conv3d(2, 3, 3, padding=1).eval()


def test_accumulate_limit_moves_only_the_sums_and_keeps_finished_tiles(conv) -> None:
    image = torch.randn(2, 2, 24, 16, 24, generator=torch.Generator().manual_seed(3))  # batch of 2
    ref = sliding_window_predict(conv, image, 16, tile_batch=1, accumulate_device="cpu")  # no fallback possible
    groups = 2 * 1 * 2  # tile starts per axis: [0, 8], [0], [0, 8]
    weights, logits = 24 * 16 * 24 * 4, 2 * 3 * 24 * 16 * 24 * 4  # bytes of the sums (D, H, W), (B, K, D, H, W)

    # the weight sums fit, the logit sums do not: they go to the host after the first forward pass,
    # whose output is kept (no tile is run twice) and the result is bitwise the no-fallback one
    counted = Counting(conv)
    with pytest.warns(RuntimeWarning, match=r"exceed accumulate_limit_bytes.*tile group 1 of 4.*on the CPU"):
        out = sliding_window_predict(counted, image, 16, tile_batch=1, accumulate_limit_bytes=weights + logits - 1)
    assert counted.calls == 2 * groups
    assert torch.equal(out, ref)
    # not even the weight sums fit: on the host from the start, tiles still run
    counted = Counting(conv)
    with pytest.warns(RuntimeWarning, match="allocating the sums"):
        out = sliding_window_predict(counted, image, 16, tile_batch=1, accumulate_limit_bytes=weights - 1,
                                     mirror=(0,), output="probabilities")
    assert counted.calls == 2 * groups * 2
    ref_m = sliding_window_predict(conv, image, 16, tile_batch=1, accumulate_device="cpu", mirror=(0,),
                                   output="probabilities")
    assert torch.equal(out, ref_m)
    # everything fits: no warning, same result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sliding_window_predict(conv, image, 16, tile_batch=1,
                                                  accumulate_limit_bytes=weights + logits), ref)
    with pytest.raises(ValueError, match="accumulate_limit_bytes"):
        sliding_window_predict(conv, image, 16, accumulate_limit_bytes=-1)


def test_oom_mid_image_continues_from_the_failed_tile_group(conv) -> None:
    image = torch.randn(2, 24, 16, 24, generator=torch.Generator().manual_seed(4))
    ref = sliding_window_predict(conv, image, 16, tile_batch=1, accumulate_device="cpu")
    counted = Counting(conv, oom_at=(3,))  # the third tile group's forward pass fails
    with pytest.warns(RuntimeWarning, match=r"CUDA out of memory.*tile group 3 of 4.*tiles still run on the device"):
        out = sliding_window_predict(counted, image, 16, tile_batch=1)
    assert counted.calls == 4 + 1  # groups 1-2 kept, group 3 run again, group 4: nothing recomputed
    assert torch.equal(out, ref)
    # with the sums pinned to a device an OOM is the model's own: raised
    with pytest.raises(torch.OutOfMemoryError):
        sliding_window_predict(Counting(conv, oom_at=(2,)), image, 16, tile_batch=1, accumulate_device="cpu")
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError):  # fails again after the move
        sliding_window_predict(Counting(conv, oom_at=(2, 3)), image, 16, tile_batch=1)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_oom_falls_back_to_cpu_accumulation(net, net64) -> None:
    image = torch.randn(2, 48, 48, 48, generator=torch.Generator().manual_seed(8))
    starts = [[0, 16]] * 3
    truth = torch.from_numpy(_reference(net64, image.numpy().astype(np.float64), (32, 32, 32), starts))
    gpu = net.to("cuda")
    try:
        out = sliding_window_predict(gpu, image, 32)
        assert out.device.type == "cuda"
        # against float64 on the CPU; yardstick: the slow reference's forwards on the same GPU (cuDNN may
        # use TF32 there, and the yardstick then rounds as coarsely)
        yard = max_rel(torch.from_numpy(_reference(gpu, image.numpy(), (32, 32, 32), starts)), truth)
        assert_yardstick(max_rel(out.cpu(), truth), yard, "CUDA sliding window")
        # a limit below the sums: tiles on the GPU, sums on the host
        with pytest.warns(RuntimeWarning, match="accumulate_limit_bytes"):
            host = sliding_window_predict(gpu, image, 32, accumulate_limit_bytes=1)
        assert host.device.type == "cpu"
        assert_yardstick(max_rel(host, truth), yard, "CUDA tiles, host sums")
        big = torch.randn(2, 160, 160, 160, generator=torch.Generator().manual_seed(9))
        free, _ = torch.cuda.mem_get_info()
        # reserve all but ~100 MiB so a 3 x 160^3 fp32 accumulator (49 MiB) plus tiles cannot fit
        hog = torch.empty(max(0, free - 100 * 2**20), dtype=torch.uint8, device="cuda")
        with pytest.warns(RuntimeWarning, match="sliding-window sums on the CPU"):
            out = sliding_window_predict(gpu, big, 32, tile_batch=8)
        del hog
        assert out.device.type == "cpu" and out.shape == (3, 160, 160, 160)
    finally:
        net.to("cpu")


@pytest.mark.numerical
def test_matches_monai_with_the_same_weights_where_tiles_coincide(net, net64) -> None:
    monai_inferers = pytest.importorskip("monai.inferers")  # optional: MONAI is not a dependency
    # tile starts 0/16/32, 0/16, 0 in both implementations
    image = torch.randn(1, 2, 64, 48, 32, generator=torch.Generator().manual_seed(10))
    ours = sliding_window_predict(net, image, 32, tile_batch=4)
    with torch.inference_mode():
        theirs = monai_inferers.sliding_window_inference(
            image, (32, 32, 32), 4, net, overlap=0.5, mode="gaussian",
            roi_weight_map=gaussian_importance_map((32, 32, 32)))
    theirs = theirs.as_tensor() if hasattr(theirs, "as_tensor") else theirs
    # both against the slow float64 reference; MONAI's float32 result is the yardstick
    truth = torch.from_numpy(_reference(net64, image[0].numpy().astype(np.float64), (32, 32, 32),
                                        [[0, 16, 32], [0, 16], [0]]))
    assert_yardstick(max_rel(ours[0], truth), max_rel(theirs[0], truth), "s3d vs MONAI")
