"""The block-sparse encoder engine equals the masked-dense reference ``encoder(x, stage_keeps(...))``.

References: the dense engine (s3d's masked encoder, itself tested against an explicit-indexing
implementation in test_sparse_encoder.py), run in float64 as the truth; in float32 the blocks engine
must be as close to it as the float32 dense engine is (tests/tolerance.py: the yardstick); an
explicit pad-and-crop for the halo gather.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import EPS32, EPS64, EPS_BF16, assert_yardstick, flat, max_rel, norm_rel

from s3d import build_resenc_unet
from s3d.nn.masked import stage_keeps
from s3d.sparse.block_engine import (
    BlockLayout,
    block_encoder_forward,
    block_instance_norm,
    block_plan,
    default_min_block_edge,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


def _assert_engines_within_yardstick(dense, blocks, truth) -> None:
    """float32 blocks engine vs float64 (``truth``) within K x the float32 dense engine's error vs float64.

    ``dense``, ``blocks``, ``truth``: ``(features, grads, _)`` of ``_run``. Per stage, features by
    max-abs error / max |truth|; gradients as one vector over every parameter (norm-wise), because a
    single tensor's gradient can be ill-conditioned (InstanceNorm's backward subtracts a channel mean
    of the upstream gradient: float32 loses up to ~2e-3 of some norm-bias gradients, in *both* engines,
    by an amount that depends on the kernels' summation order), while the whole vector's error is the
    sum of many such roundings and comparable between engines. A conv bias before a norm has an
    analytically zero gradient: both engines' values are rounding noise, at most K x dense's whole
    gradient error. Exactness (no rounding) is tested in float64 above.
    """
    (fd, gd, _), (fb, gb, _), (f64, g64, _) = dense, blocks, truth
    for s, (a, d, r) in enumerate(zip(fb, fd, f64, strict=True)):
        assert_yardstick(max_rel(a, r), max_rel(d, r), f"stage {s} features")
    assert (fb[0] != 0).any()
    names = [n for n in g64 if not _bias_before_norm(n)]
    assert names and set(gb) == set(gd) == set(g64)
    g_ref = flat(g64, names)
    err_d = norm_rel(flat(gd, names), g_ref)
    assert_yardstick(norm_rel(flat(gb, names), g_ref), err_d, "gradients (all parameters)")
    for n in set(g64) - set(names):  # |g| <= K x dense's whole-gradient error (absolute)
        assert_yardstick(float(gb[n].double().norm() / g_ref.norm()), err_d, f"{n} (zero gradient)")


def _float64(enc, x, keep, bs, target, coarse="pool"):
    """Features and gradients of a float64 run of the dense engine (the truth)."""
    enc64 = copy.deepcopy(enc).double()
    return _run(enc64, x.double(), keep, bs, "dense", coarse, target=[t.double() for t in target])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_resenc_unet("tiny").encoder


# ---- exactness in float64 ---------------------------------------------------------------------
@pytest.mark.numerical
@pytest.mark.parametrize(("size", "bs", "mbe"), [(32, 8, 1), pytest.param(64, 16, 1, marks=pytest.mark.slow)])
def test_float64_blocks_equal_dense_every_stage_in_blocks(tiny, size, bs, mbe) -> None:
    """Both engines take InstanceNorm statistics in float64 for float64 input, so this is a real float64
    comparison. Rounding errors scale with the unit roundoff: the float64 engines may differ by at most
    K x (the float32 dense engine's error against float64) x eps64 / eps32, measured on the same input.
    (With float32 statistics, the old masked norm, the features were off by 4.7e-7.)"""
    enc = copy.deepcopy(tiny).double()
    keep = _keep(3, size // bs, [0.3, 0.7, 1.0], seed=size + bs)
    keep[1] = False
    keep[1, 0, 0, 1, 1] = True  # sample 1: exactly one visible block
    x = torch.randn(3, 1, size, size, size, dtype=torch.float64, generator=_gen(size))
    assert all(block_plan(enc, bs, mbe)[: 4])
    dense = _run(enc, x, keep, bs, "dense")
    blocks = _run(enc, x, keep, bs, "blocks", min_block_edge=mbe, target=dense[2])
    d32 = _run(tiny, x.float(), keep, bs, "dense", target=[t.float() for t in dense[2]])  # the yardstick
    ratio = EPS64 / EPS32
    for s, (a, d, y) in enumerate(zip(blocks[0], dense[0], d32[0], strict=True)):
        assert_yardstick(max_rel(a, d), max_rel(y, d) * ratio, f"stage {s} features", floor=EPS64)
    names = [n for n in dense[1] if not _bias_before_norm(n)]
    g_ref = flat(dense[1], names)
    yard = norm_rel(flat(d32[1], names), g_ref) * ratio
    assert_yardstick(norm_rel(flat(blocks[1], names), g_ref), yard, "gradients", floor=EPS64)
    for n in set(dense[1]) - set(names):  # analytically zero: rounding noise in both engines
        for g in (blocks[1][n], dense[1][n]):
            assert_yardstick(float(g.norm() / g_ref.norm()), yard, f"{n} (zero gradient)", floor=EPS64)


# ---- float32: blocks within the yardstick of the float32 dense engine ------------------------------------
@pytest.mark.parametrize(
    ("size", "bs", "fractions", "mbe"),
    [
        pytest.param(32, 8, [0.25, 0.5], None, marks=pytest.mark.numerical),  # unequal visible counts
        pytest.param(64, 16, [0.4, 0.15], 1, marks=pytest.mark.numerical),  # every stage in blocks, to 1-voxel blocks
        (64, 8, [0.25, 0.1], None),  # block size 8 at 64^3, default crossover (not in the second-ISA pass: time)
        pytest.param(32, 16, [1.0, 1.0], 1, marks=pytest.mark.numerical),  # all visible
    ],
)
def test_float32_blocks_equal_dense(tiny, size, bs, fractions, mbe) -> None:
    keep = _keep(len(fractions), size // bs, fractions, seed=size * bs)
    if keep.sum() == 0:
        keep[0, 0, 0, 0, 0] = True
    x = torch.randn(len(fractions), 1, size, size, size, generator=_gen(size + bs))
    dense = _run(tiny, x, keep, bs, "dense")
    blocks = _run(tiny, x, keep, bs, "blocks", min_block_edge=mbe, target=dense[2])
    _assert_engines_within_yardstick(dense, blocks, _float64(tiny, x, keep, bs, dense[2]))


@pytest.mark.numerical
def test_one_visible_block_and_an_empty_sample(tiny) -> None:
    keep = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    keep[0, 0, 3, 0, 2] = True  # sample 0: one block at the volume's border; sample 1: nothing visible
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(20))
    dense = _run(tiny, x, keep, 8, "dense")
    blocks = _run(tiny, x, keep, 8, "blocks", min_block_edge=1, target=dense[2])
    _assert_engines_within_yardstick(dense, blocks, _float64(tiny, x, keep, 8, dense[2]))
    assert all(float(f[1].abs().max()) == 0.0 for f in blocks[0])


@pytest.mark.numerical
def test_coarse_ones_policy(tiny) -> None:
    keep = _keep(2, 2, [0.5, 0.5], seed=1)
    keep[0, 0, 0, 0, 0] = True
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(21))
    dense = _run(tiny, x, keep, 16, "dense", coarse="ones")
    blocks = _run(tiny, x, keep, 16, "blocks", coarse="ones", min_block_edge=1, target=dense[2])
    _assert_engines_within_yardstick(dense, blocks, _float64(tiny, x, keep, 16, dense[2], "ones"))


# ---- pieces against explicit references ----------------------------------------------------------------
@pytest.mark.numerical
def test_halo_gather_equals_padded_dense_crop() -> None:
    keep = _keep(2, 3, [0.5, 0.6], seed=4)
    lay = BlockLayout.from_keep(keep)
    e = 4
    dense = torch.randn(2, 3, 12, 12, 12, generator=_gen(22)) * F.interpolate(keep.float(), scale_factor=e)
    blocks = lay.to_blocks(dense)
    assert torch.equal(lay.to_dense(blocks), dense)
    halo = lay.gather_halo(blocks, (1, 1, 1), (2, 2, 2))
    padded = F.pad(dense, (1, 2, 1, 2, 1, 2))
    ref = []
    for b, gd, gh, gw in torch.nonzero(keep[:, 0]).tolist():
        ref.append(padded[b, :, gd * e: gd * e + e + 3, gh * e: gh * e + e + 3, gw * e: gw * e + e + 3])
    assert torch.equal(halo, torch.stack(ref))


@pytest.mark.numerical
def test_block_instance_norm_matches_per_sample_reference() -> None:
    keep = torch.zeros(3, 1, 2, 2, 1, dtype=torch.bool)
    keep[0, 0, 0, 0, 0] = keep[0, 0, 1, 1, 0] = keep[2, 0, 1, 0, 0] = True  # sample 1 empty
    lay = BlockLayout.from_keep(keep)
    g = _gen(23)
    x = torch.randn(lay.n_blocks, 4, 3, 3, 3, dtype=torch.float64, generator=g) * 5 + 2
    w, b = torch.randn(4, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g)
    y = block_instance_norm(x, lay, w, b, 1e-5)
    assert y.dtype == torch.float64
    for s in (0, 2):
        sel = lay.batch_index == s
        v = x[sel].transpose(0, 1).reshape(4, -1)
        ref = (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref * w[:, None] + b[:, None]
        # fp64 statistics: tolerance the first-order rounding bound of the sums, n * eps64 * max|ref|
        # (~6e-14); float32 statistics would be off by ~1e-7 x max|ref| here.
        tol = v.shape[1] * torch.finfo(torch.float64).eps * float(ref.abs().max())
        assert float((y[sel].transpose(0, 1).reshape(4, -1) - ref).abs().max()) <= tol


def test_block_plan_and_default() -> None:
    enc = build_resenc_unet("tiny").encoder
    assert block_plan(enc, 16, 8) == [True, True, True, False, False, False]
    assert block_plan(enc, 16, 1) == [True] * 6
    assert block_plan(enc, 4, 8) == [False] * 6
    assert default_min_block_edge("cpu") >= 1


def test_bad_keep_grid_is_a_clear_error(tiny) -> None:
    with pytest.raises(ValueError, match="keep_grid"):
        block_encoder_forward(tiny, torch.zeros(1, 1, 32, 32, 32), torch.ones(1, 1, 2, 2, 2), 8)


def test_saved_activations_shrink_with_the_visible_fraction(tiny) -> None:
    """Autograd keeps fewer bytes for the blocks engine at 75 % masking than for dense."""
    keep = _keep(2, 4, [0.25, 0.25], seed=7)
    x = torch.randn(2, 1, 64, 64, 64, generator=_gen(24))

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
@pytest.mark.numerical
def test_reconstruction_and_loss_equal_through_the_wrapper() -> None:
    wrapper = pytest.importorskip("s3d.sparse.wrapper")
    torch.manual_seed(0)
    mae = wrapper.SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1), block_size=8)
    keep = _keep(2, 4, [0.3, 0.5], seed=11)
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(25))

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
    r64, l64, g64 = step(copy.deepcopy(mae).double(), x.double(), "dense")
    assert gd.keys() == gb.keys() == g64.keys() and len(gd) == sum(p.requires_grad for p in mae.parameters())
    assert_yardstick(max_rel(rb, r64), max_rel(rd, r64), "reconstruction")
    assert_yardstick(abs(float(lb) - float(l64)) / float(l64), abs(float(ld) - float(l64)) / float(l64), "loss")
    _assert_engines_within_yardstick(([rd], gd, None), ([rb], gb, None), ([r64], g64, None))


def test_gradient_checkpointing_gives_the_same_gradients(tiny) -> None:
    keep = _keep(2, 4, [0.4, 0.3], seed=9)
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(26))
    plain = _run(tiny, x, keep, 8, "blocks", min_block_edge=4)
    tiny.checkpointing = True
    try:
        ckpt = _run(tiny, x, keep, 8, "blocks", min_block_edge=4, target=plain[2])
    finally:
        tiny.checkpointing = False
    # recomputation runs the same kernels on the same inputs in the same order (one path, one machine):
    # bitwise equal on any CPU
    assert all(torch.equal(a, b) for a, b in zip(ckpt[0], plain[0], strict=True))
    for n, g in plain[1].items():
        assert torch.equal(ckpt[1][n], g), n


# ---- autocast and torch.compile ---------------------------------------------------------------------
@pytest.mark.numerical
def test_autocast_bf16_close_to_dense(tiny) -> None:
    """Under bf16 autocast the blocks engine is as close to a float64 run as the dense engine is
    (yardstick: dense under the same autocast; floor one bf16 ulp, 2^-7)."""
    keep = _keep(2, 4, [0.4, 0.3], seed=5)
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(27))
    strides = [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    keeps = stage_keeps(keep, x.shape[2:], strides)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny(x, keeps)
        out = block_encoder_forward(tiny, x, keep, 8, min_block_edge=1)
    with torch.no_grad():
        ref64 = copy.deepcopy(tiny).double()(x.double(), [k.double() for k in keeps])
    assert ref[0].dtype == torch.bfloat16
    for s, (a, b, r) in enumerate(zip(out, ref, ref64, strict=True)):
        assert a.dtype == b.dtype
        assert_yardstick(norm_rel(a, r), norm_rel(b, r), f"bf16 stage {s}", floor=EPS_BF16)


@pytest.mark.numerical
@pytest.mark.slow
def test_torch_compile_matches_eager(tiny) -> None:
    """Inductor reorders float32 sums: compiled within the yardstick of eager, both against float64."""
    keep = _keep(2, 4, [0.4, 0.3], seed=6)
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(28))
    eager = block_encoder_forward(tiny, x, keep, 8, min_block_edge=1)
    compiled = torch.compile(block_encoder_forward)(tiny, x, keep, 8, "pool", 1)
    with torch.no_grad():
        ref64 = block_encoder_forward(copy.deepcopy(tiny).double(), x.double(), keep, 8, min_block_edge=1)
    for s, (a, b, r) in enumerate(zip(compiled, eager, ref64, strict=True)):
        assert_yardstick(max_rel(a, r), max_rel(b, r), f"compiled stage {s}")
