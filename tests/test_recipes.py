"""Pre-training recipes: the paper's numbers, JSON round trip, registry, optimiser and PolyLR."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

import s3d.pretrain.recipes as recipes_mod
import s3d.runtime.lr as lr_mod
from s3d import build_resenc_unet
from s3d.pretrain.recipes import (
    RECIPES,
    PretrainRecipe,
    get_recipe,
    list_recipes,
    register_recipe,
)
from s3d.runtime.lr import lr_at
from s3d.runtime.optim import sgd
from s3d.sparse import SparseMAEWrapper


def test_doctests() -> None:
    assert doctest.testmod(recipes_mod).failed == 0
    assert doctest.testmod(lr_mod).failed == 0


def test_s3d_b_and_l_match_the_paper() -> None:
    b, l = get_recipe("s3d-b"), get_recipe("s3d-l")
    assert (b.batch_size, b.lr, b.steps) == (6, 1e-2, 250_000)
    assert (l.batch_size, l.lr, l.steps) == (48, 3e-2, 1_000_000)
    for r in (b, l):
        assert r.method == "mae" and r.optimizer == "sgd" and r.nesterov
        assert (r.momentum, r.weight_decay, r.poly_exponent, r.grad_clip) == (0.99, 3e-5, 0.9, 12.0)
        assert r.patch_size == (160, 160, 160) and r.warmup_steps == 0
        assert r.method_kwargs["mask_ratio"] == [0.6, 0.9] and r.method_kwargs["block_size"] == 32


def test_table1_rows_by_name() -> None:
    names = set(list_recipes("mae"))
    ratios = {f"t1b-ratio-{p}": p / 100 for p in (30, 45, 60, 75, 90)}
    assert set(ratios) <= names and "t1b-ratio-60-90" in names
    for n, r in ratios.items():
        assert get_recipe(n).method_kwargs["mask_ratio"] == r
    rows = ["t1a-base", "t1a-sparse", "t1a-mask-token", "t1a-densify"]
    flags = [tuple(get_recipe(n).method_kwargs[k] for k in ("sparse", "mask_token", "densify")) for n in rows]
    assert flags == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_json_round_trip_and_wrapper_accepts_kwargs(name: str) -> None:
    r = get_recipe(name)
    text = r.to_json()
    assert PretrainRecipe.from_json(text) == r
    assert json.loads(text)["name"] == name
    if r.method == "mae":
        net = build_resenc_unet("tiny", num_classes=1)
        SparseMAEWrapper(net, **r.method_kwargs)  # every kwarg is a real wrapper argument


def test_registry_is_protected_and_errors_name_things() -> None:
    r = get_recipe("s3d-b")
    r.method_kwargs["mask_ratio"] = 0.1
    r.lr = 5.0
    assert RECIPES["s3d-b"].lr == 1e-2 and RECIPES["s3d-b"].method_kwargs["mask_ratio"] == [0.6, 0.9]
    with pytest.raises(ValueError, match="s3d-x"):
        get_recipe("s3d-x")
    with pytest.raises(ValueError, match="already exists"):
        register_recipe(get_recipe("s3d-b"))
    with pytest.raises(ValueError, match="bogus"):
        PretrainRecipe.from_dict({"name": "a", "bogus": 1})
    with pytest.raises(ValueError, match="warmup_steps"):
        PretrainRecipe(name="a", steps=10, warmup_steps=10)
    merged = get_recipe("s3d-b").replace(method_kwargs={"block_size": 16})
    assert merged.method_kwargs["block_size"] == 16 and merged.method_kwargs["mask_ratio"] == [0.6, 0.9]


def test_optimizer_and_per_step_poly_schedule() -> None:
    r = get_recipe("s3d-b").replace(steps=50)
    model = torch.nn.Linear(3, 1)
    opt = sgd(model.parameters(), r.lr, momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay)
    group = opt.param_groups[0]
    got = (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"])
    assert got == (1e-2, 0.99, True, 3e-5)
    lrs = [lr_at(r.lr_phases(), t, r.poly_exponent) for t in range(r.steps + 2)]
    ref = [1e-2 * (1 - t / 50) ** 0.9 for t in range(50)]  # nnU-Net's PolyLR, per step (the formula)
    assert lrs[:50] == pytest.approx(ref, rel=1e-12)  # float64, a division and a power: ~1e-15
    assert lrs[50:] == [0.0, 0.0]  # 0 from the end on
    # a pure function of the step: a resumed run at step 20 gets the same lr without any saved state
    assert lr_at(get_recipe("s3d-b").replace(steps=50).lr_phases(), 20) == lrs[20]


def test_warmup() -> None:
    r = get_recipe("s3d-b").replace(steps=20, warmup_steps=4, lr=1.0)
    lrs = [lr_at(r.lr_phases(), t, r.poly_exponent) for t in range(20)]
    # peak * (t + 1) / 4, then poly; float64 with <= 2 roundings and a power (<= 1 ulp): <= 4 eps64 < 1e-15
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0], rel=1e-15)
    assert lrs[10] == pytest.approx((1 - 6 / 16) ** 0.9, rel=1e-15)


def test_optimizer_skips_frozen() -> None:
    mae = SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1))
    opt = sgd(mae.parameters(), 1e-2)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in mae.parameters() if p.requires_grad)
