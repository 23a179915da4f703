"""The block-sparse encoder engine equals the masked-dense reference ``encoder(x, stage_keeps(...))``.

References: the dense engine (s3d's masked encoder, itself tested against an explicit-indexing
implementation in test_sparse_encoder.py), run in float64 for exactness and in float32 for the
acceptance tolerance; an explicit pad-and-crop for the halo gather.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from s3d import build_resenc_unet
from s3d.nn.masked import stage_keeps
from s3d.sparse.block_engine import (
    BlockLayout,
    block_encoder_forward,
    block_instance_norm,
    block_plan,
    default_min_block_edge,
)


def _keep(batch: int, grid: int, fractions: list[float], seed: int) -> torch.Tensor:
    """Random keep grid with (roughly) the given visible fraction per sample, unequal counts."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, 1, grid, grid, grid, generator=g) < torch.tensor(fractions).view(-1, 1, 1, 1, 1)
    return keep


def _run(enc, x, keep, bs, engine, coarse="pool", min_block_edge=None, target=None):
    enc.zero_grad(set_to_none=True)
    if engine == "dense":
        # cumulative strides, as the model's config gives them
        strides, acc = [], (1, 1, 1)
        for st in enc.stages:
            acc = tuple(a * s for a, s in zip(acc, st.blocks[0].conv1.conv.stride, strict=True))
            strides.append(acc)
        keeps = [k.to(x.dtype) for k in stage_keeps(keep, x.shape[2:], strides, coarse)]
        feats = enc(x, keeps)
    else:
        feats = block_encoder_forward(enc, x, keep, bs, coarse, min_block_edge)
    if target is None:
        target = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i), dtype=f.dtype)
                  for i, f in enumerate(feats)]
    loss = sum((f - t).square().mean() for f, t in zip(feats, target, strict=True))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in enc.named_parameters()}
    return [f.detach() for f in feats], grads, target


def _bias_before_norm(name: str) -> bool:
    # a conv bias followed by InstanceNorm has an analytically zero gradient (the norm removes it)
    return name.endswith("conv.bias")


def _assert_equal_engines(dense, blocks, rtol: float, reference64=None) -> None:
    """Features to ``rtol`` (max-abs relative); every parameter gradient to ``rtol`` (norm-wise).

    fp32 rounding of these gradients (sums over 10^4-10^5 voxels with heavy cancellation) is itself
    up to ~4e-4 of their norm for *either* engine on some inputs (measured against float64: dense
    3.5e-4 where blocks had 4e-6, and blocks 2e-4 where dense had 5e-6). Where the direct
    comparison misses ``rtol``, ``reference64()`` (gradients of a float64 run of the dense engine)
    is the judge: the blocks engine must be within max(rtol, 2 x dense's error, 5e-4) of it, i.e. at
    fp32 rounding level. A wrong gradient is off by far more; exactness is tested in float64.
    """
    (fd, gd, _), (fb, gb, _) = dense, blocks
    for s, (a, b) in enumerate(zip(fb, fd, strict=True)):
        scale = b.abs().max().clamp_min(1e-30)
        assert float((a - b).abs().max() / scale) <= rtol, f"stage {s} features differ"
    assert (fb[0] != 0).any()
    top = max(float(g.norm()) for g in gd.values())
    g64 = None
    for n, ref in gd.items():
        err = float((gb[n] - ref).norm())
        if _bias_before_norm(n):
            assert err <= rtol * top and float(ref.norm()) <= 1e-4 * top, n
        elif err > rtol * float(ref.norm()):
            assert reference64 is not None, f"{n}: relative gradient error {err / float(ref.norm()):.2e}"
            g64 = reference64() if g64 is None else g64
            truth = g64[n]
            err_b = float((gb[n].double() - truth).norm() / truth.norm())
            err_d = float((ref.double() - truth).norm() / truth.norm())
            msg = f"{n}: blocks {err_b:.2e}, dense {err_d:.2e} from float64"
            assert err_b <= max(rtol, 2 * err_d, 5e-4), msg


def _float64_dense(enc, x, keep, bs, target, coarse="pool"):
    def run():
        enc64 = copy.deepcopy(enc).double()
        return _run(enc64, x.double(), keep, bs, "dense", coarse, target=[t.double() for t in target])[1]

    return run


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_resenc_unet("tiny").encoder


# ---- (near) exactness in float64 ---------------------------------------------------------------
@pytest.mark.parametrize(("size", "bs", "mbe"), [(32, 8, 1), pytest.param(64, 16, 1, marks=pytest.mark.slow)])
def test_float64_blocks_equal_dense_every_stage_in_blocks(tiny, size, bs, mbe) -> None:
    enc = copy.deepcopy(tiny).double()
    keep = _keep(3, size // bs, [0.3, 0.7, 1.0], seed=size + bs)
    keep[1] = False
    keep[1, 0, 0, 1, 1] = True  # sample 1: exactly one visible block
    x = torch.randn(3, 1, size, size, size, dtype=torch.float64)
    assert all(block_plan(enc, bs, mbe)[: 4])
    dense = _run(enc, x, keep, bs, "dense")
    blocks = _run(enc, x, keep, bs, "blocks", min_block_edge=mbe, target=dense[2])
    # s3d's masked_instance_norm takes statistics in fp32 even for fp64 input, so the reference is
    # fp32-exact; fp32 rounding of the gradients themselves is ~1e-3 here, so this separates real
    # differences from rounding.
    _assert_equal_engines(dense, blocks, 1e-5)


# ---- the acceptance tolerance in float32 --------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "bs", "fractions", "mbe"),
    [
        (32, 8, [0.25, 0.5], None),  # unequal visible counts
        (64, 16, [0.4, 0.15], 1),  # every stage in blocks, down to 1-voxel blocks
        (64, 8, [0.25, 0.1], None),  # block size 8 at 64^3, default crossover
        (32, 16, [1.0, 1.0], 1),  # all visible
    ],
)
def test_float32_blocks_equal_dense(tiny, size, bs, fractions, mbe) -> None:
    keep = _keep(len(fractions), size // bs, fractions, seed=size * bs)
    if keep.sum() == 0:
        keep[0, 0, 0, 0, 0] = True
    x = torch.randn(len(fractions), 1, size, size, size)
    dense = _run(tiny, x, keep, bs, "dense")
    blocks = _run(tiny, x, keep, bs, "blocks", min_block_edge=mbe, target=dense[2])
    _assert_equal_engines(dense, blocks, 1e-4, _float64_dense(tiny, x, keep, bs, dense[2]))


def test_one_visible_block_and_an_empty_sample(tiny) -> None:
    keep = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    keep[0, 0, 3, 0, 2] = True  # sample 0: one block at the volume's border; sample 1: nothing visible
    x = torch.randn(2, 1, 32, 32, 32)
    dense = _run(tiny, x, keep, 8, "dense")
    blocks = _run(tiny, x, keep, 8, "blocks", min_block_edge=1, target=dense[2])
    _assert_equal_engines(dense, blocks, 1e-4, _float64_dense(tiny, x, keep, 8, dense[2]))
    assert all(float(f[1].abs().max()) == 0.0 for f in blocks[0])


def test_coarse_ones_policy(tiny) -> None:
    keep = _keep(2, 2, [0.5, 0.5], seed=1)
    keep[0, 0, 0, 0, 0] = True
    x = torch.randn(2, 1, 32, 32, 32)
    dense = _run(tiny, x, keep, 16, "dense", coarse="ones")
    blocks = _run(tiny, x, keep, 16, "blocks", coarse="ones", min_block_edge=1, target=dense[2])
    _assert_equal_engines(dense, blocks, 1e-4, _float64_dense(tiny, x, keep, 16, dense[2], "ones"))


# ---- pieces against explicit references ----------------------------------------------------------------
def test_halo_gather_equals_padded_dense_crop() -> None:
    keep = _keep(2, 3, [0.5, 0.6], seed=4)
    lay = BlockLayout.from_keep(keep)
    e = 4
    dense = torch.randn(2, 3, 12, 12, 12) * F.interpolate(keep.float(), scale_factor=e)
    blocks = lay.to_blocks(dense)
    assert torch.equal(lay.to_dense(blocks), dense)
    halo = lay.gather_halo(blocks, (1, 1, 1), (2, 2, 2))
    padded = F.pad(dense, (1, 2, 1, 2, 1, 2))
    ref = []
    for b, gd, gh, gw in torch.nonzero(keep[:, 0]).tolist():
        ref.append(padded[b, :, gd * e: gd * e + e + 3, gh * e: gh * e + e + 3, gw * e: gw * e + e + 3])
    assert torch.equal(halo, torch.stack(ref))


def test_block_instance_norm_matches_per_sample_reference() -> None:
    keep = torch.zeros(3, 1, 2, 2, 1, dtype=torch.bool)
    keep[0, 0, 0, 0, 0] = keep[0, 0, 1, 1, 0] = keep[2, 0, 1, 0, 0] = True  # sample 1 empty
    lay = BlockLayout.from_keep(keep)
    x = torch.randn(lay.n_blocks, 4, 3, 3, 3, dtype=torch.float64) * 5 + 2
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = block_instance_norm(x, lay, w, b, 1e-5)
    for s in (0, 2):
        sel = lay.batch_index == s
        v = x[sel].transpose(0, 1).reshape(4, -1)
        ref = (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref * w[:, None] + b[:, None]
        torch.testing.assert_close(y[sel].transpose(0, 1).reshape(4, -1), ref)


def test_block_plan_and_default() -> None:
    enc = build_resenc_unet("tiny").encoder
    assert block_plan(enc, 16, 8) == [True, True, True, False, False, False]
    assert block_plan(enc, 16, 1) == [True] * 6
    assert block_plan(enc, 4, 8) == [False] * 6
    assert default_min_block_edge("cpu") >= 1


def test_bad_keep_grid_is_a_clear_error(tiny) -> None:
    with pytest.raises(ValueError, match="keep_grid"):
        block_encoder_forward(tiny, torch.randn(1, 1, 32, 32, 32), torch.ones(1, 1, 2, 2, 2), 8)


def test_saved_activations_shrink_with_the_visible_fraction(tiny) -> None:
    """Autograd keeps fewer bytes for the blocks engine at 75 % masking than for dense."""
    keep = _keep(2, 4, [0.25, 0.25], seed=7)
    x = torch.randn(2, 1, 64, 64, 64)

    def saved_bytes(engine: str) -> int:
        total = 0
        seen: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if engine == "dense":
                strides = [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
                keeps = stage_keeps(keep, x.shape[2:], strides)
                feats = tiny(x, keeps)
            else:
                feats = block_encoder_forward(tiny, x, keep, 16, min_block_edge=8)
        del feats
        return total

    assert saved_bytes("blocks") < 0.6 * saved_bytes("dense")


# ---- through the MAE wrapper's decoder and loss ------------------------------------------------------
def test_reconstruction_and_loss_equal_through_the_wrapper() -> None:
    wrapper = pytest.importorskip("s3d.sparse.wrapper")
    torch.manual_seed(0)
    mae = wrapper.SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1), block_size=8)
    keep = _keep(2, 4, [0.3, 0.5], seed=11)
    x = torch.randn(2, 1, 32, 32, 32)

    def step(model, xx, engine):
        keeps = [k.to(xx.dtype) for k in model.stage_keeps(keep, xx.shape[2:])]
        model.zero_grad(set_to_none=True)
        if engine == "dense":
            feats = model.backbone.encoder(xx, keeps)
        else:
            feats = block_encoder_forward(model.backbone.encoder, xx, keep, 8, model.coarse, 1)
        rec = model.backbone.decoder(model.densifier(feats, keeps[1:]))
        loss = wrapper.masked_mse_loss(rec, xx, keeps[0])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return rec.detach(), loss.detach(), grads

    (rd, ld, gd), (rb, lb, gb) = step(mae, x, "dense"), step(mae, x, "blocks")
    assert float((rb - rd).abs().max() / rd.abs().max()) <= 1e-4
    assert abs(float(lb - ld)) <= 1e-4 * abs(float(ld))
    assert gd.keys() == gb.keys() and len(gd) == sum(p.requires_grad for p in mae.parameters())
    _assert_equal_engines(([rd], gd, None), ([rb], gb, None), 1e-4,
                          lambda: step(copy.deepcopy(mae).double(), x.double(), "dense")[2])


def test_gradient_checkpointing_gives_the_same_gradients(tiny) -> None:
    keep = _keep(2, 4, [0.4, 0.3], seed=9)
    x = torch.randn(2, 1, 32, 32, 32)
    plain = _run(tiny, x, keep, 8, "blocks", min_block_edge=4)
    tiny.checkpointing = True
    try:
        ckpt = _run(tiny, x, keep, 8, "blocks", min_block_edge=4, target=plain[2])
    finally:
        tiny.checkpointing = False
    for n, g in plain[1].items():
        torch.testing.assert_close(ckpt[1][n], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()) + 1e-12)


# ---- autocast and torch.compile ---------------------------------------------------------------------
def test_autocast_bf16_close_to_dense(tiny) -> None:
    keep = _keep(2, 4, [0.4, 0.3], seed=5)
    x = torch.randn(2, 1, 32, 32, 32)
    strides = [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny(x, stage_keeps(keep, x.shape[2:], strides))
        out = block_encoder_forward(tiny, x, keep, 8, min_block_edge=1)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == b.dtype
        a, b = a.detach().float(), b.detach().float()
        assert float((a - b).norm() / b.norm()) < 3e-2


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny) -> None:
    keep = _keep(2, 4, [0.4, 0.3], seed=6)
    x = torch.randn(2, 1, 32, 32, 32)
    eager = block_encoder_forward(tiny, x, keep, 8, min_block_edge=1)
    compiled = torch.compile(block_encoder_forward)(tiny, x, keep, 8, "pool", 1)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
