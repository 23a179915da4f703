"""SparseMAEWrapper: loss, gradients, parameter accounting, densify flags, export, overfitting.

Every test that runs the sparse encoder names its engine (``engine="dense"`` / ``"blocks"``), because
``engine="auto"`` runs whichever it timed fastest; properties that hold for both engines are
parametrized over both, and ``engine_probe.forward_and_engine`` checks which engine really computed
the encoder.
"""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from engine_probe import forward_and_engine as _forward
from tolerance import EPS32, assert_yardstick, max_rel

import s3d.sparse.block_engine as block_engine_mod
import s3d.sparse.densify as densify_mod
import s3d.sparse.wrapper as wrapper_mod
from s3d import build_resenc_unet
from s3d.sparse import SparseMAEWrapper, masked_mse_loss, sample_block_mask
from s3d.sparse.wrapper import resolve_engine

SIZE = (32, 32, 32)
ENGINES = ("dense", "blocks")


def _net(**kw) -> torch.nn.Module:
    torch.manual_seed(0)  # He init draws from the global RNG
    return build_resenc_unet("tiny", in_channels=1, num_classes=1, **kw)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(value: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of a scalar against its float64 reference."""
    return abs(float(value.detach()) - float(ref)) / abs(float(ref))


def _densify_param_formula(features) -> int:
    tokens = sum(features)
    convs = sum(27 * c * c + c for c in features[1:])  # 3x3x3 conv C->C with bias, all but stage 0
    return tokens + convs


def test_doctests() -> None:
    assert doctest.testmod(wrapper_mod).failed == 0
    assert doctest.testmod(densify_mod).failed == 0


@pytest.mark.numerical
def test_masked_mse_matches_indexing_and_grad_zero_at_visible() -> None:
    g = torch.Generator().manual_seed(0)
    rec = torch.randn(2, 1, *SIZE, generator=g, requires_grad=True)
    x = torch.randn(2, 1, *SIZE, generator=g)
    keep = sample_block_mask(2, SIZE, 8, (0.3, 0.9), generator=g)
    keep_vox = keep.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    loss = masked_mse_loss(rec, x, keep_vox.float())
    masked = ~keep_vox
    diff64 = rec.detach().double() - x.double()
    ref = (diff64[masked] ** 2).mean()  # float64 mean over every masked voxel of the batch
    plain = ((rec.detach() - x)[masked] ** 2).mean()  # the yardstick: a plain float32 mean
    assert_yardstick(_rel(loss, ref), _rel(plain, ref), "masked MSE")
    loss.backward()
    assert bool((rec.grad[keep_vox] == 0).all())
    # float32 gradient vs the float64 formula 2 (rec - x) / n: three roundings (the difference, 1 / n and
    # the product; x 2 and x 0/1 are exact, n < 2^24 is exact) of half an ulp each, so relative error
    # <= 1.5 eps32; tolerance 2 eps32
    grad_ref = 2 * diff64[masked] / masked.sum()
    torch.testing.assert_close(rec.grad[masked].double(), grad_ref, rtol=2 * EPS32, atol=0.0)


@pytest.mark.numerical
def test_loss_mask_excludes_voxels() -> None:
    g = torch.Generator().manual_seed(1)
    rec, x = torch.randn(1, 1, *SIZE, generator=g), torch.randn(1, 1, *SIZE, generator=g)
    keep = torch.zeros(1, 1, *SIZE)
    keep[..., :16] = 1
    lm = torch.ones(1, 1, *SIZE)
    lm[:, :, :8] = 0
    counted = (keep == 0) & (lm == 1)
    ref = ((rec.double() - x.double())[counted] ** 2).mean()
    plain = ((rec - x)[counted] ** 2).mean()  # the yardstick: a plain float32 mean
    assert_yardstick(_rel(masked_mse_loss(rec, x, keep, lm), ref), _rel(plain, ref), "masked MSE with loss mask")


@pytest.mark.numerical
@pytest.mark.parametrize("engine", ENGINES)
def test_wrapper_loss_reconstruction_gradient_and_mask(engine: str) -> None:
    net = _net()
    mae = SparseMAEWrapper(net, block_size=16, mask_ratio=0.5, engine=engine)
    assert mae.backbone is net
    x = _randn(2, 1, *SIZE, seed=10)
    keep = sample_block_mask(2, SIZE, 16, 0.5, generator=torch.Generator().manual_seed(0))
    out, ran = _forward(mae, x, mask=keep)
    assert ran == engine
    assert torch.equal(out.mask, keep) and out.reconstruction.shape == x.shape
    out.reconstruction.retain_grad()
    out.loss.backward()
    kv = keep.repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    assert bool((out.reconstruction.grad[kv] == 0).all())
    assert bool((out.reconstruction.grad[~kv] != 0).any())
    ref = ((out.reconstruction.detach().double() - x.double())[~kv] ** 2).mean()
    plain = ((out.reconstruction.detach() - x)[~kv] ** 2).mean()  # the yardstick: a plain float32 mean
    assert_yardstick(_rel(out.loss, ref), _rel(plain, ref), "loss")


def test_auto_engine_without_measuring_is_blocks_on_cpu_and_runs_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With measuring off, the CPU default really runs the block engine (tests name the engine they test).

    With measuring on, "auto" runs what it timed fastest: tests/test_sparse_autotune.py.
    """
    monkeypatch.setenv("S3D_ENGINE_AUTOTUNE", "0")
    mae = SparseMAEWrapper(_net(), block_size=8, mask_ratio=0.6)
    assert mae.engine == "auto" and resolve_engine(mae.engine, torch.device("cpu")) == "blocks"
    keep = sample_block_mask(1, SIZE, 8, 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _forward(mae, _randn(1, 1, *SIZE, seed=11), mask=keep)[1] == "blocks"


@pytest.mark.numerical
def test_blocks_engine_equals_dense() -> None:
    """The "blocks" engine vs the "dense" engine of one wrapper, each judged against a float64 run."""
    mae = SparseMAEWrapper(_net().eval(), block_size=8, mask_ratio=0.6, engine="dense")
    x = _randn(2, 1, *SIZE, seed=4)
    keep = sample_block_mask(2, SIZE, 8, 0.6, generator=torch.Generator().manual_seed(3))
    # 8^3 cells at 32^3: the stem and stages 0-1 run in block layout on CPU, stages 2-4 masked-dense
    assert block_engine_mod.block_plan(mae.backbone.encoder, 8, block_engine_mod.default_min_block_edge("cpu"))[
        :3] == [True, True, True]
    mae64 = copy.deepcopy(mae).double()  # same weights, tokens and densify convs, dense engine
    with torch.no_grad():
        a, ran_a = _forward(mae, x, mask=keep)
        mae.engine = "blocks"
        b, ran_b = _forward(mae, x, mask=keep)
        ref = mae64(x.double(), mask=keep)
    assert (ran_a, ran_b) == ("dense", "blocks")
    # the float32 dense engine is the yardstick; a wrong stage (e.g. a missing halo) is off by > 1e-2
    assert_yardstick(max_rel(b.reconstruction, ref.reconstruction), max_rel(a.reconstruction, ref.reconstruction),
                     "blocks reconstruction")
    assert_yardstick(_rel(b.loss, ref.loss), _rel(a.loss, ref.loss), "blocks loss")


@pytest.mark.parametrize("engine", ENGINES)
def test_same_generator_seed_same_output(engine: str) -> None:
    mae = SparseMAEWrapper(_net(), block_size=8, mask_ratio=(0.6, 0.9), engine=engine)
    x = _randn(2, 1, *SIZE, seed=12)
    a, ran = _forward(mae, x, generator=torch.Generator().manual_seed(5))
    b = mae(x, generator=torch.Generator().manual_seed(5))
    assert ran == engine
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss)


@pytest.mark.numerical
@pytest.mark.parametrize("engine", ENGINES)
def test_reconstruction_ignores_masked_input(engine: str) -> None:
    mae = SparseMAEWrapper(_net(), block_size=8, mask_ratio=0.6, engine=engine).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, *SIZE, generator=g)
    keep = sample_block_mask(1, SIZE, 8, 0.6, generator=g)
    kv = keep.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    x2 = torch.where(kv, x, torch.randn(x.shape, generator=g) * 50)
    with torch.no_grad():
        a, ran = _forward(mae, x, mask=keep)
        assert ran == engine
        assert torch.equal(a.reconstruction, mae(x2, mask=keep).reconstruction)


@pytest.mark.parametrize(
    "flags,extra",
    [
        (dict(sparse=False, mask_token=False, densify=False), 0),  # Table 1a Base (no engine: dense encoder)
        (dict(mask_token=False, densify=False, engine="dense"), 0),  # + sparse conv and norm
        (dict(mask_token=False, densify=False, engine="blocks"), 0),
        (dict(densify=False, engine="dense"), "tokens"),  # + mask token
        (dict(densify=False, engine="blocks"), "tokens"),
        (dict(engine="dense"), "all"),  # + densify conv
        (dict(engine="blocks"), "all"),
    ],
)
def test_parameter_count_and_every_parameter_gets_a_gradient(flags: dict, extra) -> None:
    net = _net()
    n_backbone = sum(p.numel() for p in net.parameters())
    feats = net.config.features_per_stage
    mae = SparseMAEWrapper(net, block_size=8, mask_ratio=0.6, **flags)
    want = {0: 0, "tokens": sum(feats), "all": _densify_param_formula(feats)}[extra]
    assert sum(p.numel() for p in mae.parameters()) == n_backbone + want
    # one tensor per weight: no duplicated or aliased parameters
    assert len({id(p) for p in mae.parameters()}) == len(list(mae.named_parameters()))
    out, ran = _forward(mae, _randn(2, 1, *SIZE, seed=13), generator=torch.Generator().manual_seed(6))
    assert ran == flags.get("engine", "dense")  # sparse=False runs the dense encoder on the zeroed image
    out.loss.backward()
    frozen = {n for n, p in mae.named_parameters() if not p.requires_grad}
    n_heads = len(net.decoder.seg_layers)
    heads = {f"backbone.decoder.seg_layers.{i}.{w}" for i in range(n_heads - 1) for w in ("weight", "bias")}
    assert frozen == heads
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("engine", ENGINES)
def test_unfrozen_heads_are_the_only_parameters_without_gradient(engine: str) -> None:
    mae = SparseMAEWrapper(_net(), block_size=8, mask_ratio=0.6, freeze_unused_heads=False, engine=engine)
    out, ran = _forward(mae, _randn(1, 1, *SIZE, seed=14), generator=torch.Generator().manual_seed(7))
    assert ran == engine
    out.loss.backward()
    no_grad = {n.rsplit(".", 1)[0] for n, p in mae.named_parameters() if p.grad is None}
    assert no_grad == {f"backbone.decoder.seg_layers.{i}" for i in range(3)}


def test_resenc_l_parameter_count() -> None:
    net = build_resenc_unet("resenc_l", in_channels=1, num_classes=1)
    n_backbone = sum(p.numel() for p in net.parameters())
    mae = SparseMAEWrapper(net)
    n = sum(p.numel() for p in mae.parameters())
    assert n == n_backbone + _densify_param_formula((32, 64, 128, 256, 320, 320))
    # integer counts against printed numbers: within half a unit of the last printed digit
    assert n_backbone == pytest.approx(102.35e6, abs=0.005e6)  # the paper's 102.35 M
    assert n == pytest.approx(110.2e6, abs=0.05e6)  # the released code's conversion holds ~200.5 M


def test_export_backbone_loads_strictly() -> None:
    net = _net()
    mae = SparseMAEWrapper(net, block_size=16, mask_ratio=0.75)
    opt = torch.optim.SGD(mae.parameters(), lr=0.1)
    mae(_randn(1, 1, *SIZE, seed=15), generator=torch.Generator().manual_seed(8)).loss.backward()
    opt.step()
    state = mae.export_backbone()
    assert not any("densif" in k or "mask_token" in k for k in state)
    fresh = build_resenc_unet(net.config)
    fresh.load_state_dict(state, strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # a detached copy: later training does not change the exported weights
    w = next(iter(state.values())).clone()
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert torch.equal(next(iter(state.values())), w)


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_classes=1"):
        SparseMAEWrapper(build_resenc_unet("tiny", num_classes=2))
    with pytest.raises(ValueError, match="deep supervision"):
        SparseMAEWrapper(_net(deep_supervision=True))
    with pytest.raises(NotImplementedError, match="dense"):
        SparseMAEWrapper(_net(), engine="sparse-conv")
    with pytest.raises(ValueError, match="coarse"):
        SparseMAEWrapper(_net(), coarse="max")
    mae = SparseMAEWrapper(_net(), block_size=32)
    with pytest.raises(ValueError, match="block_size"):
        mae(torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="mask"):
        mae(torch.zeros(1, 1, *SIZE), mask=torch.ones(2, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="loss_mask"):
        mae(torch.zeros(1, 1, *SIZE), loss_mask=torch.ones(1, 1, 16, 16, 16))


def _volume(n: int, seed: int = 0) -> torch.Tensor:
    """A smooth synthetic z-scored volume (sum of Gaussian blobs), (1, 1, n, n, n)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij"))
    v = torch.zeros(n, n, n)
    for _ in range(6):
        c = torch.rand(3, 1, 1, 1, generator=g) * 1.6 - 0.8
        v += torch.randn(1, generator=g) * torch.exp(-((grid - c) ** 2).sum(0) / 0.1)
    return ((v - v.mean()) / v.std())[None, None]


def _overfit(net: torch.nn.Module, n: int, block: int, steps: int, engine: str) -> list[float]:
    x = _volume(n)
    mae = SparseMAEWrapper(net, block_size=block, mask_ratio=0.6, engine=engine)
    opt = torch.optim.Adam([p for p in mae.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = mae(x, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("engine", ENGINES)
def test_overfits_one_volume_small(engine: str) -> None:
    """3-stage network, 16^3 volume, fresh random masks each step: loss falls > 10x in 200 steps.

    Measured on this seed: 21x (dense) and 24x (blocks, stem and stage 0 in 4^3 blocks).
    """
    torch.manual_seed(0)
    net = build_resenc_unet("tiny", num_classes=1, features_per_stage=(8, 16, 32), strides=(1, 2, 2),
                            n_blocks_per_stage=1, kernel_sizes=3, n_conv_per_stage_decoder=1)
    losses = _overfit(net, 16, 4, 200, engine)
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first / last > 10, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_overfits_one_volume_tiny_preset(engine: str) -> None:
    """The 5-stage tiny preset at 32^3 (about 60 s of CPU time, 200 s wall on busy shared cores)."""
    losses = _overfit(_net(), 32, 8, 200, engine)
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first / last > 10, (first, last)
