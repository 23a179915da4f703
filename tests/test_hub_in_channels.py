"""load_pretrained keeps the checkpoint's input channels unless asked to adapt them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tolerance import assert_yardstick, max_rel
from torch import nn

import s3d
from s3d.hub import load_pretrained, save_pretrained

STEM = "encoder.stem.convs.0.conv.weight"


def two_channel_model() -> s3d.ResEncUNet:
    model = s3d.build_resenc_unet("tiny", in_channels=2, num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm affines (fresh ones are 1/0 and hide key mix-ups)
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def test_own_two_channel_model_loads_with_two_channels_by_default(tmp_path: Path) -> None:
    model = two_channel_model()
    save_pretrained(model, tmp_path / "m")
    loaded, report = load_pretrained(tmp_path / "m", output_loading_info=True)
    assert loaded.config.in_channels == 2 and loaded.config == model.config
    assert torch.equal(loaded.state_dict()[STEM], model.state_dict()[STEM])  # bitwise
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert report.stem == "loaded" and report.stem_channels == (2, 2) and report.adapted_keys == []
    assert not any(line.startswith("stem") for line in report.summary().splitlines())
    # the .safetensors file alone and load_state agree
    assert load_pretrained(tmp_path / "m" / "model.safetensors").config.in_channels == 2
    assert s3d.hub.load_state(tmp_path / "m")[1].in_channels == 2


@pytest.mark.numerical
def test_in_channels_1_adapts_the_two_channel_stem_and_says_so(tmp_path: Path) -> None:
    model = two_channel_model()
    save_pretrained(model, tmp_path / "m")
    one, report = load_pretrained(tmp_path / "m", in_channels=1, output_loading_info=True)
    assert one.config.in_channels == 1
    assert report.stem == "replicated" and report.stem_channels == (2, 1) and report.adapted_keys == [STEM]
    assert "stem replicated: 2 -> 1 input channels" in report.summary()
    w = model.state_dict()[STEM]
    # formula: summed over the 2 checkpoint channels, divided by 1; a two-term fp32 sum is one correctly
    # rounded addition, so the result is bitwise w0 + w1
    assert torch.equal(one.state_dict()[STEM], w[:, :1] + w[:, 1:])
    # an image given as both channels of the 2-channel model = that image through the adapted model:
    # against a float64 run of the 2-channel model, with its float32 run as the yardstick
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    x2 = x.repeat(1, 2, 1, 1, 1)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x2.double())
        assert_yardstick(max_rel(one(x), ref), max_rel(model(x2), ref), "adapted 1-channel stem")
