"""Pre-training loop: bitwise kill-and-resume, 2-process torchrun (gloo), exports, data stream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import assert_yardstick

from s3d.data.pretrain_dataset import (
    RandomCropDataset,
    build_pretrain_loader,
    shard_cases,
    split_subjects,
)
from s3d.pretrain import PretrainConfig, build_method, read_metrics
from s3d.pretrain import run as pretrain
from s3d.runtime.checkpoint import load_checkpoint

TINY = {"recipe": "s3d-b", "architecture": "tiny", "batch_size": 2, "patch_size": (32, 32, 32),
        "method_kwargs": {"block_size": 16}, "workers": 0, "progress": False, "val_fraction": 0.2}



def _cfg(prepared: Path, out: Path, **kw) -> PretrainConfig:
    return PretrainConfig(data=str(prepared), out=str(out), **{**TINY, **kw})


def test_kill_and_resume_is_bitwise(prepared: Path, tmp_path: Path) -> None:
    common = {"steps": 20, "checkpoint_every": 10, "val_every": 10, "snapshot_every": 10}
    full = pretrain(_cfg(prepared, tmp_path / "full", **common))
    assert full.finished and full.step == 20
    killed = pretrain(_cfg(prepared, tmp_path / "cut", stop_after=10, **common))
    assert not killed.finished and killed.step == 10 and "backbone" not in killed.paths
    assert load_checkpoint(tmp_path / "cut", job="pretrain")["step"] == 10
    # a killed process may have logged steps after its last checkpoint: they must be dropped
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 123.0}\n')
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(_cfg(prepared, tmp_path / "cut", **common))
    resumed = pretrain(_cfg(prepared, tmp_path / "cut", resume=True, workers=2, **common))
    assert resumed.finished and resumed.step == 20
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # bitwise equal floats
    assert read_metrics(tmp_path / "full", "val_loss") == read_metrics(tmp_path / "cut", "val_loss")
    sa = load_checkpoint(tmp_path / "full", job="pretrain")["model"]
    sb = load_checkpoint(tmp_path / "cut", job="pretrain")["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k != "_extra_state")
    # the engine choices travel in the method's state: the resumed run ran the uninterrupted run's
    chosen = [{k: v for k, v in c.items() if k != "source"} for c in sa["_extra_state"]["engine_choices"]]
    assert chosen and chosen == [{k: v for k, v in c.items() if k != "source"}
                                 for c in sb["_extra_state"]["engine_choices"]]
    assert len(list((tmp_path / "full" / "snapshots").glob("*.png"))) == 2


def test_exports_load_back(prepared: Path, tmp_path: Path) -> None:
    from PIL import Image

    from s3d.hub import load_pretrained, load_state

    res = pretrain(_cfg(prepared, tmp_path / "run", steps=3, checkpoint_every=3, val_every=0,
                        snapshot_every=3))
    trained = load_checkpoint(tmp_path / "run", job="pretrain")["model"]
    backbone = {k[len("backbone."):]: v for k, v in trained.items() if k.startswith("backbone.")}
    net = load_pretrained(res.paths["backbone"], num_classes=1)
    for k, v in res.model.state_dict().items():  # the result's model is the exported backbone
        assert torch.equal(v, backbone[k]), k
    assert net.config.name == "tiny"
    for k, v in net.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    state, cfg, _ = load_state(res.paths["nnssl"])
    assert cfg.features_per_stage == net.config.features_per_stage
    assert set(state) == set(backbone) and all(torch.equal(state[k], backbone[k]) for k in state)
    img = np.asarray(Image.open(tmp_path / "run" / "snapshots" / "step_00000003.png"))
    assert img.shape == (3 * 32, 4 * 32) and img.dtype == np.uint8


def test_engine_choice_is_logged_checkpointed_and_reused_on_resume(prepared: Path, tmp_path: Path, monkeypatch,
                                                                  capfd) -> None:
    """engine="auto" (the recipe's default) measures at step 1; the run prints and records the choice and a
    resumed run (a new process: empty cache) reuses the checkpointed choice instead of measuring again."""
    import s3d.sparse.autotune as autotune
    from s3d.runtime.metrics import MetricsLog

    measured: list[list[str]] = []

    def fake_measure(engines, candidates, *args, **kwargs):  # dense fastest, whatever this machine says
        measured.append([c.label for c in candidates])
        return {c.label: 1.0 if c.label == "dense" else 2.0 + i for i, c in enumerate(candidates)}

    monkeypatch.setattr(autotune, "measure_engines", fake_measure)
    autotune.clear_cache()
    run, common = tmp_path / "run", {"steps": 4, "checkpoint_every": 2, "val_every": 0, "snapshot_every": 0}
    pretrain(_cfg(prepared, run, stop_after=2, **common))
    assert measured == [["dense", "blocks@4", "blocks@8", "blocks@16"]]  # once, tiny at 16^3 cells
    err = capfd.readouterr().err
    assert "step 1: sparse encoder engine 'auto' -> dense (measured)" in err and "blocks@16 5.0 ms" in err
    recs = [r for r in MetricsLog.of_run(run).records() if "engine_choice" in r]
    assert len(recs) == 1 and recs[0]["step"] == 1
    choice = recs[0]["engine_choice"]
    assert choice["engine"] == "dense" and choice["timings_ms"]["blocks@4"] == 3.0
    assert choice["key"]["shape"] == [2, 1, 32, 32, 32] and choice["key"]["grad"] is True
    assert load_checkpoint(run, job="pretrain")["model"]["_extra_state"]["engine_choices"] == [choice]
    autotune.clear_cache()
    monkeypatch.setattr(autotune, "measure_engines", lambda *a, **k: pytest.fail("the resumed run measured"))
    assert pretrain(_cfg(prepared, run, resume=True, **common)).finished
    (restored,) = load_checkpoint(run, job="pretrain")["model"]["_extra_state"]["engine_choices"]
    assert restored == {**choice, "source": "checkpoint"}
    autotune.clear_cache()


def test_torchrun_two_processes_then_single_process_resume(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "s3d", "pretrain", "--data", str(prepared), "--out", str(run), "--config", "tiny",
           "--steps", "4", "--stop-after", "3", "--batch-size", "2", "--patch-size", "32",
           "--method-kwargs", '{"block_size": 16}', "--workers", "0", "--device", "cpu",
           "--checkpoint-every", "3", "--val-every", "0", "--snapshot-every", "0", "--no-progress",
           "--val-fraction", "0.2"]  # the settings of _cfg, so that the single-process run may resume it
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(run, job="pretrain")
    assert ckpt["step"] == 3 and ckpt["data"]["world_size"] == 2 and ckpt["data"]["local_batch"] == 1
    assert sorted(read_metrics(run)) == [1, 2, 3]
    with pytest.warns(UserWarning, match="2 process"):
        res = pretrain(_cfg(prepared, run, steps=4, resume=True, val_every=0, snapshot_every=0,
                            checkpoint_every=10))
    assert res.finished and res.step == 4 and res.paths["backbone"].is_dir()


def test_crop_stream_is_a_function_of_the_index(prepared: Path) -> None:
    files = sorted(str(p) for p in (prepared / "cases").glob("*.b2nd"))  # the default store
    ds = RandomCropDataset(files, (32, 32, 32), seed=7)
    a = torch.stack([ds[i] for i in range(6, 12)])
    loader = build_pretrain_loader(files, (32, 32, 32), batch_size=3, start_step=2, stop_step=4, seed=7,
                                   workers=2, pin_memory=False, prefetch_factor=2)
    batches = list(loader)
    assert len(batches) == 2 and torch.equal(torch.cat(batches), a)
    other_rank = RandomCropDataset(files, (32, 32, 32), seed=7, rank=1)
    assert not torch.equal(other_rank[6], a[0])
    # uniform over images: each of the 5 files is drawn ~20 % of the time
    counts = np.bincount([ds.locate(i)[0] for i in range(2000)], minlength=len(files)) / 2000
    assert np.all(np.abs(counts - 0.2) < 0.04)  # standard deviation sqrt(0.16 / 2000) = 8.9e-3: 4.5 of them


def test_split_and_shard() -> None:
    cases = [{"subject": s, "i": i} for i, s in enumerate("aabbccddee")]
    train, val = split_subjects(cases, 0.2, seed=0)
    assert len(val) == 2 and {c["subject"] for c in train}.isdisjoint({c["subject"] for c in val})
    assert len(split_subjects(cases, 0.3, seed=0)[1]) == 4  # ceil(0.3 * 5 subjects) = 2 subjects
    assert split_subjects(cases[:2], 0.5)[1] == []  # one subject: nothing to hold out
    assert split_subjects(cases, 0.2, seed=0) == (train, val)
    assert [c["i"] for c in shard_cases(train, 1, 2)] == [c["i"] for c in train[1::2]]
    with pytest.raises(ValueError, match="cannot be sharded over 3"):
        shard_cases(train[:2], 0, 3)


def test_build_method_unknown_name_is_a_clear_error() -> None:
    from s3d.nn import build_resenc_unet

    with pytest.raises(ValueError, match="unknown pre-training method 'no-such-method'"):
        build_method("no-such-method", build_resenc_unet("tiny", in_channels=1, num_classes=1))


def test_validation_loss_is_the_masked_voxel_mean_of_the_whole_set(prepared, tmp_path) -> None:
    """Validation batches of unequal masked-voxel counts: the logged value is sum(err) / sum(masked) over
    the whole held-out set (like the training loss over the global batch), not a mean of batch means."""
    import torch.nn.functional as F

    from s3d.data.pretrain_dataset import CenterCropDataset
    from s3d.pretrain.loop import _VAL, Trainer
    from s3d.runtime.optim import stream_seed

    run = Trainer(_cfg(prepared, tmp_path / "run", val_fraction=0.6, method_kwargs={"block_size": 8}))
    assert len(run.val_files) == 3 and run.local_batch == 2  # batches of 2 and 1 images
    value = run.validate()

    # reference: per-voxel squared errors at the masked voxels, recomputed from each batch's output
    ds = CenterCropDataset(run.val_files, run.recipe.patch_size)
    torch.manual_seed(stream_seed(run.cfg.seed, 0, 0, _VAL))
    err, err64, count, batch_means = 0.0, 0.0, 0.0, []
    run.method.eval()
    with torch.no_grad():
        for idx in ([0, 1], [2]):
            x = torch.stack([ds[j] for j in idx])
            out = run.method(x)
            masked = 1.0 - F.interpolate(out.mask.float(), size=x.shape[2:], mode="nearest")
            e = float(((out.reconstruction.float() - x) ** 2 * masked).sum())
            err64 += float(((out.reconstruction.double() - x.double()) ** 2 * masked.double()).sum())
            c = float(masked.sum()) * x.shape[1]
            err, count = err + e, count + c
            batch_means.append((e / c, len(idx)))
    # the same reconstructions; float32 sums vs float64, yardstick: the plain float32 sums here
    truth = err64 / count
    assert_yardstick(abs(value - truth) / truth, abs(err / count - truth) / truth, "validation loss")
    old = sum(m * n for m, n in batch_means) / 3  # the former per-image weighting of batch means
    assert abs(old - err / count) > 1e-4 * err / count, "masks too alike for the test to tell the two apart"
