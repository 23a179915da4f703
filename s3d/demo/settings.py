"""Settings of one ``s3d demo`` run: sizes, seeds, the fine-tuning recipes, the budget and the time plan.

:class:`DemoSettings` holds the sizes, seeds and switches; :func:`demo_settings` gives the default and
the ``--quick`` CI run. :data:`RECIPES` are the fine-tuning recipes of the ``s3d`` and ``scratch`` arms,
chosen on validation cases by ``benchmarks/demo_ablation.py --select`` (docs/quickstart.md has the
table); the ``control`` arm runs the ``s3d`` arm's recipe (:func:`recipe_of`).
:func:`time_train_step` measures a training step and :func:`plan_steps` gives the demo's own short
pre-training the time the fine-tuning runs leave.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

#: The demo network (``tiny`` ResEnc U-Net preset, total stride 16) when the weights do not say otherwise.
ARCHITECTURE = "tiny"
#: The weights of the pre-trained arm: shipped with s3d (``s3d demo --make-weights`` made them once).
DEMO_WEIGHTS = "s3d-demo"


@dataclass(frozen=True)
class FinetuneRecipe:
    """How one arm is fine-tuned (both arms get the same steps, batch and patch).

    Attributes:
        schedule: a ``s3d.finetune.SCHEDULES`` name (what is transferred, warm-ups, frozen parts).
        peak_lr: peak learning rate (overrides the schedule's).
        warmup_fraction: length of each warm-up as a fraction of the steps.
    """

    schedule: str
    peak_lr: float
    warmup_fraction: float = 0.05

    def label(self) -> str:
        """Short text, e.g. ``"no_warmup, peak lr 0.01"``."""
        warm = f", warm-ups {self.warmup_fraction:.0%}" if self.schedule not in ("scratch", "no_warmup") else ""
        return f"{self.schedule}, peak lr {self.peak_lr:g}{warm}"


#: The recipes of the two arms, chosen on validation cases (never the test cases) with
#: ``python benchmarks/demo_ablation.py --select``; docs/quickstart.md has the table and the reason.
#: Validation Dice over 3 seeds x 5/10/20 cases (2026-12-01, shipped weights): s3d 0.658 (lr 0.06: 0.651,
#: 0.2: 0.657); scratch 0.637 (lr 0.1: 0.632, 0.3: 0.633).
RECIPES: dict[str, FinetuneRecipe] = {
    "s3d": FinetuneRecipe("decoder_warmup", 1e-1, 0.1),
    "scratch": FinetuneRecipe("scratch", 2e-1),
}

@dataclass
class DemoSettings:
    """Sizes, seeds, budget and switches of one demo run.

    Attributes:
        out: output folder (created; must be empty or a previous demo's folder).
        minutes: wall-clock budget for the whole run, minutes (the demo's own short pre-training gets
            what the fine-tuning runs leave).
        quick: the CI smoke setting (tiny sizes and step counts; ``minutes`` is ignored).
        source: anatomy of the demo data, "mni" (needs nilearn), "phantom", or "auto" (mni when nilearn
            is installed).
        task: labelled task, "tissue" (CSF/GM/WM) or "lesion".
        num_unlabelled / num_labelled / num_test: cohort sizes (volumes for the demo's own short
            pre-training / labelled training pool / held-out test cases).
        train_sizes: labelled training-set sizes compared (each: pre-trained vs scratch).
        seeds: fine-tuning seeds (each picks the labelled cases, the initialisation of new weights and
            the patches); the table reports the mean and spread over them.
        shape / spacing_mm: volume grid (voxels) and voxel size (mm) of the generated data.
        patch_size: training patch (voxels, multiples of the network stride).
        batch_size: patches per step, pre-training and fine-tuning.
        finetune_steps: steps of every fine-tuning run (the recipes were chosen at this count).
        pretrain_steps: steps of the demo's own short pre-training (``None``: from the time budget).
        weights: weights of the pre-trained arm (``s3d-demo``, shipped; or ``s3d-b``, a path, a Hub repo).
        recipes: the fine-tuning recipe of the ``"s3d"`` and ``"scratch"`` arms (the ``"control"`` arm, random
            weights, runs the ``"s3d"`` recipe).
        probe_steps: steps of each run of the frozen-encoder probe of the weights against random weights
            (:func:`s3d.finetune.probe`, one run per seed and arm; 0: no probe).
        probe_n_train: labelled cases the probe trains on.
        probe_lr: the probe's peak learning rate (PolyLR; 0.1 suits its short run, as for the arms).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        data_seed: seed of the generated cohort.
        progress: show progress bars.
        plan_only: print the plan and the time it will take, then stop.
    """

    out: Path
    minutes: float = 10.0
    quick: bool = False
    source: str = "auto"
    task: str = "tissue"
    num_unlabelled: int = 40
    num_labelled: int = 25
    num_test: int = 10
    train_sizes: tuple[int, ...] = (2, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    shape: tuple[int, int, int] = (48, 56, 48)
    spacing_mm: float = 3.5
    patch_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    finetune_steps: int = 150
    pretrain_steps: int | None = None
    weights: str = DEMO_WEIGHTS
    recipes: dict[str, FinetuneRecipe] = field(default_factory=lambda: dict(RECIPES))
    probe_steps: int = 60
    probe_n_train: int = 5
    probe_lr: float = 0.1
    device: str = "auto"
    data_seed: int = 0
    progress: bool = True
    plan_only: bool = False


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
        s = replace(s, quick=True, minutes=2.0, num_unlabelled=8, num_labelled=7, num_test=3, train_sizes=(5,),
                    seeds=(0, 1), shape=(32, 40, 32), spacing_mm=5.0, patch_size=(32, 32, 32),
                    pretrain_steps=8, finetune_steps=8, probe_steps=4, probe_n_train=2)
    return replace(s, **overrides)


def recipe_of(s: DemoSettings, arm: str) -> FinetuneRecipe:
    """The recipe arm ``arm`` runs: its own, or for ``"control"`` exactly the ``"s3d"`` arm's.

    Example:
        >>> recipe_of(demo_settings("out"), "control") == recipe_of(demo_settings("out"), "s3d")
        True
    """
    return s.recipes["s3d" if arm == "control" else arm]


def time_train_step(
    patch_size: tuple[int, int, int], batch_size: int, device: str, mae: bool = False, repeats: int = 5,
    architecture: Any = ARCHITECTURE, in_channels: int = 1, num_classes: int = 4,
) -> float:
    """Seconds per training step (forward, backward, SGD) of the demo network at ``patch_size``.

    Args:
        patch_size: (D, H, W) voxels.
        batch_size: patches per step.
        device: "cpu" or "cuda".
        mae: time a sparse-MAE pre-training step (:class:`s3d.sparse.SparseMAEWrapper`, 16^3 cells)
            instead of a segmentation step.
        repeats: timed steps after one warm-up step; the median is returned, so a short burst of
            load on the machine does not distort the plan (it did with a mean of 2 steps).
        architecture: preset name or :class:`~s3d.nn.ResEncUNetConfig` of the network.
        in_channels: input channels of the segmentation network.
        num_classes: its output classes.

    Example:
        >>> time_train_step((32, 32, 32), 2, "cpu") > 0
        True
    """
    import torch

    from s3d.nn import build_resenc_unet

    net = build_resenc_unet(architecture, in_channels=1 if mae else in_channels, num_classes=1 if mae else num_classes,
                            deep_supervision=False)
    module: torch.nn.Module = net
    if mae:
        from s3d.sparse import SparseMAEWrapper

        module = SparseMAEWrapper(net, block_size=16)
    module = module.to(device)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch_size, 1 if mae else in_channels, *patch_size, device=device)
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


def plan_steps(budget_s: float, pretrain_step_s: float, finetune_s: float, reserve: float = 0.15,
               min_steps: int = 20, max_steps: int = 600) -> int:
    """Steps of the demo's own short pre-training that fit what ``budget_s`` leaves after fine-tuning.

    ``finetune_s`` is the estimated time of all fine-tuning, prediction and evaluation; a fraction
    ``reserve`` of the budget is kept for data, figures and the report.

    Example:
        >>> plan_steps(600, 0.5, 400)
        110
    """
    left = (1.0 - reserve) * budget_s - finetune_s
    return int(min(max(left / pretrain_step_s, min_steps), max_steps))
