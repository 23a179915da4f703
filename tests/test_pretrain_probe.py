"""``s3d pretrain --probe``: the frozen-encoder probe on the current encoder during pre-training.

One process: the probe of the initial weights (step 0) and after the checkpoints it is due at, in
``metrics.jsonl`` and ``RUN/probe.png``; by cost, probes stay within the budget. Two processes (a real
2-process gloo run under torchrun, this file as the worker): the training process group's timeout is
set to 5 s and rank 0's probe is made to last longer than that; the other rank waits on the probe's own
group and the run finishes.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("scipy")

from synthetic_scans import write_t1_archive  # noqa: E402
from test_nnunet_data import make_sphere_dataset  # noqa: E402

PG_TIMEOUT_S = 5.0
PROBE_SLEEP_S = 2.5 * PG_TIMEOUT_S
OPTIONS = {"n_train": 2, "steps": 2, "seeds": [0], "patch_size": [32, 32, 32], "target_spacing_mm": [1, 1, 1],
           "loader_threads": 0}
CFG = {"recipe": "s3d-b", "architecture": "tiny", "batch_size": 2, "patch_size": (32, 32, 32),
       "method_kwargs": {"block_size": 16}, "workers": 0, "progress": False, "val_fraction": 0.0, "val_every": 0,
       "snapshot_every": 0, "augment": False, "device": "cpu", "seed": 0, "probe_options": OPTIONS}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from s3d.data.scan import ScanFilters, prepare

    root = tmp_path_factory.mktemp("probe_data")
    raw = write_t1_archive(root / "raw", [(36, 36, 36), (40, 38, 36), (36, 40, 38), (38, 36, 40)])
    prepare(raw, root / "prep", ScanFilters(min_file_bytes=0, min_fov_mm=20.0), workers=0, progress=False)
    return root / "prep", make_sphere_dataset(root / "ds", n=5, channels=1)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_probe_at_the_start_and_every_n_steps_logged_and_plotted(data, tmp_path) -> None:
    from PIL import Image

    from s3d.pretrain import run as pretrain

    prep, ds = data
    run = tmp_path / "run"
    pretrain(data=str(prep), out=str(run), steps=4, checkpoint_every=2, probe=str(ds), probe_every=2, **CFG)
    probes = [r for r in _records(run) if "probe_dice" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]
    assert [r["probe_reference"] for r in probes] == [True, False, False]
    for r in probes:  # each record is what that probe measured and wrote
        saved = json.loads((run / "probe" / f"step_{r['step']:08d}" / "probe.json").read_text())
        assert r["probe_dice"] == saved["mean"]["weights"] and r["probe_dice_per_seed"] == [saved["runs"][0]["dice"]]
        assert r["probe_s"] > 0
    assert probes[0]["probe_cost"] is None and probes[2]["probe_cost"] > 0
    img = Image.open(run / "probe.png")
    assert img.size[0] >= 1200 and img.size[1] >= 400
    # the probe's runs keep no checkpoints; the pre-training exported its backbone as usual
    assert not list((run / "probe").rglob("*.pt")) and (run / "backbone" / "model.safetensors").is_file()


def test_probe_by_cost_stays_within_the_budget(data, tmp_path) -> None:
    from s3d.pretrain import run as pretrain

    prep, ds = data
    run = tmp_path / "run"
    pretrain(data=str(prep), out=str(run), steps=6, checkpoint_every=1, probe=str(ds), probe_budget=0.05, **CFG)
    recs = _records(run)
    probes = [r for r in recs if "probe_dice" in r]
    # a probe costs far more than 5 % of a few tiny steps: only the reference probe of the initial weights runs
    assert [r["step"] for r in probes] == [0]
    stamps = [r["time"] for r in recs if "time" in r]
    assert 2 * probes[0]["probe_s"] > 0.05 * (max(stamps) - min(stamps))


def test_bad_probe_settings_are_one_line_before_training(data, tmp_path, capsys) -> None:
    from s3d.cli import main

    prep, ds = data
    base = ["pretrain", "--data", str(prep), "--out", str(tmp_path / "r"), "--config", "tiny", "--steps", "2",
            "--batch-size", "2", "--patch-size", "32", "--method-kwargs", '{"block_size": 16}', "--workers", "0",
            "--device", "cpu", "--no-progress", "--checkpoint-every", "2"]
    # the dataset check lists its problems as fine-tuning's does: a header line and one line per problem
    for extra, says, lines in ((["--probe", str(tmp_path / "none")], "no such dataset folder", 2),
                               (["--probe", str(ds), "--probe-every", "3"], "a multiple of checkpoint_every (2)", 1),
                               (["--probe", str(ds), "--probe-options", '{"stepz": 2}'],
                                "probe options ['stepz']: unknown", 1)):
        assert main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert says in err and err.startswith("s3d pretrain: error:") and err.count("\n") == lines, err
    # an option value that is not JSON is a usage error (exit 2), as --method-kwargs's
    with pytest.raises(SystemExit) as exc:
        main(base + ["--probe", str(ds), "--probe-options", "{steps: 2}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --probe-options: not JSON" in err, err
    assert not (tmp_path / "r").exists()


def _worker(out: Path, prep: Path, ds: Path) -> None:
    """Runs on every rank under torchrun: a short pre-training with a probe longer than the PG timeout."""
    import torch
    import torch.distributed as dist

    import s3d.finetune.probing as probe_mod
    from s3d.pretrain import run as pretrain

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    real = probe_mod.probe

    def slow_probe(*args, **kwargs):
        time.sleep(PROBE_SLEEP_S)  # longer than the training process group's timeout
        return real(*args, **kwargs)

    probe_mod.probe = slow_probe
    cfg = {**CFG, "method_kwargs": {"block_size": 16, "engine": "dense"}}  # no engine timing on the first step
    result = pretrain(data=str(prep), out=str(out), steps=2, checkpoint_every=2, probe=str(ds), probe_every=2,
                      probe_timeout_s=600, **cfg)
    (out.parent / f"rank{dist.get_rank() if dist.is_initialized() else os.environ['RANK']}.json").write_text(
        json.dumps({"step": result["step"]}))


def test_ddp_ranks_wait_for_rank0_probe_past_the_process_group_timeout(data, tmp_path) -> None:
    prep, ds = data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path / "run"), str(prep), str(ds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["step"] for r in (0, 1)] == [2, 2]
    probes = [r for r in _records(tmp_path / "run") if "probe_dice" in r]
    assert [r["step"] for r in probes] == [0, 2]
    assert all(r["probe_s"] >= PROBE_SLEEP_S for r in probes)  # each probe outlasted the group's timeout


if __name__ == "__main__":  # torchrun worker: python -m torch.distributed.run ... this_file OUT PREP DATASET
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
