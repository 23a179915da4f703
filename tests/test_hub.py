"""Model zoo, local part: save/load round trips, nnssl/DNA interop, adaptation, strictness, registry."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s3d
from s3d.hub import (
    CheckpointError,
    StrictLoadError,
    list_models,
    load_pretrained,
    nnssl_checkpoint,
    save_pretrained,
    to_dna_state_dict,
)
from s3d.hub.registry import get_entry
from s3d.nn import ResEncUNetConfig, get_config

pytest.importorskip("dynamic_network_architectures")

import dna_reference  # noqa: E402
from tolerance import assert_yardstick, max_rel  # noqa: E402


def build_dna(cfg: ResEncUNetConfig) -> nn.Module:
    """DNA's ResidualEncoderUNet for ``cfg`` (nnU-Net ResEnc plans layout), in eval mode."""
    return dna_reference.build_dna(cfg.replace(deep_supervision=False)).eval()


def randomize_norms(model: nn.Module) -> None:
    """Give norm affine params non-trivial values (fresh ones are 1/0, which hide key mix-ups)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm3d) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def tiny(**kw: object) -> s3d.ResEncUNet:
    model = s3d.build_resenc_unet("tiny", **kw).eval()
    randomize_norms(model)
    return model


def assert_same_state(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


X = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))


# ---- our format ---------------------------------------------------------------------------------
def test_save_load_roundtrip_is_bitwise(tmp_path: Path) -> None:
    model = tiny(num_classes=3)
    out = save_pretrained(model, tmp_path / "m", recipe={"name": "test", "steps": 10}, license="cc-by-4.0")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == model.config.to_dict()
    assert config["s3d_version"] == s3d.__version__ and config["recipe"] == {"name": "test", "steps": 10}
    assert "license: cc-by-4.0" in (out / "README.md").read_text()
    from safetensors.torch import load_file

    raw = load_file(str(out / "model.safetensors"))
    assert len(raw) == len(model.state_dict()) == 85
    loaded, report = load_pretrained(out, in_channels=1, output_loading_info=True)
    assert_same_state(model, loaded)
    assert loaded.config == model.config
    assert report.stem == "loaded" and not report.new_head and not report.adapted_keys
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))
    # the .safetensors file alone works too (config.json found next to it)
    assert_same_state(model, load_pretrained(out / "model.safetensors"))


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    out = save_pretrained(model, tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()

    def broken_save(state: dict, path: str, metadata: dict | None = None) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny(), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


# ---- nnssl / DNA interop -----------------------------------------------------------------------
def test_export_to_nnssl_matches_dna_state_dict_and_round_trips(tmp_path: Path) -> None:
    model = tiny(num_classes=1)
    dna = build_dna(model.config)
    missing, unexpected = dna.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    ref = dna.state_dict()
    exported = to_dna_state_dict(model.state_dict())
    assert list(exported) == list(ref)  # same keys in DNA's order, aliases included
    assert all(torch.equal(exported[k], ref[k]) for k in ref)
    # the resenc_l export has DNA's 956 keys
    big = s3d.build_resenc_unet("resenc_l")
    assert len(to_dna_state_dict(big.state_dict())) == 956
    ckpt = nnssl_checkpoint(model.state_dict(), model.config)
    torch.save(ckpt, tmp_path / "checkpoint_final.pth")
    # the file is readable without pickle and DNA loads it strictly
    raw = torch.load(tmp_path / "checkpoint_final.pth", weights_only=True)
    build_dna(model.config).load_state_dict(raw["network_weights"], strict=True)
    plan = raw["nnssl_adaptation_plan"]
    assert plan["key_to_stem"] == "encoder.stem" and plan["key_to_encoder"] == "encoder.stages"
    assert plan["pretrain_num_input_channels"] == 1
    assert plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 64]
    back, report = load_pretrained(tmp_path / "checkpoint_final.pth", output_loading_info=True)
    assert report.format == "nnssl" and report.alias_preferred == "canonical"
    assert_same_state(model, back)


def _dna_checkpoint(cfg: ResEncUNetConfig) -> tuple[nn.Module, dict]:
    dna = build_dna(cfg)
    randomize_norms(dna)
    weights = {k: v.clone() for k, v in dna.state_dict().items()}
    return dna, {
        "network_weights": weights,
        "current_epoch": 1000,
        "trainer_name": "BaseMAETrainer",
        "optimizer_state": {},
        "init_args": {"fold": 0},
    }


@pytest.mark.numerical
def test_dna_checkpoint_gives_dna_outputs(tmp_path: Path) -> None:
    cfg = get_config("tiny").replace(num_classes=1)
    dna, ckpt = _dna_checkpoint(cfg)
    torch.save(ckpt, tmp_path / "ckpt.pth")
    model, report = load_pretrained(tmp_path / "ckpt.pth", output_loading_info=True)
    assert model.config.features_per_stage == cfg.features_per_stage and model.config.num_classes == 1
    with torch.no_grad():
        dna_reference.assert_same_function(model(X), dna(X), dna, X)
    assert report.alias_preferred == "canonical" and report.stale_alias_keys == []


@pytest.mark.numerical
@pytest.mark.parametrize("spark", [True, False])
def test_stale_alias_copies_are_ignored(tmp_path: Path, spark: bool) -> None:
    """Sparse-trainer checkpoints: all_modules copies are trained, conv/norm copies are stale."""
    cfg = get_config("tiny").replace(num_classes=1)
    dna, ckpt = _dna_checkpoint(cfg)
    weights = ckpt["network_weights"]
    stale = [
        k
        for k in weights
        if (".conv." in k or ".norm." in k)
        and ".all_modules." not in k
        and not k.startswith("decoder.encoder.")
    ]
    for key in stale:  # canonical and decoder.encoder copies go stale, all_modules copies stay trained
        weights[key] = weights[key] + 1.0
        if key.startswith("encoder."):
            weights["decoder." + key] = weights[key].clone()
    if spark:
        ckpt["spark_weights"] = {"mask_token": torch.zeros(1)}
    torch.save(ckpt, tmp_path / "sparse.pth")
    model, report = load_pretrained(tmp_path / "sparse.pth", output_loading_info=True)
    with torch.no_grad():
        dna_reference.assert_same_function(model(X), dna(X), dna, X)
    assert report.alias_preferred == "all_modules"
    assert report.stale_alias_keys == sorted(stale)
    assert any("all_modules" in n for n in report.notes)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    import argparse

    model = tiny()
    torch.save(
        {"network_weights": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "p.pth"
    )
    with pytest.raises(CheckpointError, match="pickle"):
        load_pretrained(tmp_path / "p.pth")


def test_strict_missing_and_unexpected_keys(tmp_path: Path) -> None:
    model = tiny()
    state = to_dna_state_dict(model.state_dict())
    gone = "encoder.stages.2.blocks.0.conv2.norm.weight"
    for key in [
        k
        for k in state
        if k.endswith("stages.2.blocks.0.conv2.norm.weight")
        or k.endswith("stages.2.blocks.0.conv2.all_modules.1.weight")
    ]:
        del state[key]
    state["encoder.projector.weight"] = torch.zeros(3)
    torch.save({"network_weights": state}, tmp_path / "m.pth")
    with pytest.raises(StrictLoadError) as err:
        load_pretrained(tmp_path / "m.pth")
    assert gone in str(err.value) and "encoder.projector.weight" in str(err.value)
    loaded, report = load_pretrained(tmp_path / "m.pth", strict=False, output_loading_info=True)
    assert report.missing_keys == [gone] and report.unexpected_keys == ["encoder.projector.weight"]
    assert_same_state(model, loaded, skip=(gone,))


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    model = tiny()
    state = dict(model.state_dict())
    state["decoder.transpconvs.0.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(
        StrictLoadError, match=r"decoder.transpconvs.0.bias: checkpoint \(5,\) vs model \(64,\)"
    ):
        load_pretrained(tmp_path / "m.pth")


# ---- adaptation ----------------------------------------------------------------------------------
def test_in_channels_3_replicates_and_scales_the_stem(tmp_path: Path) -> None:
    model = tiny()
    save_pretrained(model, tmp_path)
    net, report = load_pretrained(tmp_path, in_channels=3, output_loading_info=True)
    w1 = model.state_dict()["encoder.stem.convs.0.conv.weight"]
    w3 = net.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert w3.shape == (8, 3, 3, 3, 3)
    for c in range(3):
        torch.testing.assert_close(w3[:, c], w1[:, 0] / 3, rtol=0, atol=0)
    assert report.stem == "replicated" and report.stem_channels == (1, 3)
    assert report.adapted_keys == ["encoder.stem.convs.0.conv.weight"]
    assert_same_state(model, net, skip=("encoder.stem.convs.0.conv.weight",))


@pytest.mark.numerical
def test_replicated_stem_conv_output_equals_the_one_channel_formula(tmp_path: Path) -> None:
    """The stem conv itself, before its InstanceNorm: conv(x repeated k times, W/k replicated) == conv(x, W).

    The norm after the conv hides the scale: with factor 1 instead of 1/3 the normed stem output
    moves by only 1.6e-5 (|stem| ~ 5; the norm removes the 3x and the bias), so only the conv
    output can tell the factors apart.
    """
    model = tiny()
    save_pretrained(model, tmp_path)
    net = load_pretrained(tmp_path, in_channels=3)  # the real loader, from a saved directory
    conv1, conv3 = model.encoder.stem.convs[0].conv, net.encoder.stem.convs[0].conv
    x3 = X.repeat(1, 3, 1, 1, 1)
    w1, b1 = conv1.weight.detach().double(), conv1.bias.detach().double()
    with torch.no_grad():
        ref = F.conv3d(X.double(), w1, b1, conv1.stride, conv1.padding)  # the formula, float64
        # the 3-channel stem on the repeated input vs float64; yardstick: the 1-channel stem in float32
        assert_yardstick(max_rel(conv3(x3), ref), max_rel(conv1(X), ref), "replicated stem conv")
        # the test can fail: factor 1 (W replicated unscaled) gives 3 W*x + b, off by 2.0 of max |ref|
        wrong = F.conv3d(x3.double(), w1.repeat(1, 3, 1, 1, 1), b1, conv1.stride, conv1.padding)
        assert max_rel(wrong, ref) > 0.5
        # the normed stem and the whole network then match too: vs a float64 run of the 1-channel
        # model, with the float32 1-channel model as the yardstick
        model64 = copy.deepcopy(model).double()
        stem64, out64 = model64.encoder.stem(X.double()), model64(X.double())
        assert_yardstick(max_rel(net.encoder.stem(x3), stem64), max_rel(model.encoder.stem(X), stem64), "stem")
        assert_yardstick(max_rel(net(x3), out64), max_rel(model(X), out64), "network")


def test_random_stem_is_he_initialised(tmp_path: Path) -> None:
    save_pretrained(tiny(), tmp_path)
    w3 = load_pretrained(tmp_path, in_channels=3).state_dict()["encoder.stem.convs.0.conv.weight"]
    rnd, report = load_pretrained(tmp_path, in_channels=3, stem="random", output_loading_info=True)
    assert report.stem == "random"
    w_rnd = rnd.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert not torch.allclose(w_rnd, w3)
    # He init: std = gain / sqrt(fan_in) with gain sqrt(2 / (1 + 0.01^2)), fan_in 3 * 27 -> 0.157.
    # The sample std of n = 648 weights has standard error 0.157 / sqrt(2 n) = 0.0044; the tolerance
    # 0.03 is ~7 standard errors (a statistical bound), while a fan_in of 27 (std 0.27) would fail.
    assert abs(w_rnd.std().item() - (2 / 1.0001) ** 0.5 / 81**0.5) < 0.03


def test_num_classes_gives_new_heads_and_decoder_false_gives_fresh_decoder(tmp_path: Path) -> None:
    model = tiny(num_classes=1)
    save_pretrained(model, tmp_path)
    net, report = load_pretrained(tmp_path, num_classes=4, output_loading_info=True)
    assert report.new_head and report.head_classes == (1, 4)
    assert sorted(report.adapted_keys) == sorted(
        k for k in net.state_dict() if k.startswith("decoder.seg_layers.")
    )
    assert net.decoder.seg_layers[-1].weight.shape == (4, 8, 1, 1, 1)
    assert_same_state(model, net, skip=("decoder.seg_layers.",))
    enc, report = load_pretrained(tmp_path, num_classes=4, decoder=False, output_loading_info=True)
    assert report.random_decoder
    assert set(report.adapted_keys) == {k for k in enc.state_dict() if k.startswith("decoder.")}
    assert_same_state(model, enc, skip=("decoder.",))
    ref = model.state_dict()["decoder.stages.0.convs.0.conv.weight"]
    assert not torch.equal(enc.state_dict()["decoder.stages.0.convs.0.conv.weight"], ref)


def test_encoder_only_checkpoint_loads_with_fresh_decoder(tmp_path: Path) -> None:
    model = tiny()
    enc = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    torch.save({"network_weights": enc}, tmp_path / "enc.pth")
    # the architecture cannot be inferred without the decoder (strides): a clear error
    with pytest.raises(CheckpointError, match="decoder.transpconvs"):
        load_pretrained(tmp_path / "enc.pth")


# ---- registry ------------------------------------------------------------------------------------
def test_registry_entries_match_a_built_model() -> None:
    from s3d.nn.family import build_from_config

    entries = list_models()
    assert entries, "registry is empty"
    built: dict[str, dict] = {}
    for entry in entries:
        arch = json.dumps(entry.architecture, sort_keys=True)
        if arch not in built:
            with torch.device("meta"):  # shapes only
                built[arch] = {k: tuple(v.shape) for k, v in build_from_config(entry.config).state_dict().items()}
        shapes = built[arch]
        assert entry.stem_key in shapes and len(shapes[entry.stem_key]) == 5, entry.name
        assert any(k.startswith(entry.encoder_prefix) for k in shapes), entry.name
        assert entry.head_key in shapes, entry.name
        if entry.family == "ResEncUNet":
            # the head key is the final (full-resolution) head: its input channels = first stage's features
            assert shapes[entry.head_key][1] == shapes[entry.stem_key][0], entry.name
        else:  # Primus's final head is a transposed conv (in, num_classes, ...)
            assert shapes[entry.head_key][1] == entry.config.num_classes, entry.name
        assert entry.format in ("s3d", "nnssl") and entry.license and entry.provenance and entry.citation
        assert entry.method and entry.data and entry.record, entry.name
        assert entry.pinned == (len(entry.revision) == 40)
    names = [e.name for e in entries] + [a for e in entries for a in e.aliases]
    assert len(names) == len(set(names)), "duplicate names/aliases"


def test_s3d_b_alias_is_the_openmind_s3d_entry_and_mae_keeps_its_name() -> None:
    """docs/zoo.md: the paper's method is S3D (Spark3D, the sparse MAE), so s3d-b names ResEncL-OpenMind-S3D."""
    entry = get_entry("s3d-b")
    assert entry is not None and entry.repo_id == "MIC-DKFZ/ResEncL-OpenMind-S3D"
    assert entry.name == "resenc_l.openmind_s3d"
    assert get_entry("S3D-B") is entry and get_entry("AnonRes/ResEncL-OpenMind-S3D") is entry
    assert entry.method.startswith("S3D") and entry.format == "nnssl" and entry.sha256 is None and not entry.pinned
    assert "OpenMind" in entry.provenance and "NOT the paper's private" in entry.provenance
    assert entry.to_dict()["pinned"] == entry.pinned
    mae = get_entry("openmind-mae")
    assert mae is not None and mae.name == "resenc_l.openmind_mae" and mae.repo_id == "MIC-DKFZ/ResEncL-OpenMind-MAE"
    assert mae.sha256 is not None and len(mae.sha256) == 64 and "s3d-b" not in mae.aliases
    assert "s3d-b" in (Path(__file__).parents[1] / "docs" / "zoo.md").read_text()


def test_the_registry_lists_every_public_checkpoint() -> None:
    public = [e for e in list_models() if e.package_data is None]
    assert len(public) >= 12
    repos = {e.repo_id for e in public}
    for method in ("MAE", "S3D", "MG", "VF", "VoCo", "SimCLR", "SwinUNETR"):
        assert f"MIC-DKFZ/ResEncL-OpenMind-{method}" in repos, method
    for method in ("MAE", "SimMIM", "MG", "VF", "SimCLR"):
        assert f"MIC-DKFZ/PrimusM-OpenMind-{method}" in repos, method
    ct = next(e for e in public if e.repo_id == "MIC-DKFZ/ResEncL-MissingPiece-S3D")
    assert "ct" in ct.name and "CT" in ct.data and ct.method.startswith("S3D")
    assert all(e.family == "Primus" for e in public if "PrimusM" in e.repo_id)
    assert get_entry("primus-mae").sha256 == "b866ac5f61d7e90d3a6cbb00a759ffc9d73beb5e63baa6b3cd654671ebc9a552"


def test_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ValueError, match="s3d-b"):
        load_pretrained("no-such-model")


def test_config_dataclass_is_frozen_registry() -> None:
    entry = list_models()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "x"  # type: ignore[misc]


# ---- command line --------------------------------------------------------------------------------
def test_cli_models_lists_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    from s3d.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for entry in list_models():
        assert entry.name in out and entry.repo_id in out
    assert "s3d-b" in out and "(unpinned)" in out
    # grouped by family, then method: every Primus entry comes after the family line, under its method
    lines = out.splitlines()
    assert lines.index("Primus") > lines.index("ResEnc U-Net")
    primus_rows = [i for i, line in enumerate(lines) if line.strip().startswith("primus_m.")]
    assert primus_rows and min(primus_rows) > lines.index("Primus")
    assert lines[lines.index("Primus") + 1].strip() == "MAE"
    demo = next(line.strip() for line in out.splitlines() if line.strip().startswith("s3d-demo "))
    assert f"shipped, sha256 {get_entry('s3d-demo').sha256[:12]}" in demo and "unpinned" not in demo
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [e.name for e in list_models()]


def test_cli_convert_round_trips_through_nnssl_and_nnunet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from s3d.cli import main

    model = tiny(num_classes=3)
    save_pretrained(model, tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), "--to", "nnssl", "-o", str(tmp_path / "nnssl")]) == 0
    assert sorted(p.name for p in (tmp_path / "nnssl").iterdir()) == [
        "adaptation_plan.json",
        "checkpoint_final.pth",
    ]
    plan = json.loads((tmp_path / "nnssl" / "adaptation_plan.json").read_text())
    assert plan["key_to_stem"] == "encoder.stem" and plan["pretrain_num_input_channels"] == 1
    assert main(["convert", str(tmp_path / "nnssl"), "--to", "s3d", "-o", str(tmp_path / "back")]) == 0
    assert_same_state(model, load_pretrained(tmp_path / "back", num_classes=None))
    assert main(["convert", str(tmp_path / "back"), "--to", "nnunet", "-o", str(tmp_path / "w.pth")]) == 0
    raw = torch.load(tmp_path / "w.pth", weights_only=True)
    assert sorted(raw) == ["network_weights"]
    # what nnU-Net's load_pretrained_weights needs: every key of DNA's network present with the same shape
    dna = build_dna(model.config)
    dna.load_state_dict(raw["network_weights"], strict=True)
    with torch.no_grad():
        dna_reference.assert_same_function(model(X), dna(X), dna, X)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "nope.pth"), "--to", "s3d", "-o", str(tmp_path / "x")]) == 1
    assert "nope.pth" in capsys.readouterr().err


def test_push_to_hub_uploads_a_loadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub's commit API is not available offline: record what push_to_hub hands to HfApi."""
    import shutil

    import huggingface_hub

    from s3d.hub import push_to_hub

    calls: dict[str, object] = {}

    def create_repo(self: object, repo_id: str, **kw: object) -> str:
        calls["create"] = (repo_id, kw)
        return repo_id

    def upload_folder(self: object, *, repo_id: str, folder_path: str, **kw: object) -> str:
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls["upload"] = (repo_id, kw)
        return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = tiny()
    url = push_to_hub(model, "me/tiny", private=True, license="cc-by-4.0", recipe={"steps": 1})
    assert url == "https://hub.example/commit/1"
    assert calls["create"] == ("me/tiny", {"private": True, "exist_ok": True})
    assert calls["upload"][0] == "me/tiny"
    assert_same_state(model, load_pretrained(tmp_path / "uploaded"))
