"""The ResEnc U-Net against the reference implementation (dynamic-network-architectures' ResidualEncoderUNet)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tolerance import EPS_BF16, assert_yardstick, max_rel, norm_rel
from torch import nn

import s3d
from s3d.nn import ResEncUNetConfig, get_config

pytest.importorskip("dynamic_network_architectures")

from dna_reference import assert_same_function, build_dna, canonical, load_into_dna  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_resenc_l_state_dict_matches_dna_canonical_keys() -> None:
    ours = s3d.build_resenc_unet("resenc_l", num_classes=2)
    dna = build_dna(ours.config)
    ref = canonical(dna.state_dict())
    got = ours.state_dict()
    assert len(dna.state_dict()) == 956
    assert len(got) == len(ref) == 264
    assert set(got) == set(ref)
    for key, value in got.items():
        assert value.shape == ref[key].shape, key


def test_resenc_l_parameter_counts() -> None:
    net = s3d.build_resenc_unet("resenc_l", num_classes=2)
    n_all = sum(p.numel() for p in net.parameters())
    dna = build_dna(net.config)
    assert n_all == sum(p.numel() for p in dna.parameters()) == 102_349_770
    n_enc = sum(p.numel() for p in net.encoder.parameters())
    n_dec = sum(p.numel() for p in net.decoder.parameters())
    assert n_enc + n_dec == n_all
    assert round(n_enc / 1e6, 2) == 90.30 and round(n_dec / 1e6, 2) == 12.05
    # the four low-resolution deep-supervision heads are present but unused without deep supervision
    unused = sum(p.numel() for p in net.decoder.seg_layers[:-1].parameters())
    assert n_all - unused == 102_349_770 - (2 * (320 + 256 + 128 + 64) + 4 * 2)


@pytest.mark.parametrize(
    "config, size, deep_supervision",
    [pytest.param("tiny", (32, 32, 48), False, marks=pytest.mark.numerical),
     pytest.param("tiny", (32, 32, 32), True, marks=pytest.mark.numerical), ("resenc_l", (64, 64, 64), False)],
)
@pytest.mark.parametrize("train", [True, False])
def test_outputs_equal_dna_both_directions(config: str, size, deep_supervision: bool, train: bool) -> None:
    ours = s3d.build_resenc_unet(config, in_channels=2, num_classes=3, deep_supervision=deep_supervision)
    dna = build_dna(ours.config)
    x = torch.randn(1, 2, *size, generator=_gen(0))
    # ours -> DNA
    load_into_dna(dna, ours.state_dict())
    ours.train(train)
    dna.train(train)
    with torch.no_grad():
        a, b = ours(x), dna(x)
    if not deep_supervision:
        a, b = [a], [b]
    assert len(a) == len(b)
    always = config != "resenc_l"
    for i, (ya, yb) in enumerate(zip(a, b)):
        assert ya.shape == yb.shape
        assert_same_function(ya, yb, dna, x, i if deep_supervision else None, always)
    # DNA -> ours (fresh random weights on the DNA side)
    dna2 = build_dna(ours.config).train(train)
    ours2 = s3d.build_resenc_unet(ours.config).train(train)
    ours2.load_state_dict(canonical(dna2.state_dict()), strict=True)
    with torch.no_grad():
        ya, yb = ours2(x), dna2(x)
    ya, yb = (ya[0], yb[0]) if deep_supervision else (ya, yb)
    assert_same_function(ya, yb, dna2, x, 0 if deep_supervision else None, always)


@pytest.mark.numerical
def test_anisotropic_config_matches_dna() -> None:
    cfg = get_config("tiny").replace(
        strides=[1, [1, 2, 2], 2, 2, 2], kernel_sizes=[[1, 3, 3], 3, 3, 3, 3], in_channels=1, num_classes=2
    )
    ours = s3d.build_resenc_unet(cfg)
    dna = build_dna(ours.config)
    load_into_dna(dna, ours.state_dict())
    x = torch.randn(2, 1, 16, 32, 32, generator=_gen(1))
    with torch.no_grad():
        assert_same_function(ours(x), dna(x), dna, x)


def test_config_json_round_trip_rebuilds_identical_network() -> None:
    net = s3d.build_resenc_unet("tiny", in_channels=3, num_classes=4, strides=[1, 2, [1, 2, 2], 2, 2])
    text = net.config.to_json()
    cfg = ResEncUNetConfig.from_json(text)
    assert cfg == net.config
    assert json.loads(text)["strides"][2] == [1, 2, 2]
    twin = s3d.build_resenc_unet(cfg)
    twin.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32, 32, generator=_gen(3))
    with torch.no_grad():
        assert torch.equal(net(x), twin(x))


def test_overrides_and_config_errors() -> None:
    net = s3d.build_resenc_unet("tiny", features_per_stage=(4, 8, 8, 8, 8), nonlin="relu", norm_eps=1e-3)
    assert net.encoder.stem.convs[0].conv.out_channels == 4
    assert isinstance(net.encoder.stem.convs[0].nonlin, nn.ReLU)
    assert net.encoder.stem.convs[0].norm.eps == 1e-3
    with pytest.raises(ValueError, match="strides: expected 5 entries"):
        s3d.build_resenc_unet("tiny", strides=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown config override"):
        s3d.build_resenc_unet("tiny", n_stage=3)
    with pytest.raises(ValueError, match="unknown config 'resenc_q'"):
        s3d.build_resenc_unet("resenc_q")
    with pytest.raises(ValueError, match="norm"):
        s3d.build_resenc_unet("tiny", norm="layer")


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 1, 40, 32, 32), r"axis 0: 40 -> 32 or 48"),
        ((1, 1, 16, 16, 16), r"1x1x1 bottleneck.*\(32, 16, 16\)"),
        ((1, 2, 32, 32, 32), r"expected 1 input channel"),
        ((1, 32, 32, 32), r"5D tensor"),
    ],
)
def test_invalid_input_raises_with_a_size_that_works(shape, match: str) -> None:
    net = s3d.build_resenc_unet("tiny", in_channels=1)
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(shape))


@pytest.mark.numerical
def test_bf16_autocast_and_channels_last_match_fp32() -> None:
    net = s3d.build_resenc_unet("tiny", num_classes=2).eval()
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(2))
    dna = build_dna(net.config).eval()
    load_into_dna(dna, net.state_dict())
    with torch.no_grad():
        ref64 = copy.deepcopy(net).double()(x.double())
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, low_dna = net(x), dna(x)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        cl = net_cl(x.to(memory_format=torch.channels_last_3d))
    assert low.dtype == torch.bfloat16
    # bf16 (8-bit mantissa) against float64, norm-wise (the max-abs error is a tail statistic); the
    # yardstick is DNA under the same autocast, floor one bf16 ulp
    assert_yardstick(norm_rel(low, ref64), norm_rel(low_dna, ref64), "bf16 autocast", floor=EPS_BF16)
    # channels_last_3d vs float64; yardstick: the contiguous float32 run
    assert_yardstick(max_rel(cl, ref64), max_rel(ref, ref64), "channels_last_3d")


@pytest.mark.numerical
def test_gradient_checkpointing_gives_identical_gradients() -> None:
    torch.manual_seed(1)
    a = s3d.build_resenc_unet("tiny", num_classes=2)
    b = s3d.build_resenc_unet(a.config, checkpointing=True)
    b.load_state_dict(a.state_dict())
    assert b.checkpointing and not a.checkpointing
    x = torch.randn(2, 1, 32, 32, 32, generator=_gen(4))
    for net in (a, b):
        net(x).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0, msg=name)


def test_deep_supervision_outputs_highest_resolution_first() -> None:
    net = s3d.build_resenc_unet("tiny", num_classes=2, deep_supervision=True)
    outs = net(torch.zeros(1, 1, 32, 32, 32))
    assert [tuple(o.shape[2:]) for o in outs] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
    net.deep_supervision = False
    single = net(torch.zeros(1, 1, 32, 32, 32))
    assert single.shape == (1, 2, 32, 32, 32)


def test_he_initialisation() -> None:
    net = s3d.build_resenc_unet("resenc_l", num_classes=2)
    w = net.encoder.stages[3].blocks[2].conv1.conv.weight
    fan_in = w.shape[1] * 27
    expected_std = (2.0 / (1 + 0.01**2) / fan_in) ** 0.5
    # the sample std of n = 1.77 M weights has relative standard error 1 / sqrt(2 n) = 5.3e-4;
    # tolerance 5e-3 (~9 standard errors; a statistical bound, not a rounding one)
    assert abs(w.std().item() / expected_std - 1) < 5e-3
    assert net.encoder.stages[3].blocks[2].conv1.conv.bias.abs().max() == 0


def test_resenc_l_forward_flops_at_160_match_the_design_figure() -> None:
    """2.80 TFLOP (conv multiply-adds x 2) for one 1x1x160^3 forward, counted by torch itself."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = s3d.build_resenc_unet("resenc_l", num_classes=2)
        x = torch.empty(1, 1, 160, 160, 160)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    # an integer count against a printed figure: within half a unit of its last digit
    assert counter.get_total_flops() == pytest.approx(2.80e12, abs=0.005e12)


def test_norm_and_activation_factory_covers_every_config_name() -> None:
    """One table builds the layers and names them in nnssl plans: each name resolves to its class (importlib)."""
    import importlib

    from s3d.hub.nnssl import adaptation_plan
    from s3d.nn.blocks import ACTIVATIONS, NORM_LAYERS, make_nonlin, make_norm
    from s3d.nn.config import NONLINS, NORMS

    assert set(NORM_LAYERS) == set(NORMS) and set(ACTIVATIONS) == set(NONLINS)
    for table in (NORM_LAYERS, ACTIVATIONS):
        for layer in table.values():
            module, _, name = layer.import_path.rpartition(".")
            assert getattr(importlib.import_module(module), name) is layer.cls
    for nonlin in NONLINS:
        cfg = get_config("tiny").replace(nonlin=nonlin, norm="batch", norm_eps=1e-3)
        act, norm = make_nonlin(cfg), make_norm(cfg, 4)
        plan = adaptation_plan(cfg)["architecture_plans"]["arch_kwargs"]
        module, _, name = plan["nonlin"].rpartition(".")
        rebuilt = getattr(importlib.import_module(module), name)(**plan["nonlin_kwargs"])  # as DNA builds it
        assert type(rebuilt) is type(act) and repr(rebuilt) == repr(act)
        assert isinstance(norm, nn.BatchNorm3d) and norm.eps == 1e-3 and norm.affine
