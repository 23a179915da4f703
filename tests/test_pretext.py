"""Baseline pretext methods: Models Genesis transforms, VolumeFusion pairs, VoCo overlap targets and loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerance import EPS32, assert_yardstick

from s3d.augment import mirror
from s3d.nn import build_resenc_unet
from s3d.pretext import ModelsGenesis, VoCo, VolumeFusion
from s3d.pretext.genesis import (
    bezier_curves,
    local_pixel_shuffle,
    nonlinear_intensity,
    paint,
    sample_decisions,
    sample_paint_boxes,
)
from s3d.pretext.voco import base_grid, extract_crops, overlap_targets
from s3d.pretext.volume_fusion import fusion_labels, rectangle_side_range, sample_fusion_boxes
from s3d.pretrain.methods import METHODS, build_method


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _tiny() -> torch.nn.Module:
    return build_resenc_unet("tiny", in_channels=1, num_classes=1, deep_supervision=False)


# ---- Models Genesis ---------------------------------------------------------------------------------
def test_mg_rates_in_2000_draws() -> None:
    n = 2000
    d = sample_decisions(n, _gen(1))
    rates = (("nonlinear", 0.9), ("local", 0.5), ("paint", 0.9), ("outpaint", 0.8), ("decreasing", 0.5))
    for key, p in rates:
        assert _within(int(d[key].sum()), n, p), (key, int(d[key].sum()))
    att = d["flip_attempts"]
    for k, p in ((1, 0.4), (2, 0.4**2), (3, 0.4**3)):  # MG: another flip while rand < 0.4, at most 3
        assert _within(int((att >= k).sum()), n, p), (k, int((att >= k).sum()))
    # the net flip of an axis is the parity of the attempts that chose it
    assert torch.equal(d["flip"].any(1), d["flip"].any(1) & (att >= 1))
    assert bool((d["flip"].sum(1) <= att).all())
    # in-painting: first box with p 0.95, each next one with p 0.95 (at most 5); out-painting: first always
    _, _, active = sample_paint_boxes(n, (64, 64, 64), torch.zeros(n, dtype=torch.bool), _gen(2))
    assert _within(int(active[:, 0].sum()), n, 0.95) and _within(int(active[:, 1].sum()), n, 0.95**2)
    _, _, active = sample_paint_boxes(n, (64, 64, 64), torch.ones(n, dtype=torch.bool), _gen(3))
    assert bool(active[:, 0].all()) and _within(int(active[:, 1].sum()), n, 0.95)


@pytest.mark.numerical
def test_mg_nonlinear_is_monotone_keeps_range_and_matches_np_interp() -> None:
    b = 8
    ramp = torch.linspace(0, 1, 4096).view(1, 1, 16, 16, 16).repeat(b, 1, 1, 1, 1)
    decreasing = torch.arange(b) % 2 == 1
    apply = torch.ones(b, dtype=torch.bool)
    apply[-2:] = False
    y = nonlinear_intensity(ramp, apply, decreasing, _gen(5), n_points=500)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    xs, ys = bezier_curves(b, _gen(5), n_points=500, decreasing=decreasing)  # the same draws
    for i in range(b):
        f = y[i].flatten().double().numpy()
        if not apply[i]:
            assert torch.equal(y[i], ramp[i])
            continue
        ref = np.interp(ramp[i].flatten().double().numpy(), xs[i].double().numpy(), ys[i].double().numpy())
        # float32 piecewise-linear interpolation of values in [0, 1]: the weight (x - x0) / (x1 - x0) carries
        # ~4 roundings of x <= 1, which the curve's slope scales, and the 2-tap sum ~3 more
        slope = float(np.abs(np.diff(ys[i].double().numpy()) / np.diff(xs[i].double().numpy())).max())
        atol = 8 * EPS32 * (1 + slope)
        diffs = np.diff(f)
        assert (diffs >= -2 * atol).all() if not decreasing[i] else (diffs <= 2 * atol).all(), i
        ends = (0.0, 1.0) if not decreasing[i] else (1.0, 0.0)
        assert f[0] == pytest.approx(ends[0], abs=atol) and f[-1] == pytest.approx(ends[1], abs=atol)
        np.testing.assert_allclose(f, ref, rtol=0, atol=atol)
        assert np.abs(f - np.linspace(0, 1, 4096) if not decreasing[i] else f).max() > 1e-3  # not identity


def test_mg_local_shuffle_keeps_each_window_multiset() -> None:
    b, size = 3, (20, 24, 28)
    x = torch.randperm(b * math.prod(size), generator=_gen(6)).float().view(b, 1, *size)
    apply = torch.tensor([True, True, False])
    out, info = local_pixel_shuffle(x, apply, _gen(7), fraction=0.5, max_window=(4, 5, 3))
    (sd, sh, sw), (od, oh, ow) = info["window"], info["offset"]
    assert 2 <= sd <= 4 and 2 <= sh <= 5 and 2 <= sw <= 3
    assert torch.equal(out[2], x[2])
    grid = torch.zeros(size, dtype=torch.bool)
    n_changed = 0
    for i in range(2):
        for d0 in range(od, od + (size[0] - od) // sd * sd, sd):
            for h0 in range(oh, oh + (size[1] - oh) // sh * sh, sh):
                for w0 in range(ow, ow + (size[2] - ow) // sw * sw, sw):
                    win = (i, 0, slice(d0, d0 + sd), slice(h0, h0 + sh), slice(w0, w0 + sw))
                    grid[win[2:]] = True
                    assert torch.equal(out[win].flatten().sort().values, x[win].flatten().sort().values)
                    n_changed += int(not torch.equal(out[win], x[win]))
    assert torch.equal(out[:2, :, ~grid], x[:2, :, ~grid])  # outside the window grid: untouched
    n_windows = 2 * int(grid.sum()) // (sd * sh * sw)
    assert 0.25 * n_windows < n_changed < 0.75 * n_windows  # about half the windows shuffled


@pytest.mark.parametrize("outpaint", [False, True])
def test_mg_painting_changes_only_the_stated_region(outpaint: bool) -> None:
    b, size = 6, (32, 40, 36)
    x = torch.rand(b, 1, *size, generator=_gen(10))
    apply = torch.tensor([True] * 5 + [False])
    out_flag = torch.full((b,), outpaint)
    y, changed, boxes = paint(x, apply, out_flag, _gen(11))
    assert torch.equal(y[~changed.expand_as(y)], x[~changed.expand_as(x)])
    assert bool((y[changed.expand_as(y)] != x[changed.expand_as(x)]).all())
    assert float(y.min()) >= 0 and float(y.max()) < 1
    for i in range(b):
        union = np.zeros(size, bool)
        for k in range(5):
            lo, hi = boxes["lo"][i, k].tolist(), boxes["hi"][i, k].tolist()
            sides = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
            for s, n in zip(sides, size, strict=True):
                rng = (n - 4 * n // 7, n - 3 * n // 7) if outpaint else (n // 6, n // 3)
                assert rng[0] <= s <= rng[1], (s, n, outpaint)
            assert all(0 <= lo_ and h <= n for lo_, h, n in zip(lo, hi, size, strict=True))
            if boxes["active"][i, k]:
                union[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        expected = (~union if outpaint else union) if apply[i] else np.zeros(size, bool)
        assert np.array_equal(changed[i, 0].numpy(), expected), i


def test_mg_flips_match_numpy_and_module_target() -> None:
    x = torch.randn(4, 1, 32, 32, 32, generator=_gen(12))
    flip = torch.tensor([[True, False, True], [False, False, False], [False, True, False],
                         [True, True, True]])
    y = mirror(x, flip)  # s3d.augment's mirroring, which MG uses
    for i in range(4):
        axes = tuple(a + 1 for a in range(3) if flip[i, a])
        ref = np.flip(x[i].numpy(), axes) if axes else x[i].numpy()
        assert np.array_equal(y[i].numpy(), ref)
    mg = ModelsGenesis(_tiny(), nonlinear_rate=0, local_rate=0, paint_rate=0, flip_rate=0)
    out = mg(x, generator=_gen(0))
    # every transform off: the input is x up to a float32 rescale to [0, 1] and back (<= 6 roundings of
    # values <= 2 max|x|)
    assert torch.allclose(out.extras["input"], x, rtol=0, atol=12 * EPS32 * float(x.abs().max()))
    assert torch.equal(out.target, x)
    truth = float(((out.reconstruction.detach().double() - x.double()) ** 2).mean())
    plain = float(((out.reconstruction.detach() - x) ** 2).mean())  # the yardstick: a plain float32 mean
    assert_yardstick(abs(out.loss.item() - truth) / truth, abs(plain - truth) / truth, "MG loss")
    mg = ModelsGenesis(_tiny())
    out = mg(x * 3 + 1, generator=_gen(1))
    lo, hi = (x * 3 + 1).amin(), (x * 3 + 1).amax()
    inp = out.extras["input"]
    slack = 12 * EPS32 * max(abs(float(lo)), abs(float(hi)))  # the rescale's roundings, as above
    assert float(inp.min()) >= float(lo) - slack and float(inp.max()) <= float(hi) + slack
    with pytest.raises(ValueError, match="num_classes must equal in_channels"):
        ModelsGenesis(build_resenc_unet("tiny", in_channels=1, num_classes=3))


# ---- VolumeFusion -----------------------------------------------------------------------------------
def test_vf_rectangles_in_range() -> None:
    assert rectangle_side_range((160, 160, 160)) == ([8, 8, 8], [100, 100, 100])  # Appendix A.2
    size = (160, 128, 96)
    boxes = sample_fusion_boxes(500, size, _gen(3))
    side = (boxes["hi"] - boxes["lo"])
    lo_s, hi_s = rectangle_side_range(size)
    for a in range(3):
        assert int(side[..., a].min()) == lo_s[a] and int(side[..., a].max()) == hi_s[a]
        assert int(boxes["lo"][..., a].min()) >= 0 and int(boxes["hi"][..., a].max()) <= size[a]
    count = boxes["count"]
    assert int(count.min()) == 10 and int(count.max()) == 40
    assert abs(float(count.float().mean()) - 25) < 4 * math.sqrt((31**2 - 1) / 12 / 500)
    assert torch.equal(boxes["active"].sum(1), count)
    assert set(boxes["label"].unique().tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.numerical
def test_vf_labels_five_values_and_fused_is_the_coefficient_mix() -> None:
    vf = VolumeFusion(_tiny())
    x = torch.randn(3, 1, 32, 32, 32, generator=_gen(13))
    fused, label, boxes = vf.make_pair(x, _gen(4))
    assert label.dtype == torch.long and set(label.unique().tolist()) == {0, 1, 2, 3, 4}
    # independent reference: paint the boxes in order with numpy
    ref = np.zeros((3, 32, 32, 32), np.int64)
    for i in range(3):
        for m in range(boxes["lo"].shape[1]):
            if boxes["active"][i, m]:
                (d0, h0, w0), (d1, h1, w1) = boxes["lo"][i, m].tolist(), boxes["hi"][i, m].tolist()
                ref[i, d0:d1, h0:h1, w0:w1] = int(boxes["label"][i, m])
    assert np.array_equal(label[:, 0].numpy(), ref)
    xn, other = x[:, 0].numpy().astype(np.float64), np.roll(x[:, 0].numpy(), 1, axis=0).astype(np.float64)
    alpha = ref / 4.0
    # float32 alpha x + (1 - alpha) y with alpha in {0, 1/4, .., 1}: <= 3 roundings of values <= max|x| + max|y|
    atol = 2 * EPS32 * (np.abs(xn).max() + np.abs(other).max())
    np.testing.assert_allclose(fused[:, 0].numpy(), alpha * xn + (1 - alpha) * other, rtol=0, atol=atol)
    assert np.array_equal(fused[:, 0].numpy()[ref == 4], x[:, 0].numpy()[ref == 4])
    assert np.array_equal(fused[:, 0].numpy()[ref == 0], np.roll(x[:, 0].numpy(), 1, axis=0)[ref == 0])
    assert torch.equal(fusion_labels(boxes, (32, 32, 32)), label)
    out = vf(x, generator=_gen(4))
    assert torch.equal(out.extras["label"], label) and out.extras["logits"].shape == (3, 5, 32, 32, 32)
    assert math.isfinite(out.loss.item())


# ---- VoCo --------------------------------------------------------------------------------------------
def test_voco_overlap_targets_analytic() -> None:
    crop = (64, 64, 64)
    base = base_grid((192, 192, 64), crop)
    assert base.shape == (9, 3) and base[:, 2].eq(0).all()
    eye = overlap_targets(base[None], base, crop)[0]  # targets on the base crops
    assert torch.equal(eye, torch.eye(9))
    half = overlap_targets(torch.tensor([[32, 0, 0], [32, 32, 0], [128, 96, 0]]), base, crop)
    grid = half.view(3, 3, 3)
    assert grid[0, 0, 0] == 0.5 and grid[0, 1, 0] == 0.5 and grid[0].sum() == 1
    assert torch.equal(grid[1, :2, :2], torch.full((2, 2), 0.25)) and grid[1].sum() == 1
    assert torch.allclose(grid[2, 2, 1:], torch.tensor([0.5, 0.5])) and grid[2].sum() == 1
    # random targets against explicit voxel counting (small sizes)
    small = (4, 4, 2)
    base_s = base_grid((8, 12, 2), small)
    targets = torch.tensor([[1, 3, 0], [4, 8, 0], [3, 5, 0], [0, 0, 0]])
    got = overlap_targets(targets, base_s, small)
    for t, tl in enumerate(targets.tolist()):
        tm = np.zeros((8, 12, 2), bool)
        tm[tl[0]:tl[0] + 4, tl[1]:tl[1] + 4, :] = True
        for j, bl in enumerate(base_s.tolist()):
            bm = np.zeros_like(tm)
            bm[bl[0]:bl[0] + 4, bl[1]:bl[1] + 4, :] = True
            assert float(got[t, j]) == pytest.approx((tm & bm).sum() / 32)
    assert torch.allclose(got.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="multiple of the crop size"):
        base_grid((160, 160, 160), crop)


def test_voco_crops_and_loss_decreases() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 32, 16)
    lo = torch.tensor([[[0, 0, 0], [32, 16, 0]], [[13, 7, 0], [5, 0, 0]]])
    crops = extract_crops(x, lo, (32, 16, 16))
    assert torch.equal(crops[3], x[1, :, 5:37, 0:16, 0:16]) and torch.equal(crops[0], x[0, :, :32, :16, :])
    # smooth images with position-dependent content
    zz = torch.linspace(-1, 1, 64)[:, None, None]
    yy = torch.linspace(-1, 1, 32)[None, :, None]
    x = torch.stack([torch.sin(3 * zz + 2 * yy + k) + 0.1 * torch.randn(64, 32, 16)
                     for k in range(2)])[:, None]
    voco = VoCo(_tiny(), crop_size=(32, 16, 16), num_targets=3, proj_hidden=64, proj_dim=32)
    targets = torch.tensor([[[16, 8, 0], [0, 16, 0], [32, 4, 0]], [[7, 3, 0], [25, 16, 0], [32, 0, 0]]])
    opt = torch.optim.Adam([p for p in voco.parameters() if p.requires_grad], lr=1e-3)
    losses, errors = [], []
    for _ in range(15):
        out = voco(x, target_lo=targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        errors.append(float((out.extras["logits"].detach() - out.extras["overlap"]).abs().mean()))
    assert out.extras["overlap"].shape == (2, 3, 4)
    assert torch.allclose(out.extras["overlap"].sum(-1), torch.ones(2, 3))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert np.mean(errors[-3:]) < 0.8 * np.mean(errors[:3]), errors  # the positions get predicted
    assert all(p.grad is None for p in voco.backbone.decoder.parameters())


# ---- the module contract ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_build_export_and_unknown(name: str) -> None:
    kw = {"crop_size": (32, 16, 16), "num_targets": 2, "proj_hidden": 32, "proj_dim": 16}
    kw = kw if name == "voco" else ({"block_size": 16} if name == "mae" else {})
    method = build_method(name, _tiny(), **kw)
    state = method.export_backbone()
    net = build_resenc_unet(method.backbone.config)
    net.load_state_dict(state)  # strict
    assert set(state) == set(net.state_dict())
    shape = (1, 1, 64, 32, 16) if name == "voco" else (1, 1, 32, 32, 32)
    torch.manual_seed(3)
    a = method(torch.ones(shape)).loss
    torch.manual_seed(3)
    assert torch.equal(a, method(torch.ones(shape)).loss)  # seeded by the global RNG (the trainer's)
    with pytest.raises(ValueError, match="bad method_kwargs"):
        build_method(name, _tiny(), no_such_arg=1)


def test_build_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown pre-training method 'simclr'"):
        build_method("simclr", _tiny())
