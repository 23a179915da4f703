"""The masked ("sparse") encoder: masked InstanceNorm, re-masking invariance, all-ones == dense.

References are independent: per-sample explicit indexing of the visible voxels (float64) and a
hand-written forward of the encoder from ``F.conv3d``/``F.avg_pool3d``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s3d import build_resenc_unet
from s3d.nn.blocks import BasicBlockD, ConvNormAct
from s3d.sparse import masked_instance_norm, sample_block_mask, stage_keeps


def _ref_norm(y: torch.Tensor, keep: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Instance norm over visible voxels by explicit per-sample, per-channel indexing (float64)."""
    y64 = y.double()
    out = torch.zeros_like(y64)
    for b in range(y.shape[0]):
        vis = keep[b, 0] > 0
        for c in range(y.shape[1]):
            v = y64[b, c][vis]
            if v.numel() == 0:
                continue
            mean, var = v.mean(), v.var(unbiased=False)
            z = (v - mean) / torch.sqrt(var + eps)
            if weight is not None:
                z = z * weight[c].double() + bias[c].double()
            out[b, c][vis] = z
    return out


def test_masked_instance_norm_matches_indexing_reference_unequal_counts() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 8, 8, 8, generator=g) * 3 + 2
    keep = torch.rand(3, 1, 8, 8, 8, generator=g) < torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1, 1, 1)
    counts = keep.flatten(1).sum(1)
    assert len(set(counts.tolist())) == 3  # unequal visible counts per sample
    w, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    for weight, bias in ((w, b), (None, None)):
        y = masked_instance_norm(x, keep, weight, bias, 1e-5)
        ref = _ref_norm(x, keep.float(), weight, bias, 1e-5)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        assert bool((y[~keep.expand_as(y)] == 0).all())  # exactly 0, not just small


def test_masked_instance_norm_all_visible_equals_instance_norm() -> None:
    x = torch.randn(2, 4, 6, 6, 6)
    w, b = torch.randn(4), torch.randn(4)
    y = masked_instance_norm(x, torch.ones(2, 1, 6, 6, 6), w, b, 1e-5)
    torch.testing.assert_close(y, F.instance_norm(x, weight=w, bias=b, eps=1e-5), atol=1e-5, rtol=1e-5)


# ---- an independent masked encoder: F.conv3d + explicit-indexing norm ---------------------------
def _ref_cna(m: ConvNormAct, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    c = m.conv
    y = F.conv3d(x.double(), c.weight.double(), None if c.bias is None else c.bias.double(), c.stride,
                 c.padding)
    y = _ref_norm(y, keep, m.norm.weight, m.norm.bias, m.norm.eps)
    return F.leaky_relu(y, 0.01) if m.nonlin is not None else y


def _ref_block(blk: BasicBlockD, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    res = x
    if blk.skip is not None:
        for op in blk.skip:
            if isinstance(op, ConvNormAct):
                res = _ref_cna(op, res, keep)
            else:
                res = F.avg_pool3d(res, op.kernel_size, op.stride) * keep
    out = _ref_cna(blk.conv2, _ref_cna(blk.conv1, x, keep), keep)
    return F.leaky_relu(out + res, 0.01)


def _ref_encoder(enc, x: torch.Tensor, keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    keeps = [k.double() for k in keeps]
    h = _ref_cna(enc.stem.convs[0], x.double() * keeps[0], keeps[0])
    feats = []
    for s, stage in enumerate(enc.stages):
        for blk in stage.blocks:
            h = _ref_block(blk, h, keeps[s + 1])
        feats.append(h)
    return feats


def _tiny() -> torch.nn.Module:
    net = build_resenc_unet("tiny", num_classes=1)
    with torch.no_grad():  # non-trivial affine parameters so the norm's affine path is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("block_size,coarse", [(16, "pool"), (8, "pool"), (8, "ones")])
def test_encoder_matches_independent_reference(block_size: int, coarse: str) -> None:
    net = _tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 32, generator=g)
    keep = sample_block_mask(2, (32, 32, 32), block_size, (0.3, 0.8), generator=g)
    keeps = stage_keeps(keep, (32, 32, 32), net.config.stage_strides(), coarse)
    with torch.no_grad():
        feats = net.encoder(x, keeps)
        ref = _ref_encoder(net.encoder, x, keeps)
    for s, (f, r, k) in enumerate(zip(feats, ref, keeps[1:], strict=False)):
        torch.testing.assert_close(f.double(), r, atol=1e-4, rtol=1e-4, msg=f"stage {s}")
        assert bool((f * (1 - k) == 0).all()), f"stage {s}: masked values not exactly 0"


@pytest.mark.parametrize("block_size,coarse", [(16, "pool"), (8, "pool"), (8, "ones")])
def test_remasking_invariance(block_size: int, coarse: str) -> None:
    """Changing the image inside masked blocks changes no encoder feature at a visible position."""
    net = _tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, 32, generator=g)
    keep = sample_block_mask(2, (32, 32, 32), block_size, 0.6, generator=g)
    keeps = stage_keeps(keep, (32, 32, 32), net.config.stage_strides(), coarse)
    x2 = x + (1 - keeps[0]) * 100 * torch.randn(x.shape, generator=g)
    assert not torch.equal(x, x2)
    with torch.no_grad():
        a, b = net.encoder(x, keeps), net.encoder(x2, keeps)
        dense_a, dense_b = net.encoder(x), net.encoder(x2)
    for fa, fb, k in zip(a, b, keeps[1:], strict=False):
        assert torch.equal(fa * k, fb * k)
        assert bool((fa[(k == 0).expand_as(fa)] == 0).all())
    # the property can fail: the dense encoder (nnssl-style unmasked input) leaks into visible features
    vis = keeps[1].expand_as(dense_a[0]) > 0
    assert not torch.allclose(dense_a[0][vis], dense_b[0][vis])


def test_all_ones_mask_equals_dense() -> None:
    net = _tiny()
    x = torch.randn(2, 1, 32, 32, 32)
    ones = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)
    keeps = stage_keeps(ones, (32, 32, 32), net.config.stage_strides())
    with torch.no_grad():
        for fs, fd in zip(net.encoder(x, keeps), net.encoder(x), strict=False):
            torch.testing.assert_close(fs, fd, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(x, mask=ones), net(x), atol=1e-5, rtol=1e-5)


def test_checkpointing_keeps_masked_semantics() -> None:
    net = _tiny().train()
    x = torch.randn(1, 1, 32, 32, 32, requires_grad=True)
    keep = sample_block_mask(1, (32, 32, 32), 16, 0.5, generator=torch.Generator().manual_seed(0))
    keeps = stage_keeps(keep, (32, 32, 32), net.config.stage_strides())
    plain = net.encoder(x, keeps)
    net.checkpointing = True
    ckpt = net.encoder(x, keeps)
    for p, c in zip(plain, ckpt, strict=False):
        torch.testing.assert_close(p, c)
    ckpt[-1].sum().backward()
    assert bool((x.grad[(keeps[0] == 0).expand_as(x)] == 0).all())  # no gradient reaches masked input
