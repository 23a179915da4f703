"""Fine-tuning: transfer, the paper's schedules, decoder-only freezing, loss, sampling, augmentation, loop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("scipy")

from test_nnunet_data import make_sphere_dataset  # noqa: E402

from s3d.finetune import (  # noqa: E402
    SCHEDULES,
    CachedCase,
    DiceCELoss,
    FinetuneConfig,
    Trainer,
    decoder_parameters,
    encoder_parameters,
    get_schedule,
    lr_at,
    make_split,
    prepare_model,
    sample_patches,
)
from s3d.nn import build_resenc_unet  # noqa: E402


# ---- schedules -----------------------------------------------------------------------------------
def test_best_schedule_lr_at_phase_boundaries() -> None:
    """The paper's best row at 250k steps: 12.5k decoder warm-up, 12.5k full warm-up, PolyLR from 1e-3."""
    phases = get_schedule("best").plan()
    assert [(p.name, p.trains, p.start, p.stop) for p in phases] == [
        ("warmup_decoder", "decoder", 0, 12_500), ("warmup_all", "all", 12_500, 25_000),
        ("train", "all", 25_000, 250_000)]
    peak, w, n = 1e-3, 12_500, 225_000
    expected = {
        0: peak / w,                              # ramp: peak * (t + 1) / w, never a step at lr 0
        6_249: peak * 0.5,
        12_499: peak,                             # end of warm-up 1 reaches the peak
        12_500: peak / w,                         # warm-up 2 ramps again from peak / w
        18_749: peak * 0.5,
        24_999: peak,
        25_000: peak,                             # training stage starts at the peak
        25_000 + n // 2: peak * 0.5**0.9,
        249_999: peak * (1 / n) ** 0.9,
    }
    for step, lr in expected.items():
        # float64, a few operations and a power (each <= 1-2 ulps): ~1e-15 relative
        assert lr_at(phases, step) == pytest.approx(lr, rel=1e-9, abs=1e-15), step


def test_schedules_scale_with_steps_and_table8() -> None:
    phases = get_schedule("best").plan(1000)
    assert [(p.start, p.stop) for p in phases] == [(0, 50), (50, 100), (100, 1000)]
    # Table 8: 37.5k total with 12.5k + 12.5k warm-ups leaves 12.5k of training
    assert [(p.start, p.stop) for p in get_schedule("best").plan(37_500, warmup_steps=12_500)] == [
        (0, 12_500), (12_500, 25_000), (25_000, 37_500)]
    with pytest.raises(ValueError, match="no training stage"):
        get_schedule("best").plan(25_000, warmup_steps=12_500)
    # rows of Table 2
    assert [p.name for p in get_schedule("no_warmup").plan(100)] == ["train"]
    assert lr_at(get_schedule("no_warmup").plan(100), 0) == pytest.approx(1e-2)
    assert [p.name for p in get_schedule("warmup_all").plan(100)] == ["warmup_all", "train"]
    assert [(p.name, p.trains) for p in get_schedule("frozen_encoder").plan(100)] == [("train_decoder", "decoder")]
    assert {SCHEDULES[f"warmup_all{s}"].peak_lr for s in ("", "_lr1e-3", "_lr1e-4")} == {1e-2, 1e-3, 1e-4}
    assert get_schedule("scratch").transfer == "none"
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("nope")


# ---- transfer ------------------------------------------------------------------------------------
def test_prepare_model_from_module_and_path(tmp_path) -> None:
    from s3d.hub import save_pretrained

    src = build_resenc_unet("tiny", in_channels=1, num_classes=1)
    net = prepare_model(src, in_channels=2, num_classes=3, strategy="all", stem="replicate")
    w_src = src.state_dict()["encoder.stem.convs.0.conv.weight"]
    w = net.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert w.shape[1] == 2
    for c in range(2):  # replicated: the 1-channel stem split over the channels
        torch.testing.assert_close(w[:, c:c + 1], w_src / 2, rtol=0, atol=0)  # exact: halving is exact in fp
    sd_src, sd = src.state_dict(), net.state_dict()
    same = [k for k in sd if k in sd_src and sd[k].shape == sd_src[k].shape and torch.equal(sd[k], sd_src[k])]
    assert "decoder.transpconvs.0.weight" in same and "encoder.stages.2.blocks.0.conv1.conv.weight" in same
    assert net.config.num_classes == 3 and net.transfer_report.new_head
    enc_only = prepare_model(src, in_channels=1, num_classes=3, strategy="encoder")
    tkey = "decoder.transpconvs.0.weight"
    assert not torch.equal(enc_only.state_dict()[tkey], sd_src[tkey])
    assert torch.equal(enc_only.state_dict()["encoder.stem.convs.0.conv.weight"], w_src)
    # through s3d.hub.load_pretrained from a saved directory
    save_pretrained(src, tmp_path / "pre")
    from_dir = prepare_model(tmp_path / "pre", in_channels=2, num_classes=3, stem="random")
    assert from_dir.transfer_report.stem == "random"
    assert torch.equal(from_dir.state_dict()[tkey], sd_src[tkey])
    assert from_dir.training
    scratch = prepare_model(None, in_channels=2, num_classes=3, config="tiny")
    assert scratch.transfer_report is None and scratch.config.in_channels == 2
    # the parameter split covers the model exactly once
    ids_e = {id(p) for p in encoder_parameters(net)}
    ids_d = {id(p) for p in decoder_parameters(net)}
    assert not ids_e & ids_d and len(ids_e | ids_d) == len(list(net.parameters()))


# ---- loss, sampling, augmentation ----------------------------------------------------------------
@pytest.mark.numerical
def test_dice_ce_loss_against_explicit_reference() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4, 5, 6))
    got = DiceCELoss().single(logits, y)
    p = logits.softmax(1).numpy()
    t = y.numpy()
    ce = -np.mean([np.log(p[b, t[b, i, j, k], i, j, k]) for b in range(2) for i in range(4) for j in range(5)
                   for k in range(6)])
    dices = []
    for c in (1, 2):
        inter = (p[:, c] * (t == c)).sum()
        dices.append((2 * inter + 1e-5) / (p[:, c].sum() + (t == c).sum() + 1e-5))
    # float64 logits stay float64: sums of 240 terms (<= 240 eps64 = 5e-14 relative) and a few roundings
    assert float(got) == pytest.approx(ce + 1 - np.mean(dices), rel=1e-12)
    assert DiceCELoss.deep_supervision_weights(4) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    # deep supervision: weighted sum over nearest-downsampled targets
    outs = [logits, logits[:, :, ::2, ::2, ::2].contiguous(), logits[:, :, ::4, ::4, ::4].contiguous()]
    y_half = F.interpolate(y[:, None].double(), size=outs[1].shape[2:], mode="nearest")[:, 0].long()
    ref = (DiceCELoss().single(outs[0], y) * 1 + DiceCELoss().single(outs[1], y_half) * 0.5) / 1.5
    # the same float64 sums, weighted in another order: a few roundings
    assert float(DiceCELoss()(outs, y)) == pytest.approx(float(ref), rel=1e-12)


def test_foreground_oversampling_and_padding() -> None:
    rng = np.random.default_rng(0)
    seg = np.zeros((40, 40, 40), np.int16)
    seg[30:33, 5:8, 20:23] = 1                                  # tiny foreground
    locs = np.concatenate([np.ones((27, 1)), np.argwhere(seg == 1)], 1).astype(np.int32)
    case = CachedCase("a", rng.normal(size=(2, 40, 40, 40)).astype(np.float32), seg, locs)
    gen = torch.Generator().manual_seed(0)
    fg_hits = 0
    for _ in range(20):
        x, y = sample_patches([case], 3, (16, 16, 16), gen, foreground_fraction=0.33)
        assert x.shape == (3, 2, 16, 16, 16) and y.shape == (3, 16, 16, 16) and y.dtype == torch.int64
        assert int(y[-1].sum()) > 0                              # the forced-foreground sample
        fg_hits += int(y[0].sum() > 0)
    assert fg_hits < 10                                          # random ones rarely hit it
    small = CachedCase("b", np.ones((1, 10, 20, 12), np.float32), np.ones((10, 20, 12), np.int16),
                       np.zeros((0, 4), np.int32))
    x, y = sample_patches([small], 2, (16, 16, 16), gen)
    assert x.shape == (2, 1, 16, 16, 16)
    assert float(x[0, 0, 12:].abs().sum()) == 0 and int(y[0, 12:].sum()) == 0


def test_make_split_is_seeded_and_n_train() -> None:
    cases = [f"c{i:02d}" for i in range(10)]
    a, b = make_split(cases, 0.2, 0), make_split(cases, 0.2, 0)
    assert a == b and len(a["val"]) == 2 and len(a["train"]) == 8 and not set(a["val"]) & set(a["train"])
    assert make_split(cases, 0.2, 1)["val"] != a["val"] or make_split(cases, 0.2, 2)["val"] != a["val"]
    low = make_split(cases, 0.2, 0, n_train=3)
    assert low["val"] == a["val"] and len(low["train"]) == 3 and set(low["train"]) <= set(a["train"])


# ---- the loop ------------------------------------------------------------------------------------
def _cfg(tmp_path, name: str, **kw) -> FinetuneConfig:
    base = dict(dataset=str(tmp_path / "ds"), out_dir=str(tmp_path / name), config="tiny", batch_size=2,
                patch_size=(32, 32, 32), val_every=1000, checkpoint_every=1000, progress=False, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture()
def sphere_ds(tmp_path):
    make_sphere_dataset(tmp_path / "ds", n=4, size=32)
    return tmp_path / "ds"


def test_decoder_only_warmup_leaves_encoder_bitwise_unchanged(tmp_path, sphere_ds) -> None:
    src = build_resenc_unet("tiny", in_channels=1, num_classes=1)
    model = prepare_model(src, in_channels=2, num_classes=2, strategy="all")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    opt_ids: dict[int, set[int]] = {}

    def on_step(tr: Trainer, rec) -> None:
        snaps[rec.step] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
        opt_ids[rec.step] = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}

    cfg = _cfg(tmp_path, "run", schedule="best", steps=9, warmup_steps=3)
    tr = Trainer(cfg, model=model, on_step=on_step)
    tr.fit()
    enc_ids = {id(p) for p in encoder_parameters(tr.model)}
    after_w1 = snaps[3]                                            # end of warm-up 1 (decoder only)
    enc_keys = [k for k in before if k.startswith("encoder.")]
    assert any(k.startswith("encoder.stem.") for k in enc_keys)
    for k in enc_keys:
        assert torch.equal(after_w1[k], before[k]), k             # bitwise, stem included
    assert not opt_ids[3] & enc_ids                                # not in the optimiser
    assert not torch.equal(after_w1["decoder.stages.0.convs.0.conv.weight"],
                           before["decoder.stages.0.convs.0.conv.weight"])
    after_w2 = snaps[6]                                            # end of warm-up 2 (all weights)
    assert enc_ids <= opt_ids[6]
    changed = [k for k in enc_keys if k.endswith("weight") and not torch.equal(after_w2[k], before[k])]
    assert "encoder.stem.convs.0.conv.weight" in changed
    assert len(changed) == len([k for k in enc_keys if k.endswith("weight")])
    # everything trains at the end but the lowest-resolution head, whose deep-supervision weight is 0
    frozen = {n for n, p in tr.model.named_parameters() if not p.requires_grad}
    assert frozen == {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
    assert DiceCELoss.deep_supervision_weights(len(tr.model.decoder.seg_layers))[-1] == 0


def test_frozen_encoder_and_stem_in_warmup_options(tmp_path, sphere_ds) -> None:
    src = build_resenc_unet("tiny", in_channels=1, num_classes=1)
    model = prepare_model(src, in_channels=2, num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Trainer(_cfg(tmp_path, "frozen", schedule="frozen_encoder", steps=4, warmup_steps=2), model=model)
    tr.fit()
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert not torch.equal(after["decoder.seg_layers.3.weight"], before["decoder.seg_layers.3.weight"])
    # Table 6 "unfrozen": the stem trains in warm-up 1, the rest of the encoder does not
    model = prepare_model(src, in_channels=2, num_classes=2, stem="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = {}

    def on_step(t: Trainer, rec) -> None:
        if rec.step == 3:
            snap.update({k: v.clone() for k, v in t.model.state_dict().items()})

    cfg = _cfg(tmp_path, "stem", schedule="best", steps=8, warmup_steps=3, train_stem_in_decoder_warmup=True)
    Trainer(cfg, model=model, on_step=on_step).fit()
    stem_w = "encoder.stem.convs.0.conv.weight"
    assert not torch.equal(snap[stem_w], before[stem_w])
    assert all(torch.equal(snap[k], v) for k, v in before.items()
               if k.startswith("encoder.stages."))


def test_cli_finetune_writes_run_and_model(tmp_path, sphere_ds, capsys) -> None:
    from s3d.cli import main
    from s3d.data.nnunet import PreprocessingSpec
    from s3d.hub import load_pretrained

    out = tmp_path / "cli"
    rc = main(["finetune", str(sphere_ds), "-o", str(out), "--config", "tiny", "--schedule", "scratch",
               "--steps", "4", "--val-every", "2", "--checkpoint-every", "2",
               "--patch-size", "32", "32", "32", "--no-progress", "--seed", "1"])
    assert rc == 0
    for name in ("finetune_config.json", "split.json", "metrics.jsonl", "checkpoint_latest.pt",
                 "model/model.safetensors", "model/config.json", "model/preprocessing.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "val_dice" in r] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)
    # the CLI's last line reports the final sliding-window validation that metrics.jsonl holds
    final = recs[-1]
    assert final["val_mode"] == "sliding_window" and final["step"] == 4
    assert f"final validation Dice {final['final_dice']:.4f} (sliding window)" in capsys.readouterr().out
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3
    spec = PreprocessingSpec.load(out / "model" / "preprocessing.json")
    assert spec.patch_size == (32, 32, 32) and spec.channel_names == ("mod0", "mod1")
    net = load_pretrained(out / "model", in_channels=None)
    assert net.config.in_channels == 2 and net.config.num_classes == 2 and not net.deep_supervision
    # a second run into the same folder refuses without --resume; a bad dataset lists its problems
    assert main(["finetune", str(sphere_ds), "-o", str(out), "--config", "tiny", "--steps", "4",
                 "--no-progress"]) == 1
    (sphere_ds / "imagesTr" / "case001_0001.nii.gz").unlink()
    assert main(["finetune", str(sphere_ds), "-o", str(tmp_path / "x"), "--steps", "4", "--no-progress"]) == 1


class _Kill(Exception):
    pass


@pytest.mark.parametrize("ckpt_every", [2, 4])
def test_resume_after_kill_continues_exactly(tmp_path, sphere_ds, ckpt_every: int) -> None:
    """Kill after a checkpoint (plus lost steps), resume: same step, same lr, same losses as uninterrupted."""
    kw = dict(schedule="best", steps=8, warmup_steps=2, checkpoint_every=ckpt_every, pretrained=None)
    full = Trainer(_cfg(tmp_path, "full", **kw))
    full.fit()
    ref = {r.step: r for r in full.history}

    def kill(tr: Trainer, rec) -> None:
        if rec.step == ckpt_every + 1:
            raise _Kill

    with pytest.raises(_Kill):
        Trainer(_cfg(tmp_path, "killed", **kw), on_step=kill).fit()
    resumed = Trainer(_cfg(tmp_path, "killed", resume=True, **kw))
    resumed.fit()
    assert resumed.history[0].step == ckpt_every + 1               # continues after the checkpoint
    for rec in resumed.history:
        assert rec.lr == ref[rec.step].lr and rec.phase == ref[rec.step].phase
        assert rec.loss == ref[rec.step].loss, rec.step          # bitwise on CPU
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert logged == list(range(1, 9))                             # the lost steps are not duplicated
    with pytest.raises(ValueError, match="cannot resume"):
        Trainer(_cfg(tmp_path, "killed", resume=True, **{**kw, "steps": 10}))


@pytest.mark.slow
def test_cli_finetune_reaches_dice_on_spheres(tmp_path) -> None:
    """A few hundred steps from scratch segment the bright sphere (validation Dice > 0.8)."""
    from s3d.cli import main

    make_sphere_dataset(tmp_path / "ds", n=6, size=32)
    out = tmp_path / "run"
    rc = main(["finetune", str(tmp_path / "ds"), "-o", str(out), "--config", "tiny", "--schedule", "scratch",
               "--steps", "200", "--val-every", "100", "--checkpoint-every", "100", "--no-progress"])
    assert rc == 0
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_dice" in x]
    assert vals[-1]["step"] == 200 and vals[-1]["val_dice"] > 0.8


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path) -> None:
    """A real ``kill -9`` of ``s3d finetune`` after its first checkpoint; ``--resume`` finishes the run
    and the steps after the checkpoint have the losses and lr of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    make_sphere_dataset(tmp_path / "ds", n=4, size=32)
    args = [sys.executable, "-m", "s3d", "finetune", str(tmp_path / "ds"), "--config", "tiny",
            "--schedule", "best", "--steps", "40", "--warmup-steps", "5", "--checkpoint-every", "10",
            "--val-every", "1000",
            "--patch-size", "32", "32", "32", "--no-progress", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "-o", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "-o", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint_latest.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint_latest.pt").exists()
    assert not (killed / "model").exists()                        # it did not finish
    subprocess.run([*args, "-o", str(killed), "--resume"], check=True, env=env, capture_output=True)

    def steps(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}

    ref, got = steps("full"), steps("killed")
    assert sorted(got) == list(range(1, 41))
    for s in range(11, 41):
        # the same computation on the same machine (bitwise in-process, test above); rel 1e-5 is far below
        # what a repeated or skipped step changes (~1e-2) and needs no rounding argument
        assert got[s]["lr"] == ref[s]["lr"] and got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s


def test_timm_import_warning_is_not_shown_to_users():
    """timm's import-time torch.jit.interface FutureWarning must not reach s3d users (it did in `s3d demo`)."""
    import subprocess
    import sys

    code = ("from s3d.finetune.schedules import get_schedule, lr_at\n"
            "from s3d.hub.timm_models import register_timm_models\n"
            "print(lr_at(get_schedule('best').plan(100), 10)); register_timm_models()\n")
    res = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "0.001"
