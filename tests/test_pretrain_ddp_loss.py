"""Multi-process MAE pre-training optimises the global batch's masked-voxel mean, as one process would.

One real 2-process gloo run (``torchrun``, this file as the worker script) does two things per rank:

1. a DDP forward/backward of a tiny ``SparseMAEWrapper`` on its own sample with an explicit keep
   grid (rank 0: 38 of 64 cells masked, rank 1: 58), once with
   :func:`s3d.runtime.distributed.global_weighted_loss` (the trainer's path) and once with the plain
   per-rank loss (the old behaviour); the averaged gradients are saved;
2. one step of :func:`s3d.pretrain.run` (mask ratio drawn per sample from U[0.6, 0.9]).

The parent compares (1) with one process computing the loss on the concatenated batch with the same
masks, and the logged loss of (2) with the global masked mean recomputed from each rank's crop and mask.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_scans import prepare_t1_archive
from tolerance import assert_yardstick, flat, yardstick_tol

SIZE = (32, 32, 32)
BLOCK = 8
MASKED_CELLS = (38, 58)  # of (32 / 8)^3 = 64 cells: ~60 % on rank 0, ~90 % on rank 1
CFG = {"recipe": "s3d-b", "architecture": "tiny", "steps": 2, "stop_after": 1, "batch_size": 2,
       "patch_size": SIZE, "method_kwargs": {"block_size": BLOCK}, "workers": 0, "progress": False,
       "val_fraction": 0.0, "val_every": 0, "snapshot_every": 0, "checkpoint_every": 1, "log_every": 1,
       "augment": False, "device": "cpu", "seed": 0}


def _mae_setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny MAE (fixed init), 2 images (2, 1, 32, 32, 32) and keep grids (2, 1, 4, 4, 4), 1 = visible."""
    from s3d import build_resenc_unet
    from s3d.sparse import SparseMAEWrapper

    torch.manual_seed(0)
    net = build_resenc_unet("tiny", in_channels=1, num_classes=1)
    # float64: the batch-of-2 and two batch-of-1 passes round differently (~3e-5 relative in fp32)
    mae = SparseMAEWrapper(net, block_size=BLOCK, engine="dense").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *SIZE, generator=g, dtype=torch.float64)
    cells = (SIZE[0] // BLOCK) ** 3
    keep = torch.ones(2, cells, dtype=torch.bool)
    for i, n in enumerate(MASKED_CELLS):
        keep[i, torch.randperm(cells, generator=g)[:n]] = False
    return mae, x, keep.view(2, 1, *(s // BLOCK for s in SIZE))


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _worker(out: Path, data: Path) -> None:
    """Runs on every rank under torchrun."""
    from torch.nn.parallel import DistributedDataParallel

    from s3d.pretrain import PretrainConfig
    from s3d.pretrain import run as pretrain
    from s3d.runtime.distributed import global_weighted_loss, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    r = info.rank
    mae, x, keep = _mae_setup()
    ddp = DistributedDataParallel(mae)
    result: dict[str, object] = {}
    for name in ("global", "per_rank"):
        mae.zero_grad(set_to_none=True)
        o = ddp(x[r:r + 1], mask=keep[r:r + 1])
        loss = o.loss
        if name == "global":
            loss, result["logged"] = global_weighted_loss(o.loss, o.loss_weight, info)
        loss.backward()
        result[name] = _grads(mae)
    torch.save(result, out / f"grads_rank{r}.pt")
    # the trainer (joins the process group initialised above, leaves it at the end)
    pretrain(PretrainConfig(data=str(data), out=str(out / "run"), **CFG))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Four of the five volumes (an even split over 2 ranks)."""
    shapes = [(44, 40, 42), (36, 38, 40), (40, 40, 40), (34, 36, 38)]
    return prepare_t1_archive(tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("prep"), shapes)


@pytest.fixture(scope="module")
def ddp_run(prepared: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out), str(prepared)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _loss64(mae: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The masked-voxel mean of the float64 network's output, in float64 throughout (s3d's
    ``masked_mse_loss`` computes in float32 even for float64 input)."""
    out = mae(x, mask=keep)
    masked = (~keep).double().repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3).repeat_interleave(BLOCK, 4)
    return ((out.reconstruction - x) ** 2 * masked).sum() / masked.sum()


@pytest.mark.numerical
def test_ddp_gradient_equals_single_process_global_batch(ddp_run: Path) -> None:
    """The network is float64 and the loss float32 (as in training), so the gradients' rounding comes from
    the float32 loss. The truth: the same network with a float64 loss. The yardstick: one process with the
    whole batch and s3d's float32 loss (a plain float32 computation of the same loss)."""
    r0, r1 = (torch.load(ddp_run / f"grads_rank{r}.pt", weights_only=True) for r in (0, 1))
    mae, x, keep = _mae_setup()
    # reference 1: one process, the concatenated batch, the same masks
    out = mae(x, mask=keep)
    assert float(out.loss_weight) == float((~keep).sum()) * BLOCK**3  # masked voxels x 1 channel
    out.loss.backward()
    ref = _grads(mae)
    mae.zero_grad(set_to_none=True)
    loss64 = _loss64(mae, x, keep)
    loss64.backward()
    loss64 = loss64.detach()
    truth = _grads(mae)
    # reference 2: what DDP did before: the mean of the per-sample (per-rank) means' gradients
    mae.zero_grad(set_to_none=True)
    ((mae(x[:1], mask=keep[:1]).loss + mae(x[1:], mask=keep[1:]).loss) / 2).backward()
    mean_of_means = _grads(mae)
    mae.zero_grad(set_to_none=True)
    ((_loss64(mae, x[:1], keep[:1]) + _loss64(mae, x[1:], keep[1:])) / 2).backward()
    mean_truth = _grads(mae)
    assert set(r0["global"]) == set(ref) and len(ref) > 20
    for k in ref:
        assert torch.equal(r0["global"][k], r1["global"][k]), k  # DDP averaged: identical on both ranks
    assert_yardstick(_rel(flat(r0["global"]), flat(truth)), _rel(flat(ref), flat(truth)), "DDP gradients")
    assert_yardstick(_rel(flat(r0["per_rank"]), flat(mean_truth)), _rel(flat(mean_of_means), flat(mean_truth)),
                     "per-rank DDP gradients")
    # the old normalisation is measurably different in this setting (whole gradient vector): far outside
    # the tolerance above
    old_gap = _rel(flat(mean_truth), flat(truth))
    assert old_gap > 100 * yardstick_tol(_rel(flat(ref), flat(truth))), old_gap
    for r in (r0, r1):  # the logged value: the global mean (yardstick: the one-process float32 loss)
        assert_yardstick(abs(float(r["logged"]) - float(loss64)) / float(loss64),
                         abs(float(out.loss.detach()) - float(loss64)) / float(loss64), "logged loss")


@pytest.mark.numerical
def test_logged_loss_is_global_masked_mean(ddp_run: Path, prepared: Path) -> None:
    from s3d.data.pretrain_dataset import build_pretrain_loader, shard_cases, split_subjects
    from s3d.data.scan import read_manifest, training_cases
    from s3d.nn import build_resenc_unet
    from s3d.pretrain import PretrainConfig, build_method, read_metrics
    from s3d.pretrain.loop import _METHOD
    from s3d.runtime.optim import stream_seed

    logged = read_metrics(ddp_run / "run")
    assert sorted(logged) == [1]
    # recompute step 1 of each rank: same init, shard, crop stream and mask stream as the trainer
    cfg = PretrainConfig(data=str(prepared), out="unused", **CFG)
    recipe = cfg.resolved_recipe()
    train, _ = split_subjects(training_cases(read_manifest(prepared), prepared), 0.0, cfg.seed)
    torch.manual_seed(cfg.seed)
    backbone = build_resenc_unet("tiny", in_channels=1, num_classes=1, deep_supervision=False)
    method = build_method(recipe.method, backbone, **recipe.method_kwargs).train()
    method64 = copy.deepcopy(method).double()
    sums, sums64, weights, means = [], [], [], []
    for r in (0, 1):
        files = [c["file"] for c in shard_cases(train, r, 2)]
        x = next(iter(build_pretrain_loader(files, SIZE, 1, 0, 1, seed=cfg.seed, rank=r, workers=0,
                                            pin_memory=False)))
        with torch.no_grad():
            torch.manual_seed(stream_seed(cfg.seed, r, 0, _METHOD))
            out = method(x)
            torch.manual_seed(stream_seed(cfg.seed, r, 0, _METHOD))  # the same mask, float64 network
            out64 = method64(x.double())
        assert torch.equal(out64.mask, out.mask)
        masked = float((~out.mask).sum()) * BLOCK**3
        assert float(out.loss_weight) == masked
        vox = (~out.mask).double().repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3).repeat_interleave(BLOCK, 4)
        sums64.append(float(((out64.reconstruction - x.double()) ** 2 * vox).sum()))
        means.append(float(out.loss))
        weights.append(masked)
        sums.append(float(out.loss) * masked)
    assert weights[0] != weights[1]  # the per-sample mask ratios differ, so the two means disagree
    global_mean, truth = sum(sums) / sum(weights), sum(sums64) / sum(weights)
    # the trainer's float32 forward and loss vs float64; yardstick: this float32 recomputation
    assert_yardstick(abs(logged[1] - truth) / truth, abs(global_mean - truth) / truth, "logged global mean")
    old = sum(means) / 2  # the old logged value differs, far outside that tolerance
    assert abs(old - truth) / truth > 100 * yardstick_tol(abs(global_mean - truth) / truth)


if __name__ == "__main__":  # torchrun worker: python -m torch.distributed.run ... this_file OUT DATA
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "done": True}))
