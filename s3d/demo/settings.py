"""Settings of one ``s3d demo`` run and the step plan that fits its time budget.

:class:`DemoSettings` holds the sizes, budget and switches; :func:`demo_settings` gives the default
and the ``--quick`` CI run; :func:`time_train_step` measures a training step and :func:`plan_steps`
shares the budget between pre-training and the fine-tuning runs.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ARCHITECTURE = "tiny"


@dataclass
class DemoSettings:
    """Sizes, budget and switches of one demo run.

    Attributes:
        out: output folder (created; must be empty or a previous demo's folder).
        minutes: wall-clock budget for the whole run, minutes (steps are sized to fit).
        quick: the CI smoke setting (fixed, tiny step counts; ``minutes`` is ignored).
        source: anatomy of the demo data, "mni" (needs nilearn), "phantom", or "auto" (mni when nilearn
            is installed).
        task: labelled task, "tissue" (CSF/GM/WM) or "lesion".
        num_unlabelled / num_labelled / num_test: cohort sizes (volumes / labelled training pool /
            held-out test cases).
        train_sizes: labelled training-set sizes compared (each: pre-trained vs scratch).
        shape / spacing_mm: volume grid (voxels) and voxel size (mm) of the generated data.
        patch_size: training patch (voxels, multiples of the network stride 16).
        batch_size: patches per step, pre-training and fine-tuning.
        pretrain_steps / finetune_steps: fixed step counts (``None``: from the time budget).
        schedule: fine-tuning schedule of the pre-trained network (a ``s3d.finetune.SCHEDULES`` name;
            the paper's best by default); scratch always uses ``"scratch"``.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        seed: seeds data, splits, initialisation and training.
        progress: show progress bars.
    """

    out: Path
    minutes: float = 10.0
    quick: bool = False
    source: str = "auto"
    task: str = "tissue"
    num_unlabelled: int = 200
    num_labelled: int = 40
    num_test: int = 10
    train_sizes: tuple[int, ...] = (5, 10, 20)
    shape: tuple[int, int, int] = (48, 56, 48)
    spacing_mm: float = 3.5
    patch_size: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 2
    pretrain_steps: int | None = None
    finetune_steps: int | None = None
    schedule: str = "best"
    device: str = "auto"
    seed: int = 0
    progress: bool = True


def demo_settings(
    out: str | os.PathLike[str] = "s3d-demo", quick: bool = False, **overrides: Any
) -> DemoSettings:
    """The default demo (about 10 minutes on 2 CPU cores) or, with ``quick``, the CI smoke run.

    Example:
        >>> demo_settings("out", quick=True).train_sizes
        (5,)
    """
    s = DemoSettings(out=Path(out))
    if quick:
        s = replace(s, quick=True, minutes=2.0, num_unlabelled=12, num_labelled=8, num_test=3,
                    train_sizes=(5,), shape=(32, 40, 32), spacing_mm=5.0, patch_size=(32, 32, 32),
                    pretrain_steps=12, finetune_steps=12)
    return replace(s, **overrides)


def time_train_step(
    patch_size: tuple[int, int, int], batch_size: int, device: str, mae: bool = False, repeats: int = 5
) -> float:
    """Seconds per training step (forward, backward, SGD) of the demo network at ``patch_size``.

    Args:
        patch_size: (D, H, W) voxels.
        batch_size: patches per step.
        device: "cpu" or "cuda".
        mae: time a sparse-MAE pre-training step (:class:`s3d.sparse.SparseMAEWrapper`, 16^3 cells)
            instead of a segmentation step.
        repeats: timed steps after one warm-up step; the median is returned, so a short burst of
            load on the machine does not shrink the whole plan (it did with a mean of 2 steps).

    Example:
        >>> time_train_step((32, 32, 32), 2, "cpu") > 0
        True
    """
    import torch

    from s3d.nn import build_resenc_unet

    net = build_resenc_unet(ARCHITECTURE, in_channels=1, num_classes=1 if mae else 4, deep_supervision=False)
    module: torch.nn.Module = net
    if mae:
        from s3d.sparse import SparseMAEWrapper

        module = SparseMAEWrapper(net, block_size=16)
    module = module.to(device)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch_size, 1, *patch_size, device=device)
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = module(x)
        loss = out.loss if mae else out.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def plan_steps(budget_s: float, pretrain_step_s: float, finetune_step_s: float, n_runs: int,
               pretrain_share: float = 0.4, reserve: float = 0.2, min_steps: int = 20,
               max_steps: int = 4000) -> tuple[int, int]:
    """(pre-training steps, steps per fine-tuning run) that fit ``budget_s`` seconds.

    A fraction ``reserve`` of the budget is kept for validation, prediction, evaluation and the
    report; the rest is split ``pretrain_share`` : ``1 - pretrain_share`` between pre-training and
    the ``n_runs`` fine-tuning runs.

    Example:
        >>> plan_steps(600, 0.6, 0.5, 6)
        (320, 96)
    """
    usable = max(0.0, (1.0 - reserve) * budget_s)
    pre = int(pretrain_share * usable / pretrain_step_s)
    ft = int((1.0 - pretrain_share) * usable / (n_runs * finetune_step_s))
    return min(max(pre, min_steps), max_steps), min(max(ft, min_steps), max_steps)
