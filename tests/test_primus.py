"""Primus (s3d.nn.primus) against dynamic-network-architectures' Primus, through files the reference wrote.

The reference (DNA 0.4.4's ``Primus``) builds only under timm <= 1.0.16, so tests/primus_reference.py
ran it once in a pinned side environment and wrote tests/data/primus/ (how to rerun it: that file's
docstring). These tests need neither DNA nor that timm.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import s3d
from s3d.nn.primus import PrimusConfig, get_primus_config, rope_table
from s3d.nn.primus.modules import decoder_channels

DATA = Path(__file__).parent / "data" / "primus"
EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(str(DATA / "small.safetensors")), json.loads((DATA / "small.json").read_text())["config"]


def small_model(reference: tuple[dict[str, torch.Tensor], dict]) -> s3d.Primus:
    tensors, config = reference
    model = s3d.build_primus("primus_tiny", **config).eval()  # DNA's keyword names, as the reference got them
    model.load_state_dict({k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}, strict=True)
    return model


# ---- structure ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [1, 2])
def test_primus_m_at_160_has_dnas_keys_and_shapes_in_order(num_classes: int) -> None:
    table = json.loads((DATA / "primus_m_160_keys.json").read_text())[f"num_classes={num_classes}"]
    with torch.device("meta"):  # shapes only: the 152 M parameters are never allocated
        model = s3d.build_primus("primus_m", in_channels=1, num_classes=num_classes, input_shape=160)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == table
    assert len(ours) == 384


def test_the_small_reference_network_has_our_keys(reference: tuple[dict[str, torch.Tensor], dict]) -> None:
    tensors, config = reference
    model = s3d.build_primus("primus_tiny", **config)
    ref = {k[len("weight."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("weight.")}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ref


def test_decoder_widths_follow_dnas_rule() -> None:
    # widths read off DNA's PrimusM tables (tests/data/primus): 864 -> 112 -> 16 -> 1 and 864 -> 144 -> 24 -> 2
    assert decoder_channels(864, 1, 3) == [864, 112, 16, 1]
    assert decoder_channels(864, 2, 3) == [864, 144, 24, 2]


# ---- numerics against the reference ------------------------------------------------------------
def test_rope_table_matches_the_reference_and_the_formula(reference: tuple[dict[str, torch.Tensor], dict]) -> None:
    tensors, config = reference
    cfg = PrimusConfig.from_dict(config)
    ours = rope_table(cfg.grid, cfg.head_dim)
    # an independent float64 formula, token by token: angles (i f_k, j f_k, l f_k), each repeated twice
    n = cfg.head_dim // 6
    freqs = 10000.0 ** (-np.arange(n) / n)
    rows = []
    for i in range(cfg.grid[0]):
        for j in range(cfg.grid[1]):
            for l in range(cfg.grid[2]):
                angles = np.repeat(np.concatenate([i * freqs, j * freqs, l * freqs]), 2)
                rows.append(np.concatenate([np.sin(angles), np.cos(angles)]))
    exact = torch.from_numpy(np.stack(rows))
    # ours is the float64 table rounded once to float32: within half an ulp of values <= 1
    assert (ours.double() - exact).abs().max() <= EPS32 / 2
    # the reference computed it in float32 (pow, product, sin/cos each rounded): angles up to A = 3 rad
    # carry <= ~3 roundings of relative size eps, so |error| <= (3 A + 2) eps; ours agrees within the sum
    max_angle = max(cfg.grid) - 1
    bound = (3 * max_angle + 2) * EPS32 + EPS32 / 2
    assert (ours.double() - tensors["rope"]).abs().max() <= bound
    # the test can fail: swapping sin and cos, or the axis order, is off by O(1)
    assert (torch.cat([ours[:, cfg.head_dim:], ours[:, :cfg.head_dim]], 1).double() - exact).abs().max() > 0.5


def _reduction_length(config: dict) -> int:
    """Sum of the inner-product lengths along the network (the n in an n*eps rounding bound)."""
    cfg = PrimusConfig.from_dict(config)
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    per_block = 6 * cfg.embed_dim + hidden + cfg.num_tokens + cfg.head_dim
    decode = sum(decoder_channels(cfg.embed_dim, cfg.num_classes, 2)) * 8
    return math.prod(cfg.patch_embed_size) * cfg.in_channels + cfg.eva_depth * per_block + decode


def test_float64_output_equals_the_reference(reference: tuple[dict[str, torch.Tensor], dict]) -> None:
    """Same weights, same input, float64 on both sides, and the reference's own (float32-rounded) rotary table:
    only the order of float64 operations may differ, so the outputs agree to n * eps64 * max|y| (n: summed
    inner-product lengths, ~10^3), a bound that catches any real difference (a LayerNorm eps of 1e-6
    instead of 1e-5 moves the output by ~1e-6)."""
    tensors, config = reference
    model = copy.deepcopy(small_model(reference)).double()
    model.eva.rope = tensors["rope"].clone()
    ref = tensors["output_float64"]
    with torch.no_grad():
        out = model(tensors["input"].double())
    bound = 10 * _reduction_length(config) * EPS64 * float(ref.abs().max())
    assert float((out - ref).abs().max()) <= bound, f"{float((out - ref).abs().max()):.3g} > {bound:.3g}"
    # the test can fail: a wrong LayerNorm eps in the decoder (1e-5 instead of DNA's 1e-6)
    for m in model.up_projection.modules():
        if hasattr(m, "eps"):
            m.eps = 1e-5
    with torch.no_grad():
        assert float((model(tensors["input"].double()) - ref).abs().max()) > 1e3 * bound


def test_float32_output_is_as_close_to_float64_as_the_references(reference: tuple[dict[str, torch.Tensor], dict]
                                                                  ) -> None:
    """Same-run yardstick: our float32 error against the reference's float64 output is at most 4x the
    reference's own float32 error (both with their own rotary tables; measured ratio 0.8 here)."""
    tensors, _ = reference
    model = small_model(reference)
    ref64, ref32 = tensors["output_float64"], tensors["output_float32"]
    with torch.no_grad():
        ours = model(tensors["input"]).double()
    yardstick = float((ref32 - ref64).abs().max())
    assert yardstick > 0
    assert float((ours - ref64).abs().max()) <= 4 * yardstick


# ---- token-level pieces (what token-sparse pre-training uses) -----------------------------------
def test_encoder_on_permuted_token_subsets_matches_the_dense_encoder(reference: tuple[dict[str, torch.Tensor], dict]
                                                                     ) -> None:
    """``eva(tokens, keep_index)`` with every token, in any order, is the dense encoder's output in that order:
    the position embeddings and the rotary table follow the tokens."""
    tensors, _ = reference
    model = copy.deepcopy(small_model(reference)).double()
    x = tensors["input"].double()
    with torch.no_grad():
        tokens = model.embed(x)
        dense = model.eva(tokens)
        b, n, _ = tokens.shape
        g = torch.Generator().manual_seed(3)
        perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
        sparse = model.eva(tokens.gather(1, perm[:, :, None].expand_as(tokens)), keep_index=perm)
        expected = dense.gather(1, perm[:, :, None].expand_as(dense))
        # float64, reordered sums only: n * eps64 bound as above
        assert float((sparse - expected).abs().max()) <= 1e4 * EPS64 * float(dense.abs().max())
        # ... and the full round trip through restore() gives the dense logits back
        restored = model.restore(sparse, perm)
        assert torch.allclose(model.decode(restored), model(x), rtol=0, atol=1e4 * EPS64 * float(model(x).abs().max()))
        # a subset: restore() puts the mask token everywhere else
        keep = perm[:, : n // 2]
        partial = model.restore(model.eva(tokens.gather(1, keep[:, :, None].expand(-1, -1, tokens.shape[2])),
                                          keep_index=keep), keep, mask_token=torch.full((1, 1, tokens.shape[2]), 7.0))
        masked = torch.ones(b, n, dtype=torch.bool).scatter(1, keep, False)
        assert bool((partial[masked] == 7.0).all()) and not bool((partial[~masked] == 7.0).any())


# ---- configuration --------------------------------------------------------------------------------
def test_presets_are_dnas_sizes() -> None:
    sizes = {name: (c.embed_dim, c.eva_depth, c.eva_numheads) for name, c in s3d.nn.PRIMUS_CONFIGS.items()}
    assert sizes["primus_s"] == (396, 12, 6) and sizes["primus_b"] == (792, 12, 12)
    assert sizes["primus_m"] == (864, 16, 12) and sizes["primus_l"] == (1056, 24, 16)
    m = get_primus_config("PrimusM")  # DNA's class name works too
    assert (m.patch_embed_size, m.init_values, m.scale_attn_inner) == ((8, 8, 8), 0.1, True)


def test_config_json_round_trip_rebuilds_an_identical_network(tmp_path: Path) -> None:
    net = s3d.build_primus("primus_tiny", in_channels=2, num_classes=3, input_shape=(32, 16, 32), drop_path_rate=0.1,
                           eva_numheads=1, init_values=None)
    cfg = PrimusConfig.from_json(net.config.to_json())
    assert cfg == net.config
    again = s3d.build_primus(cfg)
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in net.state_dict().items()]
    assert "eva.blocks.0.gamma_1" not in net.state_dict()  # init_values=None: no layer scale
    assert net.eva.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # linear rule over depth


def test_dna_keyword_names_are_accepted() -> None:
    net = s3d.build_primus("primus_tiny", input_channels=3, output_channels=4, encoder_eva_depth=1)
    assert (net.config.in_channels, net.config.num_classes, net.config.eva_depth) == (3, 4, 1)
    with pytest.raises(ValueError, match="'input_channels' and 'in_channels' name the same field"):
        s3d.build_primus("primus_tiny", in_channels=2, input_channels=2)
    with pytest.raises(ValueError, match="unknown Primus config override"):
        s3d.build_primus("primus_tiny", depth=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"input_shape": (32, 32, 30)}, "not divisible by patch_embed_size"),
        ({"embed_dim": 51}, "not divisible by eva_numheads"),
        ({"embed_dim": 40, "eva_numheads": 2}, "divisible by 6"),
        ({"patch_embed_size": (6, 4, 4)}, "power of 2"),
        ({"drop_path_rate": 1.0}, r"\[0, 1\)"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        s3d.build_primus("primus_tiny", **overrides)


def test_input_of_another_size_is_refused_with_advice() -> None:
    net = s3d.build_primus("primus_tiny", input_shape=(32, 32, 16))
    with pytest.raises(ValueError, match=r"training patch \(32, 32, 16\).*input_shape="):
        net(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.zeros(1, 2, 32, 32, 16))
    with pytest.raises(ValueError, match="deep supervision"):
        net.deep_supervision = True


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    net = s3d.build_primus("primus_tiny", input_shape=(16, 16, 16)).double()
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    net(x).square().mean().backward()
    plain = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    net.checkpointing = True
    net(x).square().mean().backward()
    for k, p in net.named_parameters():
        assert torch.allclose(p.grad, plain[k], rtol=0, atol=1e-12), k
