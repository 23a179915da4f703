"""Adaptation keys: defined once, carried by every registry entry, used by the adapter and by load_pretrained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hub_server import HubServer  # noqa: E402  (tests/ is on sys.path under pytest)
from torch import nn

import s3d
from s3d.hub import AdaptationKeys, StrictLoadError, adapt_state_dict, list_models, load_pretrained, save_pretrained
from s3d.hub import registry as registry_module
from s3d.hub.adapt import PRIMUS_KEYS, RESENC_UNET_KEYS, keys_for
from s3d.nn.family import build_from_config

STEM = "encoder.stem.convs.0.conv.weight"


def tiny(**kw: object) -> s3d.ResEncUNet:
    return s3d.build_resenc_unet("tiny", **kw).eval()


def first_and_last_conv(model: nn.Module, x: torch.Tensor) -> tuple[nn.Conv3d, nn.Conv3d]:
    """The conv applied to the network input and the conv whose output is the network output (forward hooks)."""
    seen: list[tuple[nn.Conv3d, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o)))
             for m in model.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    first = [m for m, inp, _ in seen if inp is x]
    last = [m for m, _, o in seen if o is out]
    assert len(first) == 1 and len(last) == 1
    return first[0], last[0]


def key_of(model: nn.Module, tensor: torch.Tensor) -> str:
    return next(k for k, v in model.state_dict(keep_vars=True).items() if v is tensor)


# ---- the registry's keys against real models ---------------------------------------------------------
def test_every_registry_entry_has_keys_that_exist_in_a_built_model_of_its_architecture() -> None:
    entries = [e for e in list_models() if e.family == "ResEncUNet"]
    assert entries
    built: dict[str, tuple[nn.Module, nn.Conv3d, nn.Conv3d]] = {}
    for entry in entries:
        arch = json.dumps(entry.architecture, sort_keys=True)
        if arch not in built:
            # 3 channels and 5 classes: numbers no default has, so a dim mix-up shows
            model = s3d.build_resenc_unet(entry.config, in_channels=3, num_classes=5).eval()
            s = 2 ** (model.config.n_stages - 1)  # total stride: a 1x1x2 bottleneck (instance norm needs 2 voxels)
            x = torch.randn(1, 3, s, s, 2 * s, generator=torch.Generator().manual_seed(0))
            built[arch] = (model, *first_and_last_conv(model, x))
        model, first_conv, final_head = built[arch]
        state = model.state_dict()
        keys = entry.keys
        # the stem key is the weight of the conv that sees the raw input, in_channels on dim 1
        assert keys.stem_key == key_of(model, first_conv.weight), entry.name
        assert state[keys.stem_key].dim() == 5 and state[keys.stem_key].shape[1] == 3, entry.name
        # the encoder prefix holds the stem and every encoder stage, and none of the decoder
        encoder = {k for k in state if k.startswith(keys.encoder_prefix)}
        assert keys.stem_key in encoder, entry.name
        assert encoder == {f"encoder.{n}" for n in model.encoder.state_dict()}, entry.name
        # the head prefix holds the final head (its output is the network's) and only tensors with
        # num_classes on dim 0: the segmentation heads of every decoder resolution
        heads = {k: v for k, v in state.items() if k.startswith(keys.head_prefix)}
        assert key_of(model, final_head.weight) in heads and key_of(model, final_head.bias) in heads, entry.name
        assert all(v.shape[0] == 5 for v in heads.values()), entry.name
        n_heads = sum(isinstance(m, nn.Conv3d) and m.out_channels == 5 for m in model.modules())
        assert len(heads) == 2 * n_heads, entry.name  # weight + bias of each
        assert entry.head_key == key_of(model, final_head.weight), entry.name


def test_every_primus_registry_entry_has_keys_that_exist_in_a_built_primus() -> None:
    """The same checks for Primus: the stem is the conv that sees the input, the heads are every tensor that depends
    on the classes (Primus's decoder widths follow from them), the encoder is everything else."""
    entries = [e for e in list_models() if e.family == "Primus"]
    assert len(entries) >= 5
    for entry in entries:
        with torch.device("meta"):  # the real PrimusM at 160^3, without allocating its 152 M parameters
            model = build_from_config(entry.config, in_channels=3, num_classes=5).eval()
            other = build_from_config(entry.config, in_channels=3, num_classes=6)
            x = torch.empty(1, 3, *model.config.input_shape)
            first_conv, final_head = first_and_last_conv(model, x)
        state, keys = model.state_dict(), entry.keys
        assert keys.stem_key == key_of(model, first_conv.weight), entry.name
        assert state[keys.stem_key].dim() == 5 and state[keys.stem_key].shape[1] == 3, entry.name
        encoder = {k for k in state if k.startswith(keys.encoder_prefix)}
        heads = {k for k in state if k.startswith(keys.head_prefix)}
        assert encoder | heads == set(state) and not encoder & heads, entry.name
        assert keys.stem_key in encoder and "eva.pos_embed" in encoder and "mask_token" in encoder, entry.name
        assert entry.head_key == key_of(model, final_head.weight) and entry.head_key in heads, entry.name
        # every tensor whose shape depends on the classes is a head, and the last head tensor is the final bias
        depends = {k for k, v in state.items() if other.state_dict()[k].shape != v.shape}
        assert depends and depends <= heads, entry.name
        assert list(state[[k for k in state if k.startswith(keys.head_prefix)][-1]].shape) == [5], entry.name


def test_registry_keys_are_the_one_default_definition() -> None:
    assert all(e.keys == keys_for(e.config) for e in list_models())
    assert {e.keys for e in list_models()} == {AdaptationKeys(), PRIMUS_KEYS}
    assert all(e.keys == RESENC_UNET_KEYS for e in list_models() if e.family == "ResEncUNet")
    assert all(e.stem_key == e.keys.stem_key and e.encoder_prefix == e.keys.encoder_prefix for e in list_models())
    assert {f.name for f in dataclasses.fields(registry_module.ModelEntry)}.isdisjoint(
        {"stem_key", "encoder_prefix", "head_key"}
    ), "the keys live in ModelEntry.keys only"
    with pytest.raises(dataclasses.FrozenInstanceError):
        RESENC_UNET_KEYS.stem_key = "x"  # type: ignore[misc]


# ---- the adapter uses the keys it is given -------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("stem_key", "encoder.stem.convs.0.conv.kernel"), ("encoder_prefix", "backbone."),
     ("head_prefix", "decoder.heads.")],
)
def test_keys_naming_nothing_are_an_error_naming_the_key(field: str, value: str) -> None:
    src, dst = tiny().state_dict(), tiny(in_channels=2).state_dict()
    keys = dataclasses.replace(AdaptationKeys(), **{field: value})
    with pytest.raises(ValueError, match=rf"{field} '{value}'.*keys=AdaptationKeys"):
        adapt_state_dict(src, dst, keys=keys)


def test_the_stem_key_decides_which_tensor_is_replicated() -> None:
    src, dst = tiny(), tiny(in_channels=2)
    w = src.state_dict()[STEM]
    # default keys: the ResEnc stem is replicated; w / 2 is exact in fp32 (a power of two)
    out, report = adapt_state_dict(src.state_dict(), dst.state_dict())
    assert report.adapted_keys == [STEM] and report.stem == "replicated"
    assert torch.equal(out[STEM], (w / 2).repeat(1, 2, 1, 1, 1))
    # the same real tensors under other names: only keys naming them find the stem
    rename = {"encoder.stem.convs.0.conv.": "encoder.first."}

    def renamed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {next((k.replace(a, b) for a, b in rename.items() if k.startswith(a)), k): v for k, v in sd.items()}

    src_r, dst_r = renamed(src.state_dict()), renamed(dst.state_dict())
    with pytest.raises(ValueError, match=f"stem_key '{STEM}'"):
        adapt_state_dict(src_r, dst_r)
    out, report = adapt_state_dict(src_r, dst_r, keys=AdaptationKeys(stem_key="encoder.first.weight"))
    assert report.adapted_keys == ["encoder.first.weight"] and report.stem_channels == (1, 2)
    assert torch.equal(out["encoder.first.weight"], (w / 2).repeat(1, 2, 1, 1, 1))
    assert torch.equal(out["encoder.first.bias"], src.state_dict()["encoder.stem.convs.0.conv.bias"])
    # a key naming another existing conv: that one is "the stem" now, so the real stem is not adapted
    other = AdaptationKeys(stem_key="encoder.stages.0.blocks.0.conv1.conv.weight")
    with pytest.raises(StrictLoadError, match=rf"{STEM}: checkpoint \(8, 1, 3, 3, 3\) vs model \(8, 2, 3, 3, 3\)"):
        adapt_state_dict(src.state_dict(), dst.state_dict(), keys=other)
    _, report = adapt_state_dict(src.state_dict(), dst.state_dict(), keys=other, strict=False)
    assert report.adapted_keys == [] and report.stem == "loaded" and report.stem_channels == (8, 8)
    assert [m.split(":")[0] for m in report.mismatched_keys] == [STEM]


def test_the_head_prefix_decides_which_heads_are_new() -> None:
    src, dst = tiny(num_classes=1), tiny(num_classes=3)
    heads = [k for k in dst.state_dict() if k.startswith("decoder.seg_layers.")]
    _, report = adapt_state_dict(src.state_dict(), dst.state_dict())
    assert report.new_head and sorted(report.adapted_keys) == sorted(heads) and len(heads) == 8
    final = AdaptationKeys(head_prefix="decoder.seg_layers.3.")  # the full-resolution head of tiny only
    out, report = adapt_state_dict(src.state_dict(), dst.state_dict(), keys=final, strict=False)
    assert report.adapted_keys == ["decoder.seg_layers.3.weight", "decoder.seg_layers.3.bias"]
    assert sorted(m.split(":")[0] for m in report.mismatched_keys) == sorted(
        k for k in heads if not k.startswith("decoder.seg_layers.3.")
    )
    assert torch.equal(out["decoder.seg_layers.3.weight"], dst.state_dict()["decoder.seg_layers.3.weight"])


def test_the_encoder_prefix_decides_what_decoder_false_loads() -> None:
    src, dst = tiny(), tiny()
    _, report = adapt_state_dict(src.state_dict(), dst.state_dict(), decoder=False)
    assert set(report.adapted_keys) == {k for k in dst.state_dict() if k.startswith("decoder.")}
    stages = AdaptationKeys(encoder_prefix="encoder.stages.")
    out, report = adapt_state_dict(src.state_dict(), dst.state_dict(), decoder=False, keys=stages)
    assert set(report.adapted_keys) == {k for k in dst.state_dict() if not k.startswith("encoder.stages.")}
    assert torch.equal(out[STEM], dst.state_dict()[STEM]) and not torch.equal(out[STEM], src.state_dict()[STEM])
    key = "encoder.stages.2.blocks.0.conv1.conv.weight"
    assert torch.equal(out[key], src.state_dict()[key])


# ---- load_pretrained passes the resolved registry entry's keys -------------------------------------------
REPO, COMMIT = "test-org/tiny-keys", "b" * 40


def test_load_pretrained_uses_the_keys_of_the_registry_entry(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(num_classes=1)
    for p in save_pretrained(model, tmp_path / "publish").iterdir():
        hub.add_file(REPO, p.name, p.read_bytes(), commit=COMMIT)
    final_head_only = AdaptationKeys(head_prefix="decoder.seg_layers.3.")
    entry = registry_module.ModelEntry(
        name="test-keys", repo_id=REPO, filename="model.safetensors", revision=COMMIT, format="s3d",
        architecture="tiny", license="CC-BY-4.0", citation="test", provenance="test fixture", keys=final_head_only,
    )
    monkeypatch.setattr(registry_module, "MODELS", (entry,))
    cache = tmp_path / "hf-cache"
    _, report = load_pretrained("test-keys", num_classes=3, strict=False, cache_dir=cache, output_loading_info=True)
    assert report.adapted_keys == ["decoder.seg_layers.3.weight", "decoder.seg_layers.3.bias"]
    assert len(report.mismatched_keys) == 6  # heads 0-2 (weight + bias): not heads under these keys
    # the same files as a repo id (no registry entry): the ResEnc defaults, every head new
    _, report = load_pretrained(REPO, num_classes=3, cache_dir=cache, output_loading_info=True)
    assert len(report.adapted_keys) == 8 and not report.mismatched_keys
    # an entry whose keys name no tensor of the model: the error names the key
    broken = dataclasses.replace(entry, keys=AdaptationKeys(stem_key="encoder.stem.weight"))
    monkeypatch.setattr(registry_module, "MODELS", (broken,))
    with pytest.raises(ValueError, match="stem_key 'encoder.stem.weight'"):
        load_pretrained("test-keys", cache_dir=cache)
