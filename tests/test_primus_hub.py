"""Primus checkpoints as nnssl and nnU-Net publish them: through the local Hub server, load_pretrained, convert.

The nnssl-layout checkpoints are built here to the structure of the public ones (the ``.pth`` dict with
``network_weights`` and ``nnssl_adaptation_plan``, plus ``adaptation_plan.json`` and a foreign
``config.json`` in the repo); the key layout of the MAE one is checked against the layout the reference
environment wrote (tests/data/primus/nnssl_evamae_small_keys.json, see tests/primus_reference.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer  # noqa: E402  (tests/ is on sys.path under pytest)

import s3d
from s3d.hub import CheckpointError, StrictLoadError, load_pretrained, save_pretrained
from s3d.hub import registry as registry_module
from s3d.hub.adapt import PRIMUS_KEYS
from s3d.hub.primus import preset_name, read_primus
from s3d.nn.primus import PrimusConfig
from s3d.nn.primus.convert import resize_pos_embed
from s3d.nn.primus.modules import PrimusEncoder

DATA = Path(__file__).parent / "data" / "primus"
REPO, COMMIT = "test-org/primus-mae", "c" * 40
SMALL = json.loads((DATA / "small.json").read_text())["config"]  # DNA's names: embed 48, 2 heads, patch (4, 4, 2)


def small_config(**kw: object) -> PrimusConfig:
    return PrimusConfig.from_dict({**SMALL, **kw})


def _randomized(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith(("norm1.weight", "norm.weight")) else 0.0)
            for k, v in module.state_dict().items()}


def nnssl_plan(cfg: PrimusConfig, stem: str = "down_projection", encoder: str = "eva",
               pretrain_patch: tuple[int, ...] | None = None, recommended: tuple[int, ...] | None = None) -> dict:
    """An adaptation plan as nnssl's Primus trainers write it (a non-preset width: nnU-Net's PrimusX kwargs)."""
    patch = list(pretrain_patch or cfg.input_shape)
    return {
        "architecture_plans": {
            "arch_class_name": "PrimusX",
            "arch_kwargs": {"embed_dim": cfg.embed_dim, "patch_embed_size": list(cfg.patch_embed_size),
                            "encoder_eva_depth": cfg.eva_depth, "encoder_eva_numheads": cfg.eva_numheads,
                            "init_values": cfg.init_values, "scale_attn_inner": cfg.scale_attn_inner},
            "arch_kwargs_requiring_import": [],
        },
        "pretrain_plan": {"dataset_name": "Dataset745_OpenNeuro_v2", "plans_name": "nnsslPlans",
                          "configurations": {"onemmiso": {"spacing": [1, 1, 1], "patch_size": patch}}},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": list(recommended or patch),
        "key_to_encoder": encoder,
        "key_to_stem": stem,
        "keys_to_in_proj": [f"{stem}.proj"],
        "key_to_lpe": f"{encoder}.pos_embed",
    }


def nnssl_mae_checkpoint(seed: int = 5) -> dict:
    """nnssl's Primus MAE layout: mask_token (learnt), down_projection, eva, up_projection (1 channel), decoder EVA."""
    cfg = small_config(num_classes=1)
    seg = s3d.build_primus(cfg)
    weights = {"mask_token": torch.randn(1, 1, cfg.embed_dim, generator=torch.Generator().manual_seed(seed))}
    weights.update({k: v for k, v in _randomized(seg, seed).items() if k != "mask_token"})
    decoder = PrimusEncoder(cfg.replace(eva_depth=1))
    weights.update({f"decoder.{k}": v for k, v in _randomized(decoder, seed + 1).items()})
    return {"network_weights": weights, "optimizer_state": {}, "grad_scaler_state": None, "current_epoch": 1000,
            "init_args": {"fold": 0}, "trainer_name": "BaseEvaMAETrainer", "nnssl_adaptation_plan": nnssl_plan(cfg)}


def publish(hub: HubServer, ckpt: dict, repo: str = REPO, plan: dict | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    hub.add_file(repo, "checkpoint_final.pth", buf.getvalue(), commit=COMMIT)
    plan = plan or ckpt["nnssl_adaptation_plan"]
    hub.add_file(repo, "adaptation_plan.json", json.dumps(plan).encode(), commit=COMMIT)
    hub.add_file(repo, "config.json", b'{"trainer": "BaseEvaMAETrainer", "architecture": "PrimusM"}', commit=COMMIT)
    return buf.getvalue()


def test_the_test_checkpoints_have_nnssls_mae_layout() -> None:
    ref = json.loads((DATA / "nnssl_evamae_small_keys.json").read_text())["keys"]
    ours = nnssl_mae_checkpoint()["network_weights"]
    assert {k: list(v.shape) for k, v in ours.items()} == dict(ref)


def test_primus_mae_from_the_hub_drops_the_decoder_eva_and_mask_token(hub: HubServer, tmp_path: Path) -> None:
    ckpt = nnssl_mae_checkpoint()
    publish(hub, ckpt)
    w = ckpt["network_weights"]
    model, report = load_pretrained(REPO, in_channels=2, num_classes=3, input_shape=(16, 12, 8),
                                    cache_dir=tmp_path / "cache", output_loading_info=True)
    assert isinstance(model, s3d.Primus) and model.config.input_shape == (16, 12, 8)
    assert report.format == "nnssl" and report.commit == COMMIT
    assert report.dropped_keys == sorted(["mask_token", *(k for k in w if k.startswith("decoder."))])
    assert report.stem == "replicated" and report.new_head and report.head_classes == (1, 3)
    assert report.pos_embed_grid == ((2, 3, 4), (4, 3, 4))
    summary = report.summary()
    assert "decoder.* (" in summary and "mask_token (1 tensor)" in summary and "2x3x4 to a 4x3x4" in summary
    state = model.state_dict()
    for key, value in w.items():  # the transformer comes over unchanged
        if key.startswith("eva.") and key != "eva.pos_embed":
            assert torch.equal(state[key], value), key
    stem = w["down_projection.proj.weight"]
    assert torch.equal(state["down_projection.proj.weight"], (stem / 2).repeat(1, 2, 1, 1, 1))
    assert torch.equal(state["eva.pos_embed"], resize_pos_embed(w["eva.pos_embed"], (2, 3, 4), (4, 3, 4)))
    assert not state["mask_token"].any()  # the segmentation network's zeros, not the pre-training token
    assert set(report.adapted_keys) == {"down_projection.proj.weight", "eva.pos_embed",
                                        *(k for k in state if k.startswith("up_projection."))}
    with torch.no_grad():
        assert model(torch.randn(1, 2, 16, 12, 8)).shape == (1, 3, 16, 12, 8)
    # unchanged channels, classes and patch: every tensor of the segmentation network from the checkpoint
    same, report = load_pretrained(REPO, cache_dir=tmp_path / "cache", output_loading_info=True)
    assert report.adapted_keys == [] and report.pos_embed_grid is None and same.config.num_classes == 1
    assert all(torch.equal(same.state_dict()[k], v) for k, v in w.items() if not k.startswith(("decoder.", "mask")))


def test_primus_registry_entry_pins_the_sha256(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    data = publish(hub, nnssl_mae_checkpoint())
    entry = dataclasses.replace(registry_module.MODELS[0], name="test-primus", repo_id=REPO, aliases=(),
                                architecture=small_config().to_dict(), keys=PRIMUS_KEYS,
                                sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(registry_module, "MODELS", (entry,))
    model, report = load_pretrained("test-primus", num_classes=2, cache_dir=tmp_path / "c", output_loading_info=True)
    assert report.sha256 == entry.sha256 and isinstance(model, s3d.Primus) and model.config.num_classes == 2
    bad = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setattr(registry_module, "MODELS", (bad,))
    with pytest.raises(s3d.hub.ChecksumError):
        load_pretrained("test-primus", cache_dir=tmp_path / "c2")


def test_contrastive_layout_maps_the_encoder_prefix_and_interpolates_to_the_recommended_patch(
    hub: HubServer, tmp_path: Path
) -> None:
    """SimCLR/VoCo/SwinUNETR wrap the encoder (``encoder.eva``, ``encoder.down_projection``), have no decoder,
    pre-train on a smaller crop and recommend the 160^3-style fine-tuning patch."""
    cfg = small_config(input_shape=(8, 8, 8))  # the pre-training crop: a (2, 2, 4) grid
    seg = _randomized(s3d.build_primus(cfg), 7)
    weights = {f"encoder.{k}": v for k, v in seg.items() if not k.startswith("up_projection.")}
    weights["encoder.mask_token"] = torch.randn(1, 1, cfg.embed_dim)
    weights.update({"projector.0.weight": torch.randn(64, cfg.embed_dim), "projector.0.bias": torch.zeros(64)})
    plan = nnssl_plan(cfg, "encoder.down_projection", "encoder.eva", recommended=(8, 12, 8))
    # no plan inside the checkpoint: the repo's adaptation_plan.json is fetched and used
    publish(hub, {"network_weights": weights}, repo="test-org/primus-simclr", plan=plan)
    model, report = load_pretrained("test-org/primus-simclr", num_classes=2, cache_dir=tmp_path / "c",
                                    output_loading_info=True)
    assert model.config.input_shape == (8, 12, 8) and report.recommended_input_shape == (8, 12, 8)
    assert report.pos_embed_grid == ((2, 2, 4), (2, 3, 4)) and report.random_decoder
    assert report.dropped_keys == ["encoder.mask_token", "projector.0.bias", "projector.0.weight"]
    assert any("encoder.eva.*" in n and "mapped onto" in n for n in report.notes)
    assert hub.gets("adaptation_plan.json") == 1
    assert torch.equal(model.state_dict()["eva.norm.weight"], seg["eva.norm.weight"])
    # "checkpoint": its own pre-training patch, no interpolation
    own = load_pretrained("test-org/primus-simclr", cache_dir=tmp_path / "c", input_shape="checkpoint")
    assert own.config.input_shape == (8, 8, 8) and torch.equal(own.state_dict()["eva.pos_embed"], seg["eva.pos_embed"])


def test_nnunet_training_checkpoint_reads_its_patch_from_init_args(tmp_path: Path) -> None:
    """nnU-Net's own Primus checkpoints (nnUNet_Primus_M_Trainer) carry no nnssl plan: the patch (which sizes the
    position embedding, here a non-cube) comes from the plans in ``init_args``; the zero mask token is no loss."""
    model = s3d.build_primus(small_config(num_classes=4))
    plans = {"configurations": {"3d_fullres": {"patch_size": [8, 12, 8], "spacing": [1.0, 1.0, 1.0]}}}
    torch.save({"network_weights": model.state_dict(), "trainer_name": "nnUNet_Primus_M_Trainer", "current_epoch": 1000,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0}}, tmp_path / "ckpt.pth")
    loaded, report = load_pretrained(tmp_path / "ckpt.pth", output_loading_info=True)
    assert loaded.config == model.config and report.dropped_keys == [] and report.adapted_keys == []
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_pos_embed_interpolation_equals_scipys_linear_zoom() -> None:
    """An independent implementation: scipy's order-1 zoom on the pixel grid (grid_mode=True: pixel centres at
    (i + 0.5) * old / new - 0.5) with edge replication is trilinear interpolation with align_corners=False."""
    from scipy.ndimage import zoom

    g = torch.Generator().manual_seed(8)
    for old, new in (((2, 3, 4), (4, 3, 4)), ((20, 20, 20), (16, 16, 12)), ((5, 4, 3), (7, 9, 2))):
        pos = torch.randn(1, int(np.prod(old)), 6, generator=g, dtype=torch.float64)
        ours = resize_pos_embed(pos, old, new)
        field = pos[0].T.reshape(6, *old).numpy()
        ref = np.stack([zoom(c, [n / o for n, o in zip(new, old)], order=1, grid_mode=True, mode="nearest")
                        for c in field])
        # float64, a handful of products and sums per value: 1e-12 is far above rounding, far below any mistake
        assert ref.shape == (6, *new)
        assert np.abs(ours[0].T.reshape(6, *new).numpy() - ref).max() <= 1e-12
    # the test can fail: align_corners=True samples elsewhere
    wrong = torch.nn.functional.interpolate(pos[0].T.reshape(1, 6, *old), size=new, mode="trilinear",
                                            align_corners=True)
    assert np.abs(wrong[0].numpy() - ref).max() > 1e-3


def test_read_primus_names_the_preset_from_nnssls_plan() -> None:
    """The published Primus-M plans name the architecture "PrimusM" without kwargs: the heads come from the preset."""
    with torch.device("meta"):
        net = s3d.build_primus("primus_m", num_classes=1)
    weights = {k: v for k, v in net.state_dict().items() if k != "mask_token"}
    plan = {"architecture_plans": {"arch_class_name": "PrimusM", "arch_kwargs": None},
            "pretrain_plan": {"configurations": {"onemmiso": {"patch_size": [160, 160, 160]}}},
            "key_to_encoder": "eva", "key_to_stem": "down_projection", "recommended_downstream_patchsize": [160] * 3}
    read = read_primus(weights, plan)
    assert read.config == s3d.nn.get_primus_config("primus_m").replace(num_classes=1)
    assert preset_name(read.config) == "PrimusM" and preset_name(small_config()) is None


def test_conversions_both_ways_keep_every_tensor(hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    from s3d.cli import main

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # the CLI uses the default cache

    ckpt = nnssl_mae_checkpoint()
    publish(hub, ckpt)
    w = {k: v for k, v in ckpt["network_weights"].items() if not k.startswith(("decoder.", "mask_token"))}
    assert main(["convert", REPO, "--to", "nnssl", "-o", str(tmp_path / "nnssl")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    n_dropped = 1 + sum(k.startswith("decoder.") for k in ckpt["network_weights"])
    assert f"dropped {n_dropped} pre-training tensor(s)" in out and "mask_token" in out
    raw = torch.load(tmp_path / "nnssl" / "checkpoint_final.pth", weights_only=True)
    plan = json.loads((tmp_path / "nnssl" / "adaptation_plan.json").read_text())
    assert raw["nnssl_adaptation_plan"] == plan and plan["key_to_encoder"] == "eva"
    assert plan["architecture_plans"]["arch_kwargs"]["encoder_eva_numheads"] == 2
    assert plan["pretrain_plan"]["configurations"]["s3d"]["patch_size"] == [8, 12, 8]
    assert all(torch.equal(raw["network_weights"][k], v) for k, v in w.items())
    assert not raw["network_weights"]["mask_token"].any()
    assert main(["convert", str(tmp_path / "nnssl"), "--to", "s3d", "-o", str(tmp_path / "s3d")]) == 0
    assert json.loads((tmp_path / "s3d" / "config.json").read_text())["model_type"] == "Primus"
    assert main(["convert", str(tmp_path / "s3d"), "--to", "nnunet", "-o", str(tmp_path / "w.pth")]) == 0
    back = torch.load(tmp_path / "w.pth", weights_only=True)["network_weights"]
    assert sorted(back) == sorted([*w, "mask_token"]) and all(torch.equal(back[k], v) for k, v in w.items())


def test_export_matches_dnas_key_tables(tmp_path: Path) -> None:
    """The nnU-Net export has DNA's keys and shapes: Primus-M at 160^3 (the reference's table) and the small
    reference network, whose exported weights nnU-Net's own loader takes into a network with DNA's keys."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from safetensors.torch import load_file

    from s3d.hub.convert import checkpoint_for

    table = json.loads((DATA / "primus_m_160_keys.json").read_text())["num_classes=1"]
    with torch.device("meta"):
        big = s3d.build_primus("primus_m", num_classes=1)
    exported, plan = checkpoint_for(big.state_dict(), big.config, "nnunet")
    assert [[k, list(v.shape)] for k, v in exported["network_weights"].items()] == table
    assert plan["architecture_plans"]["arch_class_name"] == "PrimusM"
    # the small reference network: s3d save -> convert --to nnunet -> exactly the reference's tensors
    tensors = load_file(str(DATA / "small.safetensors"))
    ref = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    model = s3d.build_primus(small_config())
    model.load_state_dict(ref)
    save_pretrained(model, tmp_path / "m")
    from s3d.hub.convert import convert

    paths, _ = convert(tmp_path / "m", "nnunet", tmp_path / "x.pth")
    out = torch.load(paths[0], weights_only=True)["network_weights"]
    assert sorted(out) == sorted(ref) and all(torch.equal(out[k], ref[k]) for k in ref)
    target = s3d.build_primus(small_config())
    load_pretrained_weights(target, str(paths[0]))  # nnU-Net's -pretrained_weights loader: asserts every key/shape
    assert all(torch.equal(target.state_dict()[k], ref[k]) for k in ref)


def test_primus_load_errors_name_the_problem(tmp_path: Path) -> None:
    ckpt = nnssl_mae_checkpoint()
    weights = ckpt["network_weights"]
    weights["eva.blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "extra.pth")
    with pytest.raises(StrictLoadError, match=r"eva\.blocks\.0\.attn\.extra"):
        load_pretrained(tmp_path / "extra.pth")
    del weights["eva.blocks.0.attn.extra"]
    ckpt["nnssl_adaptation_plan"]["architecture_plans"] = {"arch_class_name": "PrimusX", "arch_kwargs": None}
    for key in [k for k in weights if k.startswith("eva.blocks.1.")]:  # width 48, depth 1: no preset to take heads from
        del weights[key]
    torch.save(ckpt, tmp_path / "noheads.pth")
    with pytest.raises(CheckpointError, match=r"noheads\.pth: cannot infer the number of attention heads"):
        load_pretrained(tmp_path / "noheads.pth")
    with pytest.raises(ValueError, match="input_shape: .*not divisible"):
        load_pretrained(save_pretrained(s3d.build_primus(small_config()), tmp_path / "small"), input_shape=(9, 12, 8))
    resenc = save_pretrained(s3d.build_resenc_unet("tiny"), tmp_path / "resenc")
    with pytest.raises(ValueError, match="input_shape applies to Primus only"):
        load_pretrained(resenc, input_shape=32)
    # fine-tuning passes its patch whatever the family: ignored for a ResEnc U-Net, only inside that call
    from s3d.hub.pretrained import load_pretrained_for_finetuning

    model, _ = load_pretrained_for_finetuning(resenc, input_shape=(32, 32, 32), num_classes=3)
    assert isinstance(model, s3d.ResEncUNet) and model.config.num_classes == 3
    with pytest.raises(ValueError, match="input_shape applies to Primus only"):
        load_pretrained(resenc, input_shape=32)


def test_decoder_false_keeps_the_primus_decoder_fresh(tmp_path: Path) -> None:
    model = s3d.build_primus(small_config())
    save_pretrained(model, tmp_path / "m")
    enc, report = load_pretrained(tmp_path / "m", decoder=False, output_loading_info=True)
    assert report.random_decoder and set(report.adapted_keys) == {k for k in model.state_dict()
                                                                  if k.startswith("up_projection.")}
    assert torch.equal(enc.state_dict()["eva.pos_embed"], model.state_dict()["eva.pos_embed"])


def test_push_to_hub_uploads_a_loadable_primus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub's commit API is not available offline: record what push_to_hub hands to HfApi."""
    import shutil

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, *, repo_id, folder_path, **kw: shutil.copytree(folder_path, tmp_path / "up"))
    model = s3d.build_primus(small_config())
    s3d.push_to_hub(model, "me/primus", license="cc-by-4.0")
    assert "# Primus (" in (tmp_path / "up" / "README.md").read_text()
    loaded = load_pretrained(tmp_path / "up")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
