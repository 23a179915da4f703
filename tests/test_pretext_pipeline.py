"""Each baseline method end to end: `s3d pretrain --recipe X` on the tiny config, then the export
loads with `load_pretrained` and fine-tunes with `s3d finetune`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")

from test_nnunet_data import make_sphere_dataset  # noqa: E402

import s3d.pretext  # noqa: E402,F401  (registers the recipes "mg", "vf", "voco")
from s3d.cli import main  # noqa: E402
from s3d.hub import load_pretrained  # noqa: E402
from s3d.nn import build_resenc_unet  # noqa: E402
from s3d.pretrain import get_recipe, list_recipes  # noqa: E402

PATCH = {"mg": ["32"], "vf": ["32"], "voco": ["64", "32", "32"]}
KWARGS = {"mg": None, "vf": None, "voco": '{"crop_size": [32, 16, 16], "num_targets": 2, "proj_hidden": 64}'}


def test_recipes_hold_appendix_a() -> None:
    assert {"mg", "vf", "voco"} <= set(list_recipes())
    for name in ("mg", "vf", "voco"):
        r = get_recipe(name)
        assert r.method == name and r.steps == 250_000 and r.architecture == "resenc_l"
        assert (r.lr, r.momentum, r.weight_decay, r.optimizer) == (1e-2, 0.99, 3e-5, "sgd")
    assert get_recipe("voco").patch_size == (192, 192, 64) and get_recipe("voco").batch_size == 12
    assert get_recipe("voco").method_kwargs == {"crop_size": 64, "num_targets": 5}
    assert get_recipe("vf").method_kwargs["num_rectangles"] == [10, 40]
    assert get_recipe("mg").method_kwargs["outpaint_rate"] == 0.8
    # the paper-scale modules build from the recipes (VoCo: 3x3 grid of 64^3 crops)
    from s3d.pretrain import build_method

    r = get_recipe("voco")
    voco = build_method(r.method, build_resenc_unet("tiny", in_channels=1, num_classes=1), **r.method_kwargs)
    assert voco.crop_size == (64, 64, 64) and voco.num_targets == 5


@pytest.fixture(scope="module")
def sphere_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "ds"
    make_sphere_dataset(root, n=3, size=32, channels=1)
    return root


@pytest.mark.parametrize("method", ["mg", "vf", "voco"])
def test_pretrain_cli_then_finetune(method: str, prepared: Path, sphere_ds: Path, tmp_path: Path) -> None:
    run = tmp_path / "pre"
    argv = ["pretrain", "--data", str(prepared), "--out", str(run), "--recipe", method, "--config", "tiny",
            "--steps", "3", "--batch-size", "2", "--patch-size", *PATCH[method], "--workers", "0",
            "--val-fraction", "0.2", "--val-every", "3", "--snapshot-every", "3", "--checkpoint-every", "3",
            "--no-progress", "--seed", "1"]
    if KWARGS[method]:
        argv += ["--method-kwargs", KWARGS[method]]
    assert main(argv) == 0
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any("val_loss" in r and math.isfinite(r["val_loss"]) for r in recs)
    assert json.loads((run / "run.json").read_text())["recipe"]["method"] == method
    if method != "voco":  # MG/VF give a reconstruction for the snapshot; VoCo has none
        assert (run / "snapshots" / "step_00000003.png").is_file()

    net = load_pretrained(run / "backbone", in_channels=1, num_classes=2)
    assert net.config.features_per_stage == build_resenc_unet("tiny").config.features_per_stage
    ckpt = torch.load(run / "checkpoint_latest.pt", weights_only=True)
    enc_key = "encoder.stem.convs.0.conv.weight"
    assert torch.equal(net.state_dict()[enc_key], ckpt["model"][f"backbone.{enc_key}"])  # the trained weights

    ft = tmp_path / "ft"
    assert main(["finetune", str(sphere_ds), "-o", str(ft), "--pretrained", str(run / "backbone"),
                 "--config", "tiny", "--steps", "3", "--warmup-steps", "1", "--patch-size", "32", "32", "32",
                 "--val-every", "3", "--checkpoint-every", "3", "--no-progress", "--seed", "0"]) == 0
    ft_losses = [json.loads(ln)["loss"] for ln in (ft / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(ln)]
    assert len(ft_losses) == 3 and all(math.isfinite(v) for v in ft_losses)
    assert (ft / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["mg", "vf"])
def test_kill_and_resume_is_bitwise(method: str, prepared: Path, tmp_path: Path) -> None:
    """The methods draw only from the trainer's per-step seeded streams: a resumed run is bitwise equal."""
    from s3d.pretrain import PretrainConfig, read_metrics
    from s3d.pretrain import run as pretrain

    common = dict(data=str(prepared), recipe=method, architecture="tiny", steps=4, batch_size=2,
                  patch_size=(32, 32, 32), workers=0, progress=False, val_fraction=0.2, val_every=0,
                  snapshot_every=0, checkpoint_every=2)
    pretrain(PretrainConfig(out=str(tmp_path / "full"), **common))
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), stop_after=2, **common))
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume=True, **common))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert sorted(b) == [1, 2, 3, 4] and [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]
    sa = torch.load(tmp_path / "full" / "checkpoint_latest.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "cut" / "checkpoint_latest.pt", weights_only=True)["model"]
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("head.") for k in sa) == (method == "vf")  # the VF head is checkpointed
