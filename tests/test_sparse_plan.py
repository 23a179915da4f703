"""The mask plan (issue 23): built once per forward, consumed unchanged by every engine, nothing re-derived below.

References: the keep masks of a plan against an explicit formula (the grid repeated to voxels, then
max-pooled by each stage's stride: a stage voxel is visible when any input voxel under it is); the
engines against the masked-dense encoder run on the plan's own keeps.
"""

from __future__ import annotations

import copy
import dataclasses
import doctest

import pytest
import torch
import torch.nn.functional as F

import s3d.nn.masked as masked_mod
import s3d.sparse.mask as mask_mod
import s3d.sparse.plan as plan_mod
import s3d.sparse.wrapper as wrapper_mod
from s3d import build_resenc_unet
from s3d.sparse import BlockLayout, MaskPlan, SparseMAEWrapper, sample_block_mask
from s3d.sparse.autotune import engine_candidates, measure_engines

SIZE = (64, 64, 64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_resenc_unet("tiny", in_channels=1, num_classes=1)


def _formula_keeps(grid: torch.Tensor, size, strides, coarse: str) -> list[torch.Tensor]:
    """Input keep = each cell repeated over its voxels; stage keep = max over the stride's input voxels
    (``"ones"``: stages coarser than a cell are all visible)."""
    vox = grid.float()
    for a, (s, g) in enumerate(zip(size, grid.shape[2:], strict=True)):
        vox = vox.repeat_interleave(s // g, dim=2 + a)
    cell = [s // g for s, g in zip(size, grid.shape[2:], strict=True)]
    out = [vox]
    for st in strides:
        k = F.max_pool3d(vox, kernel_size=tuple(st))
        if coarse == "ones" and any(t > c for t, c in zip(st, cell, strict=True)):
            k = torch.ones_like(k)
        out.append(k)
    return out


def test_doctests() -> None:
    assert doctest.testmod(plan_mod).failed == 0


@pytest.mark.parametrize(("grid_shape", "coarse"), [((2, 2, 4), "pool"), ((8, 8, 8), "ones"), ((2, 4, 4), "pool")])
def test_plan_holds_the_grid_cell_and_keeps_of_the_formula(tiny, grid_shape, coarse) -> None:
    grid = torch.rand(2, 1, *grid_shape, generator=_gen(1)) < 0.4
    strides = tiny.config.stage_strides()
    plan = MaskPlan.build(grid.float(), SIZE, strides, coarse)  # 0/1 floats: stored as the bool grid
    assert plan.grid.dtype == torch.bool and torch.equal(plan.grid, grid)
    assert plan.cell == tuple(s // g for s, g in zip(SIZE, grid_shape, strict=True))
    assert plan.input_size == SIZE and plan.stage_strides == tuple(strides) and plan.batch_size == 2
    want = _formula_keeps(grid, SIZE, strides, coarse)
    assert len(plan.keeps) == len(want) == 1 + len(strides)
    for k, w in zip(plan.keeps, want, strict=True):
        assert k.dtype == torch.float32 and torch.equal(k, w)
    assert plan.masked_fraction() == pytest.approx(1.0 - grid.float().mean().item(), abs=1e-7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cell = (1, 1, 1)  # type: ignore[misc]


def test_a_grid_that_does_not_tile_the_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mask: a keep grid of spatial shape \(3, 4, 4\) does not tile"):
        MaskPlan.build(torch.ones(1, 1, 3, 4, 4), (32, 32, 32), [(1, 1, 1)])
    with pytest.raises(ValueError, match=r"mask: expected a keep grid \(B, 1, d, h, w\)"):
        MaskPlan.build(torch.ones(1, 2, 4, 4, 4), (32, 32, 32), [(1, 1, 1)])


def test_every_engine_consumes_the_plan_unchanged(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registered engine reads the keeps and the layout from the plan, and leaves the plan as it was.

    The plan is built for 16^3 cells; with ``min_block_edge=4`` the block engine runs the stem and stages 0..2
    in blocks and stages 3..4 masked-dense. The last stage's keep is then replaced by one the grid does not
    imply: an engine that derived keeps from the grid itself would not see it.
    """
    grid = sample_block_mask(2, SIZE, 16, 0.6, generator=_gen(2))
    plan = MaskPlan.build(grid, SIZE, tiny.config.stage_strides())
    odd = (torch.rand(plan.keeps[-1].shape, generator=_gen(3)) < 0.5).float()
    plan = dataclasses.replace(plan, keeps=(*plan.keeps[:-1], odd))
    before = [t.clone() for t in (plan.grid, *plan.keeps)]
    x = torch.randn(2, 1, *SIZE, generator=_gen(4))
    with torch.no_grad():
        ref = tiny.encoder(x, list(plan.keeps))  # the masked-dense reference on the plan's keeps
        ref64 = copy.deepcopy(tiny.encoder).double()(x.double(), [k.double() for k in plan.keeps])
    built = []
    from_keep = BlockLayout.from_keep.__func__
    monkeypatch.setattr(BlockLayout, "from_keep", classmethod(lambda cls, k: built.append(k) or from_keep(cls, k)))
    for mod, name in ((masked_mod, "stage_keeps"), (masked_mod, "expand_keep"), (plan_mod, "stage_keeps"),
                      (mask_mod, "block_grid_size")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("an engine derived masks again"))
    assert set(wrapper_mod.ENGINES) == {"dense", "blocks"}
    for name, engine in wrapper_mod.ENGINES.items():
        with torch.no_grad():
            feats = engine(tiny.encoder, x, plan, min_block_edge=4)
        assert len(feats) == len(ref)
        for s, (f, r, r64) in enumerate(zip(feats, ref, ref64, strict=True)):
            if name == "dense":
                assert torch.equal(f, r), s  # the same computation
            else:  # same-run yardstick: within 10x the dense float32 error against float64
                yardstick = float((r.double() - r64).abs().max())
                assert float((f.double() - r64).abs().max()) <= 10 * yardstick + 1e-12, (name, s)
        assert bool((feats[-1][odd.expand_as(feats[-1]) == 0] == 0).all()), name  # the plan's own last keep
    assert len(built) == 1 and built[0] is plan.grid  # the layout: built once, from the plan's grid
    assert plan.layout is plan.layout
    for t, b in zip((plan.grid, *plan.keeps), before, strict=True):
        assert torch.equal(t, b)


def test_autotune_times_every_candidate_on_the_same_plan(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = sample_block_mask(1, (32, 32, 32), 16, 0.5, generator=_gen(5))
    plan = MaskPlan.build(grid, (32, 32, 32), tiny.config.stage_strides())
    seen = []
    engines = {name: (lambda enc, x, p, _f=fn, **kw: seen.append(p) or _f(enc, x, p, **kw))
               for name, fn in wrapper_mod.ENGINES.items()}
    candidates = engine_candidates(tiny.encoder, plan.cell)
    with torch.no_grad():
        measure_engines(engines, candidates, tiny.encoder, torch.randn(1, 1, 32, 32, 32, generator=_gen(6)), plan,
                        warmup=1, repeats=1)
    assert len(seen) == 2 * len(candidates) and all(p is plan for p in seen)


@pytest.mark.parametrize("engine", ["dense", "blocks"])
def test_the_wrapper_builds_one_plan_per_forward_and_hands_it_down(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    mae = SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1), block_size=16, mask_ratio=0.5, engine=engine)
    plans, handed = [], []
    build = MaskPlan.build.__func__
    monkeypatch.setattr(MaskPlan, "build", classmethod(lambda cls, *a, **k: plans.append(build(cls, *a, **k))
                                                       or plans[-1]))
    inner = wrapper_mod.ENGINES[engine]
    monkeypatch.setitem(wrapper_mod.ENGINES, engine, lambda enc, x, p, **kw: handed.append(p) or inner(enc, x, p, **kw))
    seen_by_densifier = []
    densify = mae.densifier.forward
    monkeypatch.setattr(mae.densifier, "forward",
                        lambda skips, keeps: seen_by_densifier.append(keeps) or densify(skips, keeps))
    keep = sample_block_mask(2, (32, 32, 32), 16, 0.5, generator=_gen(7))
    out = mae(torch.randn(2, 1, 32, 32, 32, generator=_gen(8)), mask=keep.float())
    assert len(plans) == 1 and handed == plans
    (plan,) = plans
    assert out.mask is plan.grid and torch.equal(plan.grid, keep)
    assert all(a is b for a, b in zip(seen_by_densifier[0], plan.keeps[1:], strict=True))


def test_resenc_unet_forward_mask_goes_down_as_a_plan(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = sample_block_mask(2, (32, 32, 32), 8, 0.5, generator=_gen(9))
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(10))
    plans = []
    build = MaskPlan.build.__func__
    monkeypatch.setattr(MaskPlan, "build", classmethod(lambda cls, *a, **k: plans.append(build(cls, *a, **k))
                                                       or plans[-1]))
    with torch.no_grad():
        out = tiny(x, mask=keep)
        ref = tiny.decoder(tiny.encoder(x, _formula_keeps(keep, (32, 32, 32), tiny.config.stage_strides(), "pool")))
    assert len(plans) == 1 and torch.equal(out, ref)
