"""The frozen-encoder probe (``s3d.finetune.probe``, ``s3d probe``): its two arms, its runs, its command."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("scipy")

from test_nnunet_data import make_sphere_dataset  # noqa: E402

from s3d.cli import main  # noqa: E402
from s3d.finetune.probing import check_probe_options, fingerprint, probe, probe_model  # noqa: E402
from s3d.nn import build_resenc_unet  # noqa: E402

SMALL = dict(n_train=2, steps=3, patch_size=(32, 32, 32), device="cpu", progress=False, loader_threads=0)


def _source() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_resenc_unet("tiny", in_channels=1, num_classes=1)


def test_the_two_arms_differ_in_the_encoder_only() -> None:
    src = _source()
    w = probe_model(src, "weights", 3, in_channels=2, num_classes=2)
    r = probe_model(src, "random", 3, in_channels=2, num_classes=2)
    sw, sr, ss = w.state_dict(), r.state_dict(), src.state_dict()
    assert sw.keys() == sr.keys()
    for k in sw:
        if k.startswith("decoder."):  # the same seeded fresh decoder (and head) in both arms
            assert torch.equal(sw[k], sr[k]), k
        elif k != "encoder.stem.convs.0.conv.weight":  # the weights' encoder, a random one in the other arm
            assert torch.equal(sw[k], ss[k]), k
            if k.endswith("conv.weight"):
                assert not torch.equal(sr[k], ss[k]), k
    # a 2-channel stem from the 1-channel weights: replicated (each channel gets half), as fine-tuning does
    stem = ss["encoder.stem.convs.0.conv.weight"]
    assert torch.allclose(sw["encoder.stem.convs.0.conv.weight"], torch.cat([stem, stem], 1) / 2)
    # the random arm is what the weights arm was before the weights were loaded
    torch.manual_seed(3)
    fresh = build_resenc_unet(src.config, in_channels=2, num_classes=2, deep_supervision=False)
    assert fingerprint(fresh) == fingerprint(r)
    with pytest.raises(ValueError, match="init"):
        probe_model(src, "imagenet", 0, 1, 2)


def test_probe_runs_both_arms_per_seed_names_cases_and_resumes(tmp_path) -> None:
    ds = make_sphere_dataset(tmp_path / "ds", n=6, channels=1)
    out = tmp_path / "probe"
    r = probe(_source(), ds, out, seeds=(0, 1), name="my weights", **SMALL)
    assert [(x.init, x.seed) for x in r.runs] == [("weights", 0), ("random", 0), ("weights", 1), ("random", 1)]
    saved = json.loads((out / "probe.json").read_text())
    assert saved["weights"] == "my weights" and saved["settings"]["schedule"] == "frozen_encoder"
    for x in r.runs:
        run = tmp_path / "probe" / f"{x.init}_seed{x.seed}"
        split = json.loads((run / "split.json").read_text())
        assert x.train_cases == split["train"] and len(x.train_cases) == 2
        assert x.val_cases == split["val"] and not set(x.val_cases) & set(x.train_cases)
        # the reported Dice is the run's final (sliding-window) validation, as logged
        final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if "final_dice" in line]
        assert x.dice == final[-1]["final_dice"] and x.steps == 3
        assert not (run / "checkpoint_latest.pt").exists() and not (run / "model").exists()
    # the same seed draws the same cases for both arms; another seed other cases
    assert r.runs[0].train_cases == r.runs[1].train_cases
    assert r.deltas() == pytest.approx([r.runs[0].dice - r.runs[1].dice, r.runs[2].dice - r.runs[3].dice])
    assert saved["mean"]["weights"] == pytest.approx((r.runs[0].dice + r.runs[2].dice) / 2)
    # run again: every run is read back, not trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    again = probe(_source(), ds, out, seeds=(0, 1), name="my weights", **SMALL)
    assert [x.dice for x in again.runs] == [x.dice for x in r.runs]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == stamps
    # other starting weights in the same folder: measured again, not read back
    other = build_resenc_unet("tiny", in_channels=1, num_classes=1)
    assert probe(other, ds, out, seeds=(0,), random=False, **SMALL).runs[0].seconds > 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} != stamps


def test_probe_arguments_are_checked_before_anything_runs(tmp_path) -> None:
    ds = make_sphere_dataset(tmp_path / "ds", n=4, channels=1)
    with pytest.raises(ValueError, match="seeds"):
        probe(_source(), ds, tmp_path / "o", seeds=(), **SMALL)
    with pytest.raises(ValueError, match="'schedule' is fixed"):
        probe(_source(), ds, tmp_path / "o", schedule="best", **SMALL)
    with pytest.raises(ValueError, match=r"probe options \['stepz'\]: unknown"):
        check_probe_options(ds, {"stepz": 3})
    check_probe_options(ds, {"steps": 3, "n_train": 2, "val_fraction": 0.3})
    with pytest.raises(ValueError, match="nowhere: no such dataset folder"):
        check_probe_options(tmp_path / "nowhere", {})
    assert not (tmp_path / "o").exists()


def test_cli_probe_prints_both_arms_and_refuses_bad_input(tmp_path, capsys, monkeypatch) -> None:
    from s3d import save_pretrained

    ds = make_sphere_dataset(tmp_path / "ds", n=6, channels=1)
    save_pretrained(_source(), tmp_path / "w")
    out = tmp_path / "p"
    argv = ["probe", "--weights", str(tmp_path / "w"), "--data", str(ds), "-o", str(out), "--n-train", "2",
            "--steps", "2", "--seeds", "0", "--patch-size", "32", "32", "32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "probe.json").read_text())
    w, r = result["runs"]
    assert f"seed 0 weights: validation Dice {w['dice']:.4f}  trained on {', '.join(w['train_cases'])}" in printed
    assert f"seed 0 random : validation Dice {r['dice']:.4f}" in printed
    assert f"probe of {tmp_path / 'w'}: validation Dice {w['dice']:.3f}" in printed
    # bad input: one line each, exit 1, nothing written
    for bad, says in ((["--weights", "nope-not-a-model"], "nope-not-a-model"),
                      (["--data", str(tmp_path / "missing")], "missing: no such dataset folder"),
                      (["--n-train", "9"], "n_train=9 (--n-train)"),
                      (["-o", str(ds)], "not written by s3d probe")):
        args = list(argv)
        for flag, value in zip(bad[::2], bad[1::2], strict=True):
            args[args.index(flag) + 1] = value
        assert main(args) == 1, bad
        err = capsys.readouterr().err
        assert says in err and err.startswith("s3d probe: error:"), err
    assert not (tmp_path / "missing").exists()
